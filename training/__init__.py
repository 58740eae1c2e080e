"""Trainers on one shared loop (`training.loop`): ELITE's two stages, the location MLP, the fine-tunes, the world."""

import encoders  # noqa: F401  (first: installs transformers' image-processor log filter)
