"""Commands print no torchvision fallback warning; other transformers messages still pass (issue 27)."""

import logging
import subprocess
import sys

from encoders.common.image_processors import FALLBACK_LOGGER, use_pil_image_processors


def test_importing_diffusers_pipelines_prints_no_torchvision_notice():
    code = (
        "import inference\nfrom diffusers import StableDiffusionPipeline\nimport transformers\n"
        "print(transformers.CLIPImageProcessor.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "requires torchvision" not in done.stderr
    assert done.stdout.strip() in {"CLIPImageProcessor", "CLIPImageProcessorPil"}


def test_the_filter_drops_only_the_fallback_notice(caplog):
    use_pil_image_processors()
    use_pil_image_processors()  # installing twice keeps one filter
    logger = logging.getLogger(FALLBACK_LOGGER)
    assert len(logger.filters) == len({type(f) for f in logger.filters})
    with caplog.at_level(logging.WARNING, logger=FALLBACK_LOGGER):
        logger.warning("`XImageProcessor` requires torchvision (not installed); falling back to `XImageProcessorPil`")
        logger.warning("an unrelated warning")
    assert [r.getMessage() for r in caplog.records] == ["an unrelated warning"]
