"""Models and their building blocks: CLIP features, ELITE's mappings, attention processors, fine-tune layers."""

from encoders.common.image_processors import use_pil_image_processors

use_pil_image_processors()
