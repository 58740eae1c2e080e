"""ELITE's global mapping network: multi-layer CLIP image features -> N word embeddings (w0 first).

For tapped layer i (`feature_layers`, default 24, 4, 8, 12, 16) word i is

    w_i = MLP_i(CLS_i) + mean over patches of MLP'_i(patch_i)

with each MLP `Linear -> LayerNorm -> LeakyReLU -> Linear -> LayerNorm -> LeakyReLU -> Linear`
(hidden width `hidden_dim`, 1024 in the paper). w0, from the deepest layer, is the editable word used
at inference; w1..w4 only soak up background during training.

The model also owns the *global* key/value projections trained jointly with it: one bias-free
`to_k`/`to_v` pair per UNet cross-attention layer, initialised as copies of the frozen ones and used
on all text (conditional and unconditional) by `encoders.attention.EliteAttnProcessor`. So
`global_mapping/` alone restores the whole global branch.

    gm = GlobalMapping.from_unet(unet, input_dim=clip.hidden_size,
                                 pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4",
                                 image_encoder_name_or_path="openai/clip-vit-large-patch14")
    words = gm(clip.encode(images))          # [B, 5, 768]; words[:, 0] is w0
    gm.save_pretrained("encoders/global_mapping")   # config.json + diffusion_pytorch_model.safetensors
    gm = GlobalMapping.from_pretrained("user/elite-encoders", subfolder="global_mapping")

Config keys: `input_dim` (image encoder width), `output_dim` (text embedding width), `hidden_dim`,
`feature_layers`, `kv_layers` ({attention module name: [context_dim, inner_dim]}: the UNet
cross-attention layers the K/V projections belong to), `pretrained_model_name_or_path` and
`image_encoder_name_or_path` (what it was trained for). Processors look projections up with
`key_value(name)`, by attention module name or processor name (`...attn2.processor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import cross_attention_layers, module_name_of
from .clip_features import DEFAULT_LAYERS


def mapping_mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """The 3-layer MLP of both ELITE mappings; indices 0/1/3/4/6 match the reference checkpoints."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, output_dim),
    )


def kv_key(name: str) -> str:
    """Module-dict key of a cross-attention layer: its module name with '.' -> '_' (the reference's keys)."""
    return module_name_of(name).replace(".", "_")


class KeyValueProjections:
    """Mixin for models that own per-layer K/V projections (`self.to_k` / `self.to_v` ModuleDicts)."""

    to_k: nn.ModuleDict
    to_v: nn.ModuleDict

    def _build_kv(self, kv_layers: Mapping[str, Sequence[int]] | None) -> None:
        """One bias-free `to_k`/`to_v` pair per layer, registered in sorted name order.

        The order is canonical on purpose: `config.json` is written with sorted keys, so a model
        loaded from disk sees its layers sorted whatever order it was built with; registering them
        sorted here gives a fresh and a loaded model the same parameter order (which optimizer
        states, DeepSpeed partitions and checkpoints are keyed by).
        """
        self.to_k = nn.ModuleDict()
        self.to_v = nn.ModuleDict()
        for name, dims in sorted((kv_layers or {}).items()):
            if len(dims) != 2:
                raise ValueError(f"kv_layers[{name!r}] must be [context_dim, inner_dim], got {dims}")
            context_dim, inner_dim = int(dims[0]), int(dims[1])
            self.to_k[kv_key(name)] = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v[kv_key(name)] = nn.Linear(context_dim, inner_dim, bias=False)

    @property
    def kv_layer_names(self) -> list[str]:
        """Attention module names (e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`)."""
        return list((self.config.kv_layers or {}).keys())

    def key_value(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        """`(to_k, to_v)` of one cross-attention layer, by module name or processor name."""
        key = kv_key(name)
        if key not in self.to_k:
            raise KeyError(
                f"{type(self).__name__} has no K/V projections for {module_name_of(name)!r}; "
                f"it was built for {len(self.to_k)} layers such as {self.kv_layer_names[:2]}"
            )
        return self.to_k[key], self.to_v[key]

    @torch.no_grad()
    def init_kv_from_unet(self, unet: nn.Module) -> None:
        """Copy each layer's frozen `to_k`/`to_v` weights from the UNet (the paper's initialisation)."""
        modules = dict(unet.named_modules())
        for name in self.kv_layer_names:
            attn = modules.get(name)
            if attn is None:
                raise KeyError(f"the UNet has no attention module {name!r} (was this model built for another UNet?)")
            to_k, to_v = self.key_value(name)
            if to_k.weight.shape != attn.to_k.weight.shape or to_v.weight.shape != attn.to_v.weight.shape:
                raise ValueError(
                    f"{name}: UNet to_k/to_v are {tuple(attn.to_k.weight.shape)}/{tuple(attn.to_v.weight.shape)}, "
                    f"ours {tuple(to_k.weight.shape)}/{tuple(to_v.weight.shape)}"
                )
            to_k.weight.copy_(attn.to_k.weight)
            to_v.weight.copy_(attn.to_v.weight)


class MappingFitError(ValueError):
    """A mapping used with a base model or image encoder of other shapes than it was trained for."""


def _check_features(features: Sequence[torch.Tensor], count: int, dim: int, who: str) -> None:
    if len(features) != count:
        raise ValueError(f"{who} expects {count} feature tensors (one per tapped layer), got {len(features)}")
    for i, f in enumerate(features):
        if f.ndim != 3 or f.shape[-1] != dim or f.shape[1] < 2:
            raise ValueError(f"{who}: feature {i} must be [B, 1 + patches, {dim}], got {tuple(f.shape)}")


class MappingModel(ModelMixin, ConfigMixin, KeyValueProjections):
    """What both ELITE mappings are: per tapped CLIP layer a CLS-token MLP and a patch-token MLP (the
    reference's layout), plus per-layer K/V projections; subclasses define `forward`."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        input_dim: int = 1024,
        output_dim: int = 768,
        hidden_dim: int = 1024,
        feature_layers: Sequence[int] = DEFAULT_LAYERS,
        kv_layers: dict[str, list[int]] | None = None,
        pretrained_model_name_or_path: str | None = None,
        image_encoder_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        if len(feature_layers) < 1:
            raise ValueError("feature_layers must name at least one image-encoder layer")
        self.cls_mappings = nn.ModuleList(mapping_mlp(input_dim, hidden_dim, output_dim) for _ in feature_layers)
        self.patch_mappings = nn.ModuleList(mapping_mlp(input_dim, hidden_dim, output_dim) for _ in feature_layers)
        self._build_kv(kv_layers)

    def check_fits(self, unet: nn.Module, text_dim: int | None = None, image_dim: int | None = None) -> None:
        """Raise `MappingFitError` unless this mapping was made for these shapes.

        Checks the word width against the text encoder's (`text_dim`), the feature width against
        the image encoder's (`image_dim`), and that the K/V projections cover exactly the UNet's
        cross-attention layers with their (context_dim, inner_dim): what a folder trained for
        another base model gets wrong. The message says what it was made for.
        """
        made_for = self.config.pretrained_model_name_or_path or "an unrecorded base model"
        who = type(self).__name__
        if text_dim is not None and int(self.config.output_dim) != int(text_dim):
            raise MappingFitError(
                f"{who} makes word embeddings of size {self.config.output_dim} but the text encoder uses {text_dim}: "
                f"it was trained for {made_for}"
            )
        if image_dim is not None and int(self.config.input_dim) != int(image_dim):
            raise MappingFitError(
                f"{who} reads image features of width {self.config.input_dim} but the image encoder gives {image_dim}: "
                f"use the image encoder it was trained with ({self.config.image_encoder_name_or_path or 'unrecorded'})"
            )
        unet_layers = {name: tuple(dims) for name, dims in cross_attention_layers(unet).items()}
        theirs = {name: tuple(int(d) for d in dims) for name, dims in (self.config.kv_layers or {}).items()}
        missing, extra = sorted(set(unet_layers) - set(theirs)), sorted(set(theirs) - set(unet_layers))
        if missing or extra:
            raise MappingFitError(
                f"{who} has K/V projections for {len(theirs)} cross-attention layers but this UNet has "
                f"{len(unet_layers)} (missing e.g. {missing[:1]}, unknown e.g. {extra[:1]}); it was trained for "
                f"{made_for}"
            )
        wrong = [(n, theirs[n], unet_layers[n]) for n in sorted(unet_layers) if theirs[n] != unet_layers[n]]
        if wrong:
            name, got, want = wrong[0]
            raise MappingFitError(
                f"{who} layer {name} projects {got[0]} -> {got[1]} but this UNet's layer is {want[0]} -> {want[1]}; "
                f"it was trained for {made_for}"
            )

    @classmethod
    def from_unet(cls, unet: nn.Module, input_dim: int, output_dim: int | None = None, **config):
        """A fresh model whose K/V projections cover `unet`'s cross-attention layers, copied from it."""
        layers = cross_attention_layers(unet)
        if output_dim is None:
            output_dim = next(iter(layers.values()))[0]
        kv_layers = {k: list(layers[k]) for k in sorted(layers)}  # as config.json stores it (sorted keys)
        model = cls(input_dim=input_dim, output_dim=output_dim, kv_layers=kv_layers, **config)
        model.init_kv_from_unet(unet)
        return model


class GlobalMapping(MappingModel):
    """CLIP features of tapped layers -> words `[B, len(feature_layers), output_dim]`, plus global K/V."""

    @property
    def num_words(self) -> int:
        return len(self.cls_mappings)

    def forward(self, features: Sequence[torch.Tensor], num_words: int | None = None) -> torch.Tensor:
        """`features`: one `[B, 1 + P, input_dim]` tensor per tapped layer -> words `[B, N, output_dim]`.

        `num_words=1` computes w0 only (inference and the local stage need nothing else); then only
        the first feature tensor is read, so `features` may hold just the deepest layer.
        """
        n = self.num_words if num_words is None else int(num_words)
        if not 1 <= n <= self.num_words:
            raise ValueError(f"num_words must be in 1..{self.num_words}, got {num_words}")
        if n == self.num_words:
            _check_features(features, n, self.config.input_dim, "GlobalMapping")
        else:
            _check_features(list(features)[:n], n, self.config.input_dim, "GlobalMapping")
        dtype = self.cls_mappings[0][0].weight.dtype
        words = []
        for cls_mlp, patch_mlp, f in zip(self.cls_mappings[:n], self.patch_mappings[:n], features[:n]):
            f = f.to(dtype)
            # mean over patches of MLP'(patch): the last layer is affine, so average before it (same value,
            # one [B, 1, hidden] product instead of [B, P, hidden]: ~1/4 of the patch MLP's work for SD v1)
            pooled = patch_mlp[:-1](f[:, 1:]).mean(dim=1, keepdim=True)
            words.append(cls_mlp(f[:, :1]) + patch_mlp[-1](pooled))
        return torch.cat(words, dim=1)
