"""The learning benchmark's direction on a short run: both ELITE stages, trained by their trainers on
training crops, lower the denoising loss of held-out crops (paired bootstrap interval above zero);
Textual Inversion's token beats its initializer word on held-out photos of its concept, and Infusion
leaves prompts without its class word as they were.

`benchmarks/bench_learning.py` with few steps; its full run (and the table docs/benchmarks.md quotes) is the
benchmark itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_both_stages_help_on_held_out_crops(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_learning import main
    finally:
        sys.path.pop(0)
    results = main(
        [
            "--no-world",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "learning.json"),
            "--steps-global",
            "60",
            "--steps-local",
            "40",
            "--options",
            "none",
            "--draws",
            "4",
            "--steps-finetune",
            "32",
            "--finetune-concepts",
            "1",
            "--anchor-seeds",
            "1",
        ]
    )
    stage1 = results["stage1"]["trained_vs_untrained_own"]  # untrained loss - trained loss, own words
    assert stage1["mean"] > 0 and stage1["excludes_zero"], stage1
    stage2 = results["stage2"]["reference"]["own_vs_off"]  # loss without the local branch - with it
    assert stage2["mean"] > 0 and stage2["excludes_zero"], stage2
    assert results["settings"]["held_out_crops"] >= 8 and (tmp_path / "learning.json").is_file()
    tuned = results["finetunes"]  # on held-out photos of the concept: the learned token beats its initializer
    assert tuned["textual_inversion_token_vs_initializer"]["mean"] > 0
    assert tuned["textual_inversion_token_vs_initializer"]["excludes_zero"]
    assert tuned["infusion_no_class_word_max_abs_change"] < 1e-6  # prompts without the class word: untouched
    assert tuned["checkpoints"] == [8, 16, 24, 32] and set(tuned["curve"]["batex"]) == {"8", "16", "24", "32"}
    pulled = tuned["anchor_values"][0]  # the anchor loss keeps the word nearer its sparse-coded anchors
    assert pulled["anchored"] < pulled["plain"] and pulled["anchors"]
