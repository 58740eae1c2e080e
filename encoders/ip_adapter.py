"""IP-Adapter's trainable parts, trained here and exported in the layout diffusers and ComfyUI load.

IP-Adapter ("IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
Ye, Zhang, Liu, Han and Yang, 2023) conditions a frozen UNet on an image through *decoupled
cross-attention*: every cross-attention layer keeps its text attention and adds a second one over
image tokens, with its own key/value projections, weighted by a scale:

    Z = softmax(Q K^T / sqrt(d)) V  +  scale * softmax(Q K_ip^T / sqrt(d)) V_ip,
    K_ip = c_i W_k_ip,  V_ip = c_i W_v_ip,  Q from the frozen to_q,

then the frozen `to_out`. The image tokens `c_i` come from a projection of a frozen CLIP image
encoder's output:
- `variant="base"`: the pooled, projected `image_embeds` -> Linear -> 4 tokens -> LayerNorm
  (diffusers' `ImageProjection`, the official `ImageProjModel`);
- `variant="plus"`: the penultimate hidden states (all patches) -> a 4-layer perceiver resampler with
  16 learned queries of width 64 x `plus_heads` (diffusers' `IPAdapterPlusImageProjection`, the
  official `Resampler`).
`W_k_ip` / `W_v_ip` start as copies of the layer's frozen `to_k` / `to_v` (the official training script).

`IPAdapter.install(unet)` puts diffusers' own `IPAdapterAttnProcessor2_0` on the cross-attention layers,
holding this module's projections, and the projection on `unet.encoder_hid_proj`: training runs exactly
the code `pipe.load_ip_adapter` sets up. `official_state_dict()` gives the single-file layout
(`image_proj.*`, `ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`) that `load_ip_adapter` and ComfyUI read.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import cross_attention_layers, module_name_of

VARIANTS = ("base", "plus")
BASE_TOKENS = 4  # diffusers' loader reads a base IP-Adapter as 4 tokens (the official number)
PLUS_DEPTH = 4  # the official resampler's depth; diffusers' key conversion handles exactly 4 layers
PLUS_DIM_HEAD = 64  # diffusers reads the head count as to_q's width / 64
EXPORT_FILE = "ip_adapter.safetensors"


class IPAdapter(ModelMixin, ConfigMixin):
    """Image projection + one `to_k_ip` / `to_v_ip` pair per UNet cross-attention layer (in
    `unet.attn_processors` order); saved with `save_pretrained`, exported with `official_state_dict`."""

    @register_to_config
    def __init__(
        self,
        layer_names: list[str],
        layer_widths: list[int],
        cross_attention_dim: int,
        image_embed_dim: int,
        variant: str = "base",
        num_tokens: int = BASE_TOKENS,
        plus_heads: int = 12,
        image_encoder_name_or_path: str | None = None,
        pretrained_model_name_or_path: str | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if len(layer_names) != len(layer_widths) or not layer_names:
            raise ValueError("give one width per cross-attention layer (and at least one layer)")
        if variant == "base":
            if num_tokens != BASE_TOKENS:
                raise ValueError(
                    f"the base variant has {BASE_TOKENS} image tokens (as diffusers reads it), not {num_tokens}"
                )
            self.image_proj = ImageProjection(
                image_embed_dim=image_embed_dim,
                cross_attention_dim=cross_attention_dim,
                num_image_text_embeds=num_tokens,
            )
        else:
            self.image_proj = IPAdapterPlusImageProjection(
                embed_dims=image_embed_dim,
                output_dims=cross_attention_dim,
                hidden_dims=PLUS_DIM_HEAD * plus_heads,
                depth=PLUS_DEPTH,
                dim_head=PLUS_DIM_HEAD,
                heads=plus_heads,
                num_queries=num_tokens,
                ffn_ratio=4,
            )
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_attention_dim, w, bias=False) for w in layer_widths)
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_attention_dim, w, bias=False) for w in layer_widths)

    @classmethod
    def from_unet(cls, unet: nn.Module, image_embed_dim: int, **kwargs) -> IPAdapter:
        """Sized for `unet`, the image K/V projections initialised from each layer's frozen to_k / to_v."""
        layers = cross_attention_layers(unet)
        context_dims = {dim for dim, _ in layers.values()}
        if len(context_dims) != 1:
            raise ValueError(f"the UNet's cross-attention layers read contexts of widths {sorted(context_dims)}")
        model = cls(
            layer_names=list(layers),
            layer_widths=[inner for _, inner in layers.values()],
            cross_attention_dim=context_dims.pop(),
            image_embed_dim=image_embed_dim,
            **kwargs,
        )
        with torch.no_grad():
            for i, name in enumerate(layers):
                attn = unet.get_submodule(name)
                model.to_k_ip[i].weight.copy_(attn.to_k.weight.float())
                model.to_v_ip[i].weight.copy_(attn.to_v.weight.float())
        return model

    @property
    def wants_hidden_states(self) -> bool:
        """The plus variant reads the image encoder's penultimate hidden states, the base one its image_embeds."""
        return self.config.variant == "plus"

    def install(self, unet: nn.Module, scale: float = 1.0) -> dict:
        """diffusers' IP-Adapter processors on `unet`'s cross-attention layers, holding this module's
        projections (not copies: training updates them), and this projection as `unet.encoder_hid_proj`."""
        names = [module_name_of(n) for n in unet.attn_processors]
        cross = {name: i for i, name in enumerate(self.config.layer_names)}
        missing = sorted(set(cross) - set(names))
        if missing:
            raise ValueError(f"this IP-Adapter was made for another UNet: it has no layers {missing[:3]}")
        processors = {}
        for name in unet.attn_processors:
            layer = module_name_of(name)
            if layer not in cross:
                processors[name] = AttnProcessor2_0()
                continue
            i = cross[layer]
            proc = IPAdapterAttnProcessor2_0(
                hidden_size=self.config.layer_widths[i],
                cross_attention_dim=self.config.cross_attention_dim,
                num_tokens=(self.config.num_tokens,),
                scale=scale,
            )
            proc.to_k_ip = nn.ModuleList([self.to_k_ip[i]])
            proc.to_v_ip = nn.ModuleList([self.to_v_ip[i]])
            processors[name] = proc
        unet.set_attn_processor(dict(processors))
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_proj])
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        return processors

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-file layout of the official release (`image_proj.*`, `ip_adapter.N.to_k_ip.weight`),
        which diffusers' `load_ip_adapter` and ComfyUI's IP-Adapter nodes read. Layer i is `ip_adapter.{2i+1}`:
        the official code numbers every attention processor and only the odd (cross) ones hold weights."""
        proj = {k: v.detach().float().cpu().contiguous() for k, v in self.image_proj.state_dict().items()}
        if self.config.variant == "base":
            image_proj = {k.replace("image_embeds.", "proj."): v for k, v in proj.items()}
        else:
            image_proj = resampler_to_official(proj)
        out = {f"image_proj.{k}": v for k, v in image_proj.items()}
        for i in range(len(self.to_k_ip)):
            out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = self.to_k_ip[i].weight.detach().float().cpu().contiguous()
            out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = self.to_v_ip[i].weight.detach().float().cpu().contiguous()
        return out


def resampler_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' `IPAdapterPlusImageProjection` keys -> the official `Resampler`'s (the inverse of diffusers'
    conversion): per layer `ln0/ln1` -> `0.norm1/0.norm2`, `attn.to_q` -> `0.to_q`, `attn.to_k` + `attn.to_v`
    -> `0.to_kv` (stacked), `attn.to_out.0` -> `0.to_out`, `ff.0` -> `1.0`, `ff.1.net.0.proj` -> `1.1`,
    `ff.1.net.2` -> `1.3`; `latents`, `proj_in`, `proj_out`, `norm_out` keep their names."""
    renames = {
        "ln0.": "0.norm1.",
        "ln1.": "0.norm2.",
        "attn.to_q.": "0.to_q.",
        "attn.to_out.0.": "0.to_out.",
        "ff.0.": "1.0.",
        "ff.1.net.0.proj.": "1.1.",
        "ff.1.net.2.": "1.3.",
    }
    out = {}
    for key, value in state.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, index, rest = key.split(".", 2)
        if rest.startswith("attn.to_v."):
            continue
        if rest.startswith("attn.to_k."):
            tail = rest[len("attn.to_k.") :]
            out[f"layers.{index}.0.to_kv.{tail}"] = torch.cat([value, state[f"layers.{index}.attn.to_v.{tail}"]], dim=0)
            continue
        for old, new in renames.items():
            if rest.startswith(old):
                out[f"layers.{index}.{new}{rest[len(old) :]}"] = value
                break
        else:
            raise KeyError(f"unexpected resampler weight {key!r}")
    return out
