"""ELITE written out from the paper's equations and the official code's formulas, as slow plain loops,
against the fast implementation (tiny models, fp32, CPU).

Wei et al., "ELITE: Encoding Visual Concepts into Textual Embeddings for Customized Text-to-Image
Generation" (ICCV 2023). The plain versions below loop over samples, heads, tokens and layers and use
the official processors' layout (heads folded into the batch, one max over heads and queries), so
they share no code with `encoders.attention`, `encoders.local_mapping` or `inference.encoding`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.attention import AttentionContext, EliteAttnProcessor, LocalTokens, set_elite_processors
from encoders.global_mapping import GlobalMapping
from encoders.local_mapping import REFERENCE_SETTINGS, LocalMapping
from training.diffusion import denoising_loss


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def plain_mlp(layers, x):
    """The mapping MLP (Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear) from its weights."""
    w = dict(layers.named_parameters())
    return plain_mlp_weights(lambda key: w[key], x)


def plain_mlp_weights(w, x):
    """The same MLP from a weight lookup `w("0.weight")` (a module's parameters or a reference state dict)."""
    for first, norm in (("0", "1"), ("3", "4")):
        x = x @ w(f"{first}.weight").T + w(f"{first}.bias")
        x = F.leaky_relu(F.layer_norm(x, (x.shape[-1],), w(f"{norm}.weight"), w(f"{norm}.bias")))
    return x @ w("6.weight").T + w("6.bias")


def plain_nearest(mask: torch.Tensor, side: int) -> torch.Tensor:
    """torch's nearest resize of a [H, W] mask, by its index rule: source index floor(i * H / side)."""
    h, w = mask.shape
    rows = [min(int(math.floor(i * h / side)), h - 1) for i in range(side)]
    cols = [min(int(math.floor(j * w / side)), w - 1) for j in range(side)]
    return mask[rows][:, cols]


@pytest.fixture(scope="module")
def mapping_pair(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    torch.manual_seed(0)
    gm = GlobalMapping.from_unet(unet, input_dim=32, hidden_dim=24)
    lm = LocalMapping.from_unet(unet, input_dim=32, hidden_dim=24)
    with torch.no_grad():
        for p in list(gm.parameters()) + list(lm.parameters()):  # K/V no longer copies of the frozen ones
            p.add_(0.05 * torch.randn_like(p))
    return unet, gm, lm


# ---- the mappings -----------------------------------------------------------------------------------


def test_global_words_are_eq_2(mapping_pair):
    """w_i = MLP_i(CLS_i) + mean_p MLP'_i(patch_p), one word per tapped layer, w0 first."""
    _, gm, _ = mapping_pair
    feats = [torch.randn(2, 257, 32) for _ in range(5)]
    words = gm(feats)
    for b in range(2):
        for i in range(5):
            patches = torch.stack([plain_mlp(gm.patch_mappings[i], feats[i][b, 1 + p]) for p in range(256)])
            expected = plain_mlp(gm.cls_mappings[i], feats[i][b, 0]) + patches.mean(0)
            assert torch.allclose(words[b, i], expected, atol=1e-5)


def test_local_tokens_with_the_official_mask_route(mapping_pair):
    """e_p = mean_i (MLP_i(CLS_i) + MLP'_i(patch_{i,p})) * m_p with m = nearest(nearest(mask, 128), 16)."""
    _, _, lm = mapping_pair
    feats = [torch.randn(1, 257, 32) for _ in range(5)]
    rows, cols = torch.arange(300)[:, None], torch.arange(420)[None]
    mask = ((rows // 13 + cols // 17) % 2).float()  # a checkerboard whose squares do not align with the grid
    out = lm(feats, mask[None, None], grid_via=REFERENCE_SETTINGS["mask_grid_via"])
    grid = plain_nearest(plain_nearest(mask, 128), 16).flatten()
    at_224 = Image.fromarray(mask.numpy().astype(np.uint8) * 255).resize((224, 224), Image.NEAREST)
    via_224 = plain_nearest(torch.from_numpy(np.asarray(at_224) > 0).float(), 16).flatten()
    assert (grid != via_224).sum() > 10  # the route matters: through the 224 px view (PIL) it is another grid
    for p in range(256):
        token = (
            sum(
                plain_mlp(lm.cls_mappings[i], feats[i][0, 0]) + plain_mlp(lm.patch_mappings[i], feats[i][0, 1 + p])
                for i in range(5)
            )
            / 5
        )
        assert torch.allclose(out.tokens[0, p], token * grid[p], atol=1e-5)
        assert bool(out.keep[0, p]) == bool(grid[p] > 0.5)


# ---- the fused cross-attention ------------------------------------------------------------------------


def plain_elite_attention(
    attn,
    hidden,
    text,
    local=None,
    index=None,
    lam=1.0,
    norm="sample",
    mask_mode="zero_tokens",
    global_kv=None,
    local_kv=None,
):
    """ELITE's cross-attention for one sample, head by head:
    out_h = softmax(Q K_g^T / sqrt(d)) V_g
            + lam * (A_h[:, w0] / max_{h', q} A_{h'}[q, w0]) * softmax(Q K_l^T / sqrt(d)) V_l
    with K_l = W_K^l (e * m), V_l = W_V^l (e * m) (masked tokens: zero keys and values, in the softmax)."""
    heads = attn.heads
    q = hidden @ attn.to_q.weight.T
    kg, vg = (text @ global_kv[0].weight.T, text @ global_kv[1].weight.T)
    d = q.shape[-1] // heads
    maps, outs = [], []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        probs = torch.softmax((q[:, s] @ kg[:, s].T) / math.sqrt(d), dim=-1)
        maps.append(probs[:, index] if local is not None else None)
        outs.append(probs @ vg[:, s])
    if local is not None:
        tokens, keep = local
        if mask_mode == "zero_tokens":
            tokens = tokens * keep[:, None].float()
        kl, vl = tokens @ local_kv[0].weight.T, tokens @ local_kv[1].weight.T
        peak = torch.stack(maps).max()
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            scores = (q[:, s] @ kl[:, s].T) / math.sqrt(d)
            if mask_mode == "exclude":
                scores = scores.masked_fill(~keep[None, :], float("-inf"))
            local_out = torch.softmax(scores, dim=-1) @ vl[:, s]
            a = maps[h] / (peak if norm == "sample" else maps[h].max())
            outs[h] = outs[h] + lam * a[:, None] * local_out
    out = torch.cat(outs, dim=-1)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


@pytest.mark.parametrize("norm, mask_mode", [("sample", "zero_tokens"), ("sample_head", "exclude")])
def test_fused_cross_attention_is_the_equation(mapping_pair, norm, mask_mode):
    unet, gm, lm = mapping_pair
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(name)
    g = torch.Generator().manual_seed(3)
    batch = 2
    hidden = torch.randn(batch, 64, 32, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    tokens = torch.randn(batch, 256, 32, generator=g)
    keep = torch.rand(batch, 256, generator=g) > 0.4
    index = torch.tensor([5, 9])
    lam = torch.tensor([0.8, 0.6])
    processor = EliteAttnProcessor(
        name, gm.key_value(name), lm.key_value(name), w0_map_norm=norm, local_mask_mode=mask_mode
    )
    ctx = AttentionContext(local=[LocalTokens(tokens, index, keep, lam)])
    fast = processor(attn, hidden, text, attention_context=ctx)
    for b in range(batch):
        plain = plain_elite_attention(
            attn,
            hidden[b],
            text[b],
            (tokens[b], keep[b]),
            int(index[b]),
            float(lam[b]),
            norm,
            mask_mode,
            gm.key_value(name),
            lm.key_value(name),
        )
        assert torch.allclose(fast[b], plain, atol=1e-5)
    # a classifier-free guidance batch [uncond, cond]: the local branch on the conditional half only
    cfg_fast = processor(attn, torch.cat([hidden, hidden]), torch.cat([text, text]), attention_context=ctx)
    for b in range(batch):
        uncond = plain_elite_attention(attn, hidden[b], text[b], global_kv=gm.key_value(name))
        assert torch.allclose(cfg_fast[b], uncond, atol=1e-5)
        assert torch.allclose(cfg_fast[batch + b], fast[b], atol=1e-5)


def test_the_defaults_are_the_official_choices(mapping_pair):
    unet, gm, lm = mapping_pair
    processors = set_elite_processors(unet, gm, lm)
    elite = [p for p in processors.values() if isinstance(p, EliteAttnProcessor)]
    assert elite and all(p.w0_map_norm == "sample" and p.local_mask_mode == "zero_tokens" for p in elite)
    assert dict(lm.settings) == REFERENCE_SETTINGS


# ---- the two training losses ----------------------------------------------------------------------------


def test_stage_2_loss_is_the_official_normalisation():
    """(mse * m).sum over C, H, W / m.sum over its one channel: C x the per-element mean when m is all 1."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    valid = (torch.rand(3, 1, 8, 8, generator=g) > 0.3).float()
    official = torch.stack([((pred[b] - target[b]) ** 2 * valid[b]).sum() / valid[b].sum() for b in range(3)]).mean()
    assert torch.allclose(denoising_loss(pred, target, valid, sum_channels=True), official, atol=1e-6)
    ones = torch.ones(3, 1, 8, 8)
    assert torch.allclose(
        denoising_loss(pred, target, ones, sum_channels=True), 4 * F.mse_loss(pred, target), atol=1e-5
    )
    assert torch.allclose(denoising_loss(pred, target), F.mse_loss(pred, target), atol=1e-6)  # stage 1: the plain mean


# ---- inference from converted official checkpoints --------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the official scripts' hard-coded normalisation
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def official_state_dict(unet, seed: int, hidden: int = 24) -> dict[str, torch.Tensor]:
    """A mapper state dict in the official key layout (`mapping_{i}`, `mapping_patch_{i}`, `{layer}_to_k`)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(5):
        for prefix in (f"mapping_{i}", f"mapping_patch_{i}"):
            for sub, shape in (
                ("0", (hidden, 32)),
                ("1", (hidden,)),
                ("3", (hidden, hidden)),
                ("4", (hidden,)),
                ("6", (32, hidden)),
            ):
                sd[f"{prefix}.{sub}.weight"] = torch.randn(shape, generator=g) * 0.3 + (1.0 if sub in "14" else 0.0)
                sd[f"{prefix}.{sub}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            key = name.replace(".", "_")
            sd[f"{key}_to_k.weight"] = module.to_k.weight + 0.05 * torch.randn(module.to_k.weight.shape, generator=g)
            sd[f"{key}_to_v.weight"] = module.to_v.weight + 0.05 * torch.randn(module.to_v.weight.shape, generator=g)
    return sd


class OfficialCrossAttention:
    """The official `inj_forward_crossattention`, heads folded into the batch; reads `self.context`."""

    def __init__(self, name: str, global_sd: dict, local_sd: dict):
        key = name.replace(".", "_")
        self.to_k_global, self.to_v_global = global_sd[f"{key}_to_k.weight"], global_sd[f"{key}_to_v.weight"]
        self.to_k_local, self.to_v_local = local_sd[f"{key}_to_k.weight"], local_sd[f"{key}_to_v.weight"]
        self.context: dict = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        context = self.context
        heads = attn.heads

        def to_heads(x):
            b, n, dim = x.shape
            return x.reshape(b, n, heads, dim // heads).permute(0, 2, 1, 3).reshape(b * heads, n, dim // heads)

        query = to_heads(attn.to_q(hidden_states))
        key = to_heads(context["CONTEXT_TENSOR"] @ self.to_k_global.T)
        value = to_heads(context["CONTEXT_TENSOR"] @ self.to_v_global.T)
        probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        out = probs @ value
        if "LOCAL" in context:
            key_local = to_heads(context["LOCAL"] @ self.to_k_local.T)
            value_local = to_heads(context["LOCAL"] @ self.to_v_local.T)
            probs_local = (query @ key_local.transpose(-1, -2) * attn.scale).softmax(dim=-1)
            index = context["LOCAL_INDEX"].reshape(-1, 1).repeat(1, heads).reshape(-1)
            w0_map = probs.permute(0, 2, 1)[torch.arange(index.shape[0]), index]
            w0_map = w0_map.unsqueeze(2) / w0_map.max()
            out = out + (probs_local * w0_map * context["LAMBDA"]) @ value_local
        b = out.shape[0] // heads
        out = out.reshape(b, heads, -1, out.shape[-1]).permute(0, 2, 1, 3).reshape(b, -1, heads * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def official_clip_view(image: Image.Image) -> torch.Tensor:
    """PIL bicubic to 224, ToTensor, the OpenAI normalisation."""
    x = torch.from_numpy(np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None])[None]


def official_taps(vision, pixels):
    out = vision(pixels, output_hidden_states=True)
    return [out[0], out.hidden_states[4], out.hidden_states[8], out.hidden_states[12], out.hidden_states[16]]


def test_paper_preset_on_converted_official_weights_is_the_official_inference(
    tmp_path, tiny_sd_path, tiny_image_encoder_path, data_dir
):
    """Convert official-layout checkpoints, encode a photo with its mask, generate 5 LMS steps with the paper
    preset: the latents equal the official `inference_local.py` loop, written out here."""
    from diffusers import LMSDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPVisionModel

    from encoders.convert_reference import main as convert
    from encoders.text_injection import encode_text_with_words
    from inference import ElitePipeline

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()
    gsd, lsd = official_state_dict(unet, 0), official_state_dict(unet, 1)
    torch.save(gsd, tmp_path / "global_mapper.pt")
    torch.save(lsd, tmp_path / "local_mapper.pt")
    convert(
        [
            "--global-mapper",
            str(tmp_path / "global_mapper.pt"),
            "--local-mapper",
            str(tmp_path / "local_mapper.pt"),
            "--out",
            str(tmp_path / "encoders"),
            "--base",
            str(tiny_sd_path),
            "--image-encoder",
            str(tiny_image_encoder_path),
        ]
    )
    photo = data_dir / "concepts" / "dreambooth" / "teapot" / "04.jpg"
    mask_file = data_dir / "concepts" / "masks" / "teapot_04.png"

    elite = ElitePipeline.from_pretrained(tiny_sd_path, encoders=tmp_path / "encoders", device="cpu", dtype="float32")
    elite.pipe.set_progress_bar_config(disable=True)
    concept = elite.encode_concept(photo, mask_file)
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    ours = elite(
        "a photo of S*",
        concept,
        preset="paper",
        num_inference_steps=5,
        latents=start.clone(),
        height=32,
        width=32,
        output_type="latent",
    ).images

    # the official loop (inference_local.py -> train_local.validation), on the same files
    image = Image.open(photo).convert("RGB")
    mask = np.asarray(Image.open(mask_file).convert("L")) > 0
    vision = CLIPVisionModel.from_pretrained(tiny_image_encoder_path).eval()
    feats = official_taps(vision, official_clip_view(image))
    w0 = plain_mlp_weights(lambda k: gsd[f"mapping_0.{k}"], feats[0][:, :1]) + plain_mlp_weights(
        lambda k: gsd[f"mapping_patch_0.{k}"], feats[0][:, 1:]
    ).mean(dim=1, keepdim=True)
    obj_feats = official_taps(vision, official_clip_view(Image.fromarray(np.asarray(image) * mask[..., None])))
    local = (
        sum(
            plain_mlp_weights(lambda k, i=i: lsd[f"mapping_{i}.{k}"], f[:, :1])
            + plain_mlp_weights(lambda k, i=i: lsd[f"mapping_patch_{i}.{k}"], f[:, 1:])
            for i, f in enumerate(obj_feats)
        )
        / 5
    )
    seg = F.interpolate(torch.from_numpy(mask).float()[None, None], (128, 128), mode="nearest")
    local = local * F.interpolate(seg, (16, 16), mode="nearest")[:, 0].reshape(1, -1, 1)

    tokenizer, (placeholder_id,) = elite.placeholder_tokenizer(["S*"])  # the official scripts add it to theirs
    text_encoder = elite.pipe.text_encoder
    ids = tokenizer(
        "a photo of S*", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    index = (ids[0] == placeholder_id).nonzero()[0]
    text = encode_text_with_words(text_encoder, ids, [placeholder_id], [w0]).hidden_states
    uncond = text_encoder(
        tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    )[0]
    processors = {
        name: OfficialCrossAttention(name[: -len(".processor")], gsd, lsd)
        for name in unet.attn_processors
        if ".attn2." in name
    }
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor({name: processors.get(name, AttnProcessor()) for name in unet.attn_processors})
    scheduler = LMSDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    scheduler.set_timesteps(5)
    latents = start * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        for p in processors.values():
            p.context = {"CONTEXT_TENSOR": text, "LOCAL": local, "LOCAL_INDEX": index, "LAMBDA": 0.8}
        noise_text = unet(model_input, t, encoder_hidden_states=text).sample
        for p in processors.values():
            p.context = {"CONTEXT_TENSOR": uncond}
        noise_uncond = unet(model_input, t, encoder_hidden_states=uncond).sample
        latents = scheduler.step(noise_uncond + 5 * (noise_text - noise_uncond), t, latents).prev_sample
    assert latents.abs().mean() > 0.1
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_a_stage_2_step_computes_the_official_loss(
    tmp_path, tiny_sd_path, tiny_image_encoder_path, tiny_encoders_path, crop_shards
):
    """train_local.py's loss on one batch: the error summed over latent channels per valid cell, plus
    1e-4 x the mean over cross-attention layers of mean |V_local|, with w0 from the unmasked crop."""
    from types import SimpleNamespace

    from encoders.common.config import load_config
    from encoders.text_injection import encode_text_with_words
    from training.local_mapping import LocalMappingConfig, LocalMappingTask

    config = load_config(
        LocalMappingConfig,
        None,
        [
            f"pretrained_model_name_or_path={tiny_sd_path}",
            f"image_encoder_name_or_path={tiny_image_encoder_path}",
            f"train_shards={crop_shards / 'coco' / '*.tar'}",
            f"output_dir={tmp_path / 'run'}",
            "train_batch_size=3",
            "mapping_hidden_dim=24",
            f"global_mapping_path={tiny_encoders_path}",
            "data.resolution=64",
            "dataloader_num_workers=0",
            "report_to=none",
        ],
    )
    assert config.data.scale_augment == "elite" and config.mse_reduction == "sum_channels"
    task = LocalMappingTask(config)
    task.setup(SimpleNamespace(device=torch.device("cpu")), torch.float32)
    batch = next(iter(task.train_dataloader()))
    seen = {}
    unet_forward = task.sd.unet.forward

    def recording(sample, timestep, encoder_hidden_states, **kwargs):
        out = unet_forward(sample, timestep, encoder_hidden_states, **kwargs)
        seen.update(text=encoder_hidden_states, pred=out.sample)
        return out

    add_noise = task.sd.add_noise

    def recording_noise(latents, generator):
        noisy, target, timesteps = add_noise(latents, generator)
        seen["target"] = target
        return noisy, target, timesteps

    task.sd.unet.forward, task.sd.add_noise = recording, recording_noise
    with torch.enable_grad():
        loss, logs = task.training_step({"local_mapping": task.local_mapping}, batch, torch.Generator().manual_seed(0))

    valid = batch["valid_mask"]
    mse = (((seen["pred"] - seen["target"]) ** 2 * valid).sum(dim=(1, 2, 3)) / valid.sum(dim=(1, 2, 3))).mean()
    object_feats = task.clip_features(batch, "clip_object_pixel_values")
    lm = task.local_mapping
    tokens = sum(
        plain_mlp(lm.cls_mappings[i], object_feats[layer][:, :1])
        + plain_mlp(lm.patch_mappings[i], object_feats[layer][:, 1:])
        for i, layer in enumerate(config.feature_layers)
    ) / len(config.feature_layers)
    grid = F.interpolate(batch["object_mask_clip"], (16, 16), mode="nearest").flatten(1)
    tokens = tokens * grid[..., None]
    values = [(tokens @ lm.key_value(name)[1].weight.T).abs().mean() for name in lm.kv_layer_names]
    regulariser = 1e-4 * torch.stack(values).mean()
    assert torch.allclose(loss.detach(), mse + regulariser, rtol=1e-5, atol=1e-7)
    # w0 came from the unmasked crop (the image view), injected at the placeholder
    image_feats = task.clip_features(batch, "clip_pixel_values")
    w0_layer = int(task.global_mapping.config.feature_layers[0])
    w0 = task.global_mapping([image_feats[w0_layer]], num_words=1)
    text = encode_text_with_words(task.sd.text_encoder, batch["input_ids"], task.placeholder_ids[0], [w0]).hidden_states
    assert torch.allclose(seen["text"], text, atol=1e-5)
    captions = batch["caption"]
    assert all(c.startswith(("a ", "a far away", "very small", "zoomed in", "close up")) for c in captions)
