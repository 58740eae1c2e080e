"""The concept object: what one encode of a photo gives, saved once and reused for many prompts.

A `Concept` holds ELITE's primary word w0 (`[text_dim]`, injected at the placeholder token) and,
when the encoders have a local mapping, the masked local tokens (`[num_tokens, text_dim]`) with their
keep-mask (`[num_tokens]`, False where the object mask is empty). Metadata says which encoders,
base model and image encoder made it and from which photo, so a concept is never silently used with
encoders it was not made for.

The file format is one safetensors file: tensors `w0`, optionally `local_tokens` and `local_keep`
(uint8) and `preview` (a small uint8 `[H, W, 3]` picture of what was encoded, for grids), and the metadata as string
entries of the safetensors header (`format` = "zsp-concept/1").
Writes are atomic (temporary name, then rename). Loading never unpickles anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from encoders.common.files import atomic_write
from encoders.common.hub import HubFetchError, local_or_hub

CONCEPT_FORMAT = "zsp-concept/1"


class ConceptFileError(ValueError):
    """A concept file that cannot be read or was not written by this package; names the file."""


@dataclass
class Concept:
    """One encoded concept (see the module docstring). Tensors live on any device/dtype; `to()` moves them."""

    w0: torch.Tensor
    local_tokens: torch.Tensor | None = None
    local_keep: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    preview: torch.Tensor | None = None  # uint8 [H, W, 3]: the encoded crop, background dimmed

    def __post_init__(self) -> None:
        if self.w0.ndim != 1:
            raise ValueError(f"w0 must be one word embedding [text_dim], got shape {tuple(self.w0.shape)}")
        for name, tensor in (("w0", self.w0), ("local_tokens", self.local_tokens)):
            if tensor is None:
                continue
            if not tensor.is_floating_point():
                raise ValueError(f"{name} must hold floating-point numbers, got {tensor.dtype}")
            if not bool(torch.isfinite(tensor).all()):  # NaN/Inf would render black images without a word
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{name} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the file is damaged")
        if self.local_tokens is not None:
            if self.local_tokens.ndim != 2 or self.local_tokens.shape[-1] != self.w0.shape[-1]:
                raise ValueError(
                    f"local_tokens must be [num_tokens, {self.w0.shape[-1]}], got {tuple(self.local_tokens.shape)}"
                )
            if self.local_keep is None:
                self.local_keep = torch.ones(self.local_tokens.shape[0], dtype=torch.bool, device=self.w0.device)
            if self.local_keep.shape != self.local_tokens.shape[:1]:
                raise ValueError(
                    f"local_keep must be [{self.local_tokens.shape[0]}], got {tuple(self.local_keep.shape)}"
                )
            self.local_keep = self.local_keep.bool()
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}
        if self.preview is not None and (self.preview.ndim != 3 or self.preview.shape[-1] != 3):
            raise ValueError(f"preview must be an RGB picture [H, W, 3], got {tuple(self.preview.shape)}")

    @property
    def text_dim(self) -> int:
        return int(self.w0.shape[-1])

    @property
    def has_local(self) -> bool:
        return self.local_tokens is not None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Concept:
        """A copy with the float tensors on `device` / in `dtype` (the keep-mask stays bool)."""
        local = None if self.local_tokens is None else self.local_tokens.to(device=device, dtype=dtype)
        keep = None if self.local_keep is None else self.local_keep.to(device=device)
        return Concept(self.w0.to(device=device, dtype=dtype), local, keep, dict(self.metadata), self.preview)

    def save(self, path: str | Path) -> Path:
        """Write the concept as one safetensors file (atomically); returns the path."""
        path = Path(path)
        tensors = {"w0": self.w0.detach().cpu().contiguous()}
        if self.local_tokens is not None:
            tensors["local_tokens"] = self.local_tokens.detach().cpu().contiguous()
            tensors["local_keep"] = self.local_keep.detach().cpu().to(torch.uint8).contiguous()
        if self.preview is not None:
            tensors["preview"] = self.preview.detach().cpu().to(torch.uint8).contiguous()
        header = {"format": CONCEPT_FORMAT, **self.metadata}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> Concept:
        """Read a concept written by `save` (a file, or `user/repo/path/in/repo.safetensors` on the Hub);
        a clear `ConceptFileError` for anything else."""
        path = _fetch_concept_file(path)
        if not path.is_file():
            raise ConceptFileError(f"concept file {path}: no such file")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                header = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise ConceptFileError(f"concept file {path}: not a readable safetensors file ({err})") from err
        if header.pop("format", None) != CONCEPT_FORMAT or "w0" not in tensors:
            raise ConceptFileError(f"concept file {path}: not a concept file (expected format {CONCEPT_FORMAT!r})")
        keep = tensors.get("local_keep")
        try:
            return cls(
                tensors["w0"],
                tensors.get("local_tokens"),
                None if keep is None else keep.bool(),
                header,
                tensors.get("preview"),
            )
        except ValueError as err:  # a hand-edited file whose tensors do not fit together
            raise ConceptFileError(f"concept file {path}: {err}") from err

    def preview_image(self):
        """The preview as a PIL image (None when the concept has none)."""
        return None if self.preview is None else Image.fromarray(self.preview.cpu().numpy())

    def describe(self) -> str:
        """One line for logs: dimensions and origin."""
        local = f", {int(self.local_keep.sum())}/{self.local_tokens.shape[0]} local tokens" if self.has_local else ""
        origin = self.metadata.get("source_image", "?")
        return f"concept from {origin}: w0[{self.text_dim}]{local}"


def _fetch_concept_file(path: str | Path) -> Path:
    """A local path as it is; `user/repo/file.safetensors` (no such local file) from the Hub, cached."""
    if len(str(path).split("/")) < 3 or str(path).startswith("/"):
        return Path(path)
    try:
        return local_or_hub(path)
    except HubFetchError as err:
        raise ConceptFileError(f"concept file {path}: not a local file, and not found on the Hub ({err})") from err
