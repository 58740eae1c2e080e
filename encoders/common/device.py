"""Where to compute and in which precision: one place for every command of the project.

"auto" means CUDA if present, else Apple MPS, else the CPU; fp16 on CUDA, fp32 elsewhere. fp16 on
the CPU is refused with a clear error (PyTorch's CPU kernels do not support it); bf16 works on both.
`dtype_kwargs` gives the `from_pretrained` keyword for a dtype in the installed diffusers version.
"""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto"/None -> cuda if available, else mps, else cpu; anything else as given."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """ "auto"/None -> fp16 on CUDA, fp32 elsewhere; fp16 on CPU is refused with a clear error."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype is None or dtype == "auto":
        chosen = torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and chosen == torch.float16:
        raise ValueError("float16 is not supported on CPU; use float32 or bfloat16 there")
    return chosen


def mixed_precision_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype frozen models are stored in for accelerate's `mixed_precision` ("no", "fp16", "bf16")."""
    return MIXED_PRECISION_DTYPES.get(str(mixed_precision or "no"), torch.float32)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` dtype keyword: `dtype` where diffusers has it (it deprecates `torch_dtype`)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
