"""Lean inference: one concept photo (+ mask) and a prompt with S* -> images, zero optimisation steps.

Needs torch, diffusers, transformers, safetensors, huggingface_hub, PIL, numpy and `encoders` only
(never the training stack). Entry points:

- `ElitePipeline` (`inference.pipeline`): load a base pipeline + encoders, `encode_concept`, generate.
- `load_elite(pipe, encoders)` / `set_elite_scale(pipe, lam)` / `unload_elite(pipe)`: the same on a stock
  diffusers pipeline, as `load_ip_adapter` does (unloading restores the processors that were there).
- `Concept` (`inference.concept`): an encoded concept that saves to / loads from safetensors.
- `inference.methods`: every generation method (base, ELITE, TI, BaTex, Infusion) as one registry.
- `python -m inference generate|encode ...` (`inference.cli`); `zsp` over every stage (`inference.zsp`);
  evaluation in `inference.evaluation` (`python -m inference.evaluate`).

Attributes are imported lazily so `import inference` stays cheap.
"""

from __future__ import annotations

import importlib

import encoders  # noqa: F401  (first: installs transformers' image-processor log filter)

_EXPORTS = {
    "ElitePipeline": "inference.pipeline",
    "load_encoders": "inference.pipeline",
    "load_elite": "inference.pipeline",
    "set_elite_scale": "inference.pipeline",
    "unload_elite": "inference.pipeline",
    "Concept": "inference.concept",
    "ConceptInputError": "inference.inputs",
    "ConceptInputWarning": "inference.inputs",
    "ModelLoadError": "inference.loading",
    "load_base_pipeline": "inference.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
