"""Converting the official ELITE mapper checkpoints, on synthetic state dicts with the reference key layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from encoders.convert_reference import (
    ReferenceCheckpointError,
    attention_name_from_reference,
    convert_reference,
    main,
)
from encoders.global_mapping import GlobalMapping
from encoders.local_mapping import LocalMapping

IN, HID, OUT = 32, 40, 32
# the tiny UNet's cross-attention layers as the reference names them (diffusers 0.11 module paths, '.' -> '_')
REF_LAYERS = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn2": (32, 32),
    "up_blocks_1_attentions_0_transformer_blocks_0_attn2": (32, 32),
    "up_blocks_1_attentions_1_transformer_blocks_0_attn2": (32, 32),
    "mid_block_attentions_0_transformer_blocks_0_attn2": (32, 64),
}


def reference_state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(5):
        for prefix in (f"mapping_{i}", f"mapping_patch_{i}"):
            for sub, shape in (("0", (HID, IN)), ("1", (HID,)), ("3", (HID, HID)), ("4", (HID,)), ("6", (OUT, HID))):
                sd[f"{prefix}.{sub}.weight"] = torch.randn(shape, generator=g) * 0.2
                sd[f"{prefix}.{sub}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    for name, (ctx, inner) in REF_LAYERS.items():
        sd[f"{name}_to_k.weight"] = torch.randn(inner, ctx, generator=g)
        sd[f"{name}_to_v.weight"] = torch.randn(inner, ctx, generator=g)
    return sd


def reference_mlp(sd, prefix, x):
    """The reference Sequential, written functionally from its state dict."""
    x = F.leaky_relu(
        F.layer_norm(
            F.linear(x, sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"]),
            (HID,),
            sd[f"{prefix}.1.weight"],
            sd[f"{prefix}.1.bias"],
        )
    )
    x = F.leaky_relu(
        F.layer_norm(
            F.linear(x, sd[f"{prefix}.3.weight"], sd[f"{prefix}.3.bias"]),
            (HID,),
            sd[f"{prefix}.4.weight"],
            sd[f"{prefix}.4.bias"],
        )
    )
    return F.linear(x, sd[f"{prefix}.6.weight"], sd[f"{prefix}.6.bias"])


def test_reference_attention_names():
    assert attention_name_from_reference("mid_block_attentions_0_transformer_blocks_0_attn2") == (
        "mid_block.attentions.0.transformer_blocks.0.attn2"
    )
    assert attention_name_from_reference("up_blocks_3_attentions_2_transformer_blocks_0_attn2") == (
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    )
    with pytest.raises(ReferenceCheckpointError):
        attention_name_from_reference("conv_in")


def test_convert_global_and_local_checkpoints(tmp_path, tiny_sd_path):
    gsd, lsd = reference_state_dict(0), reference_state_dict(1)
    torch.save(gsd, tmp_path / "global_mapper.pt")
    torch.save(lsd, tmp_path / "local_mapper.pt")
    out = tmp_path / "encoders"
    main(
        [
            "--global-mapper",
            str(tmp_path / "global_mapper.pt"),
            "--local-mapper",
            str(tmp_path / "local_mapper.pt"),
            "--out",
            str(out),
            "--base",
            str(tiny_sd_path),
            "--image-encoder",
            "tiny/clip",
        ]
    )
    assert (out / "README.md").is_file()
    gm = GlobalMapping.from_pretrained(out, subfolder="global_mapping")
    lm = LocalMapping.from_pretrained(out, subfolder="local_mapping")
    assert (gm.config.input_dim, gm.config.hidden_dim, gm.config.output_dim) == (IN, HID, OUT)
    assert gm.config.pretrained_model_name_or_path == str(tiny_sd_path)
    assert gm.config.image_encoder_name_or_path == "tiny/clip"
    assert list(gm.config.feature_layers) == [24, 4, 8, 12, 16]
    from encoders.local_mapping import REFERENCE_SETTINGS

    assert lm.settings == REFERENCE_SETTINGS  # the official computation, written into local_mapping/config.json

    feats = [torch.randn(2, 257, IN) for _ in range(5)]
    with torch.no_grad():
        words = gm(feats)
        expected = torch.cat(
            [
                reference_mlp(gsd, f"mapping_{i}", f[:, :1])
                + reference_mlp(gsd, f"mapping_patch_{i}", f[:, 1:]).mean(1, keepdim=True)
                for i, f in enumerate(feats)
            ],
            dim=1,
        )
        local = lm(feats).tokens
        expected_local = (
            sum(
                reference_mlp(lsd, f"mapping_{i}", f[:, :1]) + reference_mlp(lsd, f"mapping_patch_{i}", f[:, 1:])
                for i, f in enumerate(feats)
            )
            / 5
        )
    assert torch.allclose(words, expected, atol=1e-5) and words.shape == (2, 5, OUT)
    assert torch.allclose(local, expected_local, atol=1e-5)

    # K/V land on the right UNet layers, and the converted models match the tiny UNet's names
    from diffusers import UNet2DConditionModel

    from encoders.attention import cross_attention_layers, set_elite_processors

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    assert set(gm.kv_layer_names) == set(cross_attention_layers(unet))
    to_k, to_v = gm.key_value("mid_block.attentions.0.transformer_blocks.0.attn2.processor")
    assert torch.equal(to_k.weight, gsd["mid_block_attentions_0_transformer_blocks_0_attn2_to_k.weight"])
    assert torch.equal(
        lm.key_value("up_blocks.1.attentions.1.transformer_blocks.0.attn2")[1].weight,
        lsd["up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v.weight"],
    )
    set_elite_processors(unet, gm, lm)  # installs without missing-layer errors


def test_bad_reference_files_are_named(tmp_path):
    bad = reference_state_dict(0)
    bad["unexpected.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ReferenceCheckpointError, match=r"bad\.pt.*unexpected\.weight"):
        convert_reference(tmp_path / "out", global_mapper=tmp_path / "bad.pt")

    partial = reference_state_dict(0)
    del partial["mapping_patch_3.4.bias"]
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ReferenceCheckpointError, match="mapping_patch_3 lacks"):
        convert_reference(tmp_path / "out", global_mapper=tmp_path / "partial.pt")

    torch.save({"x": Path("arbitrary object")}, tmp_path / "code.pt")  # a pickled class: refused unread
    with pytest.raises(ReferenceCheckpointError, match="weights-only"):
        convert_reference(tmp_path / "out", global_mapper=tmp_path / "code.pt")

    with pytest.raises(ReferenceCheckpointError, match="5 per-layer mappings but 3 feature layers"):
        torch.save(reference_state_dict(0), tmp_path / "ok.pt")
        convert_reference(tmp_path / "out", global_mapper=tmp_path / "ok.pt", feature_layers=(24, 4, 8))
    assert not (tmp_path / "out" / "global_mapping").exists()  # nothing half-written
