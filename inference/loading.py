"""Load the base Stable Diffusion pipeline (a diffusers folder or Hub id) for inference.

Device and dtype are chosen once here ("auto": CUDA if present, else Apple MPS, else CPU; fp16 on
CUDA, fp32 elsewhere, since fp16 is not supported on CPU) and everything else follows the pipeline's
`device` / `dtype`. Samplers can be picked by short name (`lms` is ELITE's) or swapped in by the user
afterwards (`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`): nothing in this
package assumes a particular scheduler.
"""

from __future__ import annotations

from pathlib import Path

import torch

# short name -> diffusers scheduler class name; built with `from_config(pipe.scheduler.config)`
SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",  # ELITE's sampler (100 steps, guidance 5 in the paper)
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",  # SD v1-4's default
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` dtype keyword: `dtype` where diffusers has it (it deprecates `torch_dtype`)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


class ModelLoadError(RuntimeError):
    """A base model or encoders folder/Hub repo that cannot be loaded or does not fit; says which and why."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto"/None -> cuda if available, else mps, else cpu; anything else as given."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto"/None -> fp16 on CUDA, fp32 elsewhere; fp16 on CPU is refused with a clear error."""
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


def make_scheduler(name: str, base_config):
    """Build a diffusers scheduler by short name (see SCHEDULERS) from the pipeline's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config)


def load_base_pipeline(
    name_or_path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    scheduler: str | None = None,
    safety_checker: bool = True,
):
    """A `StableDiffusionPipeline` from a diffusers folder or Hub id, on `device` in `dtype`.

    `scheduler` replaces the folder's sampler by short name (None keeps it). `safety_checker=False`
    skips loading the model's safety checker (when it has one), as diffusers allows.
    """
    from diffusers import StableDiffusionPipeline

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kwargs = dtype_kwargs(dtype)
    if not safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    local = Path(name_or_path)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(f"base model {local}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load the base pipeline {name_or_path!s}: {err}") from err
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.vae.eval()
    return pipe


def default_image_size(pipe) -> tuple[int, int]:
    """(height, width) the pipeline generates by default: UNet sample size x the VAE's scale factor."""
    sample = pipe.unet.config.sample_size
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor
