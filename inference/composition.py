"""Guided composition: which tokens of a prompt spatial guidance places, and in which boxes.

A prompt can mix personalized tokens (ELITE's S* / S1 / S2, a Textual Inversion or BaTex token) with
ordinary words ("S* playing with a dog": the paper's main case). Each placed token gets a box, given
by the user (`TOKEN=x0,y0,x1,y1`) or predicted by the location MLP from the token's input embedding:
ELITE's w0, the learned row of a Textual Inversion / BaTex token, a word's own row. The location MLP
places a pair, so prediction needs exactly two tokens without a given box.

    tokens = plan_guidance("S* playing with a dog", personalized={"S*": w0}, words=["dog"],
                           boxes={}, location_mlp=mlp, pipe=pipe)
    [(t.name, t.box, t.resolved) for t in tokens]   # [("S*", (...), "cat"), ("dog", (...), "dog")]

`default_words` picks the ordinary words to place when none are named: the prompt's words that are
in the location MLP's vocabulary (the nouns it was trained on), in prompt order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .guidance import Box, predict_boxes, validate_box, warn_if_boxes_coincide
from .inputs import ConceptInputError, placeholder_in


@dataclass
class PlacedToken:
    """One token spatial guidance steers: its name in the prompt, its box, where the box came from and,
    for predicted boxes, the vocabulary noun whose layout it took."""

    name: str
    box: tuple[float, float, float, float]
    source: str  # "given" | "location_mlp"
    resolved: str | None = None

    def record(self) -> dict:
        return {
            "token": self.name,
            "box": [round(v, 4) for v in self.box],
            "from": self.source,
            "as_noun": self.resolved,
        }


def parse_token_box(text: str) -> tuple[str | None, tuple[float, float, float, float]]:
    """`TOKEN=x0,y0,x1,y1` -> (TOKEN, box); a bare `x0,y0,x1,y1` -> (None, box). Raises ValueError."""
    token, sep, numbers = text.rpartition("=")
    if not sep:
        token, numbers = None, text
    elif not token.strip():
        raise ValueError(f"box {text!r}: nothing before '='; write TOKEN=x0,y0,x1,y1")
    try:
        values = [float(v) for v in numbers.split(",")]
    except ValueError:
        raise ValueError(f"box {text!r}: expected x0,y0,x1,y1 numbers in 0..1 (optionally TOKEN=...)") from None
    return (token.strip() if token else None), validate_box(values, f"box {text!r}")


def default_words(prompt: str, vocabulary: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The prompt's words (and multi-word nouns) that the location MLP knows, in the order they appear."""
    found = []
    lowered = prompt.lower()
    for noun in vocabulary:
        if noun in exclude:
            continue
        match = re.search(rf"(?<![a-z0-9]){re.escape(noun.lower())}(?![a-z0-9])", lowered)
        if match:
            found.append((match.start(), noun))
    return [noun for _, noun in sorted(found)]


def plan_guidance(
    prompt: str,
    personalized: Mapping[str, torch.Tensor | None],
    words: Sequence[str],
    boxes: Mapping[str, Box],
    location_mlp=None,
    pipe=None,
) -> list[PlacedToken]:
    """The tokens to place in `prompt` and their boxes.

    personalized: token -> input embedding (ELITE's w0), or None for a token the tokenizer knows (a
    Textual Inversion / BaTex token: its row is read); only those in the prompt are placed. words:
    ordinary words to place. boxes: given boxes by token; the tokens without one get the location
    MLP's (exactly two needed).
    """
    names = [t for t in personalized if placeholder_in(prompt, t)] + [w for w in words if w not in personalized]
    for word in words:
        if not placeholder_in(prompt, word):
            raise ConceptInputError(f"prompt {prompt!r} does not contain the word {word!r} to place")
    unknown = [t for t in boxes if t not in names]
    if unknown:
        raise ConceptInputError(
            f"--box for {', '.join(map(repr, unknown))}, which is not a token placed in {prompt!r} "
            f"(placed: {', '.join(map(repr, names)) or 'none'})"
        )
    if not names:
        raise ConceptInputError(f"prompt {prompt!r}: nothing to place (no personalized token and no word to guide)")
    placed = {t: PlacedToken(t, validate_box(boxes[t], t), "given") for t in names if t in boxes}
    missing = [t for t in names if t not in placed]
    if missing:
        if location_mlp is None:
            raise ConceptInputError(
                f"no box for {', '.join(map(repr, missing))} and no location MLP to predict one: give --box "
                "TOKEN=x0,y0,x1,y1"
            )
        if len(missing) != 2:
            raise ConceptInputError(
                f"the location MLP places two tokens; {len(missing)} have no box ({', '.join(map(repr, missing))}): "
                "give --box TOKEN=x0,y0,x1,y1 for the others"
            )
        a, b = (personalized.get(t) if personalized.get(t) is not None else t for t in missing)
        predicted = predict_boxes(location_mlp, pipe, a, b)
        warn_if_boxes_coincide(predicted)
        for name, box, noun in zip(missing, predicted["boxes"], predicted["resolved"]):
            placed[name] = PlacedToken(name, validate_box(box, name), "location_mlp", noun)
    return [placed[t] for t in names]
