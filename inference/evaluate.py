"""`python -m inference.evaluate`: the command of the evaluation room (`inference.evaluation`), kept at its
old name. The names below are the room's, importable from here as before."""

import sys

from .evaluation.config import EvalConfig, protocol_config
from .evaluation.evaluator import Evaluator, evaluate, main
from .evaluation.plan import ConceptFolder, Row, Run, resolve_concepts_and_runs
from .evaluation.prompts import (
    COI_OBJECTS,
    COI_TEMPLATE,
    DREAMBOOTH_CLASSES,
    DREAMBOOTH_LIVE_PROMPTS,
    DREAMBOOTH_OBJECT_PROMPTS,
    GENERIC_PROMPTS,
    PromptSpec,
    prompt_specs,
)
from .evaluation.report import markdown_table
from .finetuned import FinetuneFolderError

__all__ = [
    "COI_OBJECTS",
    "COI_TEMPLATE",
    "DREAMBOOTH_CLASSES",
    "DREAMBOOTH_LIVE_PROMPTS",
    "DREAMBOOTH_OBJECT_PROMPTS",
    "GENERIC_PROMPTS",
    "ConceptFolder",
    "EvalConfig",
    "Evaluator",
    "FinetuneFolderError",
    "PromptSpec",
    "Row",
    "Run",
    "evaluate",
    "main",
    "markdown_table",
    "prompt_specs",
    "protocol_config",
    "resolve_concepts_and_runs",
]

if __name__ == "__main__":
    main(sys.argv[1:])
