"""Convert the official ELITE checkpoints (`global_mapper.pt`, `local_mapper.pt`) into our encoders folder.

The reference implementation (csyxwei/ELITE) saves bare `torch.save(state_dict)` files keyed by
module path: `mapping_{i}.{0,1,3,4,6}.{weight,bias}` (the per-layer CLS MLPs),
`mapping_patch_{i}...` (the patch MLPs) and, for every UNet cross-attention layer,
`{module name with '.' -> '_'}_to_k.weight` / `_to_v.weight`. This turns them into
`global_mapping/` and `local_mapping/` folders (`config.json` + safetensors) that
`GlobalMapping.from_pretrained(out, subfolder="global_mapping")` loads, so users of the original
weights keep them; `local_mapping/config.json` holds the official computation settings
(`encoders.local_mapping.REFERENCE_SETTINGS`), so encoding and generating with the converted folder
reproduce the official inference. Files are read with `torch.load(weights_only=True)`: no code is
unpickled.

    python -m encoders.convert_reference --global-mapper global_mapper.pt --local-mapper local_mapper.pt \\
        --out encoders/elite-official [--base CompVis/stable-diffusion-v1-4] \\
        [--image-encoder openai/clip-vit-large-patch14]

Dimensions (image-encoder width, word width, hidden width, per-layer K/V shapes) are read from the
tensors; the tapped layers cannot be, so they default to the paper's 24, 4, 8, 12, 16 (`--layers`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .clip_features import DEFAULT_LAYERS
from .common.config import parse_keyed_args
from .common.files import atomic_directory, atomic_write_text
from .global_mapping import GlobalMapping, kv_key
from .local_mapping import REFERENCE_SETTINGS, LocalMapping

DEFAULT_BASE = "CompVis/stable-diffusion-v1-4"
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"

_MLP_KEY = re.compile(r"^mapping(_patch)?_(\d+)\.(\d+)\.(weight|bias)$")
_KV_KEY = re.compile(r"^(.+)_to_([kv])\.weight$")
_ATTN_NAME = re.compile(
    r"^(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_(\d+)_transformer_blocks_(\d+)_(attn\d+)$"
)
_MLP_LAYERS = (0, 1, 3, 4, 6)  # Linear, LayerNorm, (act), Linear, LayerNorm, (act), Linear


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint whose keys or shapes do not follow the ELITE mapper layout."""


def load_reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a reference `.pt` safely (`weights_only=True`) or a `.safetensors` file; unwrap `state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with code objects, truncated file, not a torch file
        raise ReferenceCheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({err})") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReferenceCheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def attention_name_from_reference(key: str) -> str:
    """A reference layer name in diffusers' dotted form.

    `down_blocks_0_attentions_0_transformer_blocks_0_attn2` -> `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    """
    m = _ATTN_NAME.match(key)
    if m is None:
        raise ReferenceCheckpointError(f"cannot read a UNet attention module from reference key prefix {key!r}")
    block, attention, transformer, attn = m.groups()
    block = block.replace("_blocks_", "_blocks.")
    return f"{block}.attentions.{attention}.transformer_blocks.{transformer}.{attn}"


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: str = "reference checkpoint"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reference mapper state dict -> (config kwargs, our state dict). Raises on unknown or missing keys."""
    cls_layers: dict[int, dict[str, torch.Tensor]] = {}
    patch_layers: dict[int, dict[str, torch.Tensor]] = {}
    kv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        m = _MLP_KEY.match(key)
        if m:
            patch, index, sub, kind = m.groups()
            if int(sub) not in _MLP_LAYERS:
                unknown.append(key)
                continue
            (patch_layers if patch else cls_layers).setdefault(int(index), {})[f"{sub}.{kind}"] = tensor
            continue
        m = _KV_KEY.match(key)
        if m:
            kv.setdefault(attention_name_from_reference(m.group(1)), {})[m.group(2)] = tensor
            continue
        unknown.append(key)
    if unknown:
        raise ReferenceCheckpointError(f"{source}: keys outside the ELITE mapper layout: {sorted(unknown)[:8]}")
    if not cls_layers:
        raise ReferenceCheckpointError(f"{source}: no mapping_{{i}} weights found; is this an ELITE mapper checkpoint?")
    num = len(cls_layers)
    if sorted(cls_layers) != list(range(num)) or sorted(patch_layers) != list(range(num)):
        raise ReferenceCheckpointError(
            f"{source}: mapping indices {sorted(cls_layers)} / mapping_patch indices {sorted(patch_layers)} "
            f"must both be 0..{num - 1}"
        )
    expected = {f"{i}.{kind}" for i in _MLP_LAYERS for kind in ("weight", "bias")}
    for group, layers in (("mapping", cls_layers), ("mapping_patch", patch_layers)):
        for i, params in layers.items():
            missing = expected - set(params)
            if missing:
                raise ReferenceCheckpointError(f"{source}: {group}_{i} lacks {sorted(missing)}")
    first = cls_layers[0]
    hidden_dim, input_dim = first["0.weight"].shape
    output_dim = first["6.weight"].shape[0]
    kv_layers = {}
    for name, pair in kv.items():
        if set(pair) != {"k", "v"}:
            raise ReferenceCheckpointError(f"{source}: {name} has only to_{''.join(pair)}")
        if pair["k"].shape != pair["v"].shape:
            raise ReferenceCheckpointError(
                f"{source}: {name} to_k {tuple(pair['k'].shape)} != to_v {tuple(pair['v'].shape)}"
            )
        inner, context = pair["k"].shape
        kv_layers[name] = [int(context), int(inner)]

    ours: dict[str, torch.Tensor] = {}
    for i in range(num):
        for sub, tensor in cls_layers[i].items():
            ours[f"cls_mappings.{i}.{sub}"] = tensor
        for sub, tensor in patch_layers[i].items():
            ours[f"patch_mappings.{i}.{sub}"] = tensor
    for name, pair in kv.items():
        ours[f"to_k.{kv_key(name)}.weight"] = pair["k"]
        ours[f"to_v.{kv_key(name)}.weight"] = pair["v"]
    config = dict(
        input_dim=int(input_dim),
        output_dim=int(output_dim),
        hidden_dim=int(hidden_dim),
        kv_layers={name: kv_layers[name] for name in sorted(kv_layers)},
        num_layers=num,
    )
    return config, ours


def convert_checkpoint(
    path: str | Path,
    kind: str,
    feature_layers: Sequence[int] = DEFAULT_LAYERS,
    pretrained_model_name_or_path: str | None = DEFAULT_BASE,
    image_encoder_name_or_path: str | None = DEFAULT_IMAGE_ENCODER,
) -> GlobalMapping | LocalMapping:
    """Load one reference checkpoint (`kind` = "global" | "local") as our model (fp32, strict load)."""
    cls = {"global": GlobalMapping, "local": LocalMapping}.get(kind)
    if cls is None:
        raise ValueError(f"kind must be 'global' or 'local', got {kind!r}")
    config, state = convert_state_dict(load_reference_state_dict(path), source=str(path))
    num = config.pop("num_layers")
    if len(feature_layers) != num:
        raise ReferenceCheckpointError(
            f"{path}: holds {num} per-layer mappings but {len(feature_layers)} feature layers were given "
            f"({list(feature_layers)})"
        )
    settings = dict(REFERENCE_SETTINGS) if kind == "local" else {}  # the official computation, written out
    model = cls(
        feature_layers=tuple(feature_layers),
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        image_encoder_name_or_path=image_encoder_name_or_path,
        **config,
        **settings,
    )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


def _model_card(out: Path, sources: dict[str, Path], base: str | None, image_encoder: str | None) -> str:
    rows = "\n".join(f"- `{sub}/` converted from `{src.name}`" for sub, src in sources.items())
    return f"""---
library_name: diffusers
tags: [elite, personalization, stable-diffusion]
---
# ELITE encoders (converted from the official checkpoints)

{rows}

Base model: `{base}`. Image encoder: `{image_encoder}`.
Converted with `python -m encoders.convert_reference`; weights unchanged (fp32 safetensors).
`local_mapping/config.json` records the official computation (whole photo, w0 from the unmasked image,
the object masked before resizing, masked local tokens as zeros in the softmax, w0's attention map
normalised by one max per sample); `--preset paper` samples as the official inference does.

```python
from encoders.global_mapping import GlobalMapping
from encoders.local_mapping import LocalMapping
gm = GlobalMapping.from_pretrained("{out.name}", subfolder="global_mapping")
lm = LocalMapping.from_pretrained("{out.name}", subfolder="local_mapping")
```
"""


def convert_reference(
    out_dir: str | Path,
    global_mapper: str | Path | None = None,
    local_mapper: str | Path | None = None,
    feature_layers: Sequence[int] = DEFAULT_LAYERS,
    pretrained_model_name_or_path: str | None = DEFAULT_BASE,
    image_encoder_name_or_path: str | None = DEFAULT_IMAGE_ENCODER,
) -> list[Path]:
    """Write `out_dir/global_mapping/` and/or `out_dir/local_mapping/` (+ README.md); return the folders."""
    if global_mapper is None and local_mapper is None:
        raise ValueError("give at least one of global_mapper / local_mapper")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, sources = [], {}
    for kind, path in (("global", global_mapper), ("local", local_mapper)):
        if path is None:
            continue
        model = convert_checkpoint(
            path, kind, feature_layers, pretrained_model_name_or_path, image_encoder_name_or_path
        )
        target = out_dir / f"{kind}_mapping"
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
        written.append(target)
        sources[target.name] = Path(path)
    atomic_write_text(
        out_dir / "README.md", _model_card(out_dir, sources, pretrained_model_name_or_path, image_encoder_name_or_path)
    )
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m encoders.convert_reference",
        description="Convert official ELITE global_mapper.pt / local_mapper.pt into an encoders folder.",
    )
    parser.add_argument("--global-mapper", type=Path, help="reference global_mapper.pt")
    parser.add_argument("--local-mapper", type=Path, help="reference local_mapper.pt")
    parser.add_argument("--out", type=Path, required=True, help="encoders folder to write")
    parser.add_argument("--base", default=DEFAULT_BASE, help="base model the weights were trained for (recorded)")
    parser.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER, help="image encoder (recorded)")
    parser.add_argument(
        "--layers",
        default=",".join(map(str, DEFAULT_LAYERS)),
        help="tapped CLIP layers, in word order (default %(default)s)",
    )
    args = parse_keyed_args(parser, argv)
    if args.global_mapper is None and args.local_mapper is None:
        parser.error("give --global-mapper and/or --local-mapper")
    try:
        layers = tuple(int(x) for x in args.layers.split(",") if x.strip())
    except ValueError:
        parser.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    try:
        written = convert_reference(
            args.out, args.global_mapper, args.local_mapper, layers, args.base, args.image_encoder
        )
    except (ReferenceCheckpointError, FileNotFoundError) as err:
        parser.error(str(err))
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
