"""transformers' PIL image processors, chosen on purpose: no torchvision, and no warning about its absence.

transformers 5 made `CLIPImageProcessor` (and its kin) the torchvision-backed class; without torchvision it uses the
PIL class (`CLIPImageProcessorPil`: the same preprocessing) and logs a warning each time a process first names the
old class, which diffusers does on import. This package does not depend on torchvision: a CPU install stays small,
and PyPI's torchvision wheel does not load against the CPU torch wheel (its `torchvision::nms` operator is missing).
So the PIL fallback is the intended path here, and the one log record that announces it is dropped; every other
transformers message passes. With torchvision installed, transformers uses it and logs nothing of the kind.
"""

from __future__ import annotations

import logging

FALLBACK_LOGGER = "transformers.utils.import_utils"
FALLBACK_MESSAGE = "requires torchvision (not installed); falling back to"


class DropPilFallbackNotice(logging.Filter):
    """A logging filter that drops transformers' "falling back to ...Pil" record and passes every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FALLBACK_MESSAGE not in record.getMessage()


def use_pil_image_processors() -> None:
    """Install the filter once on the transformers logger that announces the fallback (cheap: imports nothing)."""
    logger = logging.getLogger(FALLBACK_LOGGER)
    if not any(isinstance(f, DropPilFallbackNotice) for f in logger.filters):
        logger.addFilter(DropPilFallbackNotice())
