"""The papers' protocols on the trained miniature world: does the effect each table claims show on held-out objects?

    python benchmarks/bench_protocols_world.py                       # about 35 minutes on two cores
    python benchmarks/bench_protocols_world.py --objects 2 --steps 50 --seeds 4   # a quick look

Held-out objects of the world (shape x colour x pattern triples no model saw) are rendered as concept folders
(4 photos with masks, `data_prep.world.write_concept_folder`); each method is trained or encoded by the
repository's own commands and scored by `inference.evaluate`, shrunk for a CPU (64 px, PNDM/DDIM 25 steps,
guidance 4, `--seeds` images per prompt). CLIP-T and CLIP-I use the world's own CLIP (the evaluation's
ViT-B/32 knows no world objects). Every comparison is paired per image (same object, prompt and seed) with a
bootstrap 95 % interval over the pairs:

- Textual Inversion ("An Image is Worth One Word", Gal et al.; `protocol=textual_inversion`, "A photo of S*"):
  the learned token's images against the initializer word's, CLIP-I to the concept's photos;
- ELITE ("ELITE: Encoding Visual Concepts into Textual Embeddings", Wei et al.; its metrics on world prompts "a
  photo of S* on a <colour> background"): S* encoded from one photo (words and local branch, lambda 0.6) against
  the class word alone, and the local branch at 0.6 against lambda 0 (the global word alone);
- BaTex ("Efficient Personalized Text-to-image Generation by Leveraging Textual Subspace", Du et al.; its official
  recipe, `batex.yaml`, trained as long as Textual Inversion): text alignment on "a photo of S* on a <colour>
  background" against Textual Inversion's token (does the picture have the background the prompt names, read by
  the world classifier; CLIP-T), and image alignment (own colour / pattern, CLIP-I);
- IP-Adapter ("IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models", Ye et al.;
  `--ip-adapter`, exports of `training.ip_adapter`, trained here on the demo's world shards when missing: base
  and plus variants, 1,000 steps at batch 8 with the trainer's official defaults): one photo as image prompt on
  the same world prompts, at each `--ip-adapter-scales`, against the class word alone and against ELITE's images;
- Compositional Inversion ("Compositional Inversion for Stable Diffusion Models", Zhang et al.;
  `protocol=compositional` with the world's shapes for COCO's classes and its attribute classifier for DETR):
  the CoI likelihood of Textual Inversion + semantic (anchor loss) + spatial (the constant layout) against plain
  Textual Inversion, on `--compositional-objects` objects.

Infusion's claim (it changes non-customised prompts less than Textual Inversion / BaTex) is not measured here:
both latent Fisher divergences are exactly 0 on prompts without the concept's word by construction (TI and BaTex
leave the model untouched, Infusion's residual joins only its class word), see docs/benchmarks.md.
Writes `--json` (default benchmarks/results/bench_protocols_world.json) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_learning import bootstrap  # this folder's own helper (the script's folder is on sys.path)
from results_io import write_results

from training.crop_data import STORED_CROP_KEYS

BACKGROUNDS = ("green", "blue", "gray")


def _run(command: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        done = subprocess.run(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
    if done.returncode:
        raise SystemExit(f"{command[2]} failed (exit {done.returncode}); see {log}")


def _scores(out: Path) -> dict[tuple, dict]:
    """scores.csv of one evaluation: {(row, concept, prompt index, seed): record}."""
    found = {}
    for path in out.glob("**/scores.csv"):
        with open(path) as f:
            for r in csv.DictReader(f):
                found[(r["row"], r["concept"], int(r["prompt_index"]), int(r["seed"]))] = r
    return found


def _column(scores: dict, key: str) -> dict[tuple, float]:
    """One score of every image that has it: {(row, concept, prompt index, seed): value}."""
    return {k: float(r[key]) for k, r in scores.items() if r.get(key)}


def _rows(values: dict, prefix: str) -> dict:
    """The values of the rows whose name (or image folder) starts with `prefix`, keyed by the image alone."""
    return {k[1:]: v for k, v in values.items() if k[0].startswith(prefix)}


def _diff(a: dict, b: dict) -> np.ndarray:
    """Per-image differences a - b over the images both have (same concept, prompt and seed)."""
    common = sorted(set(a) & set(b))
    return np.array([np.asarray(a[k]) - np.asarray(b[k]) for k in common])


def _reads(classifier, out: Path) -> dict[tuple, dict[str, float]]:
    """The world classifier's label probabilities of every generated image under `out`, read once:
    {(row folder, concept, image stem): {"colour:red": p, "background:green": p, ...}}."""
    from PIL import Image

    found = {}
    for folder in sorted(out.glob("**/images/*/*")):
        paths = sorted(folder.glob("*.png"))
        probabilities = classifier.probabilities([Image.open(p).convert("RGB") for p in paths])
        for path, probs in zip(paths, probabilities):
            found[(folder.parent.name, folder.name, path.stem)] = probs
    return found


def _identity(reads: dict, concepts: dict[str, tuple[str, str]]) -> dict[tuple, np.ndarray]:
    """[colour hit, pattern hit] per image: the classifier's `colour:` / `pattern:` label of the concept's own above
    0.5 (a background of the same colour does not count). Identity, where CLIP-I on the world weighs the background
    as much as the object."""
    found = {}
    for key, probs in reads.items():
        if key[1] in concepts:
            colour, pattern = concepts[key[1]]
            found[key] = np.array([probs[f"colour:{colour}"] > 0.5, probs[f"pattern:{pattern}"] > 0.5], float)
    return found


def _background_hits(reads: dict, backgrounds: tuple[str, ...]) -> dict[tuple, float]:
    """1 per image whose likeliest background is the one its prompt names (prompt k names `backgrounds[k]`)."""
    found = {}
    for key, probs in reads.items():
        asked = backgrounds[int(key[2].split("_")[0])]
        seen = max((name for name in probs if name.startswith("background:")), key=probs.get)
        found[key] = float(seen == f"background:{asked}")
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=6, help="held-out objects (concept folders)")
    parser.add_argument("--steps", type=int, default=300, help="Textual Inversion steps per object")
    parser.add_argument("--seeds", type=int, default=16, help="images per prompt")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batex", action=argparse.BooleanOptionalAction, default=True, help="the BaTex comparison")
    parser.add_argument("--compositional-objects", type=int, default=3, help="objects for the CoI comparison (0: skip)")
    parser.add_argument("--compositional-seeds", type=int, default=4, help="images per CoI prompt")
    parser.add_argument(
        "--encoders", type=Path, default=REPO / "outputs/demo/encoders", help="ELITE encoders trained on the world"
    )
    parser.add_argument(
        "--ip-adapter",
        type=Path,
        nargs="+",
        default=[REPO / "outputs/world/ip_adapter/encoders", REPO / "outputs/world/ip_adapter_plus/encoders"],
        help="IP-Adapters trained on the world (training.ip_adapter's export folders, reported by their run "
        "folder's name); each skipped when missing",
    )
    parser.add_argument(
        "--ip-adapter-shards",
        type=Path,
        default=REPO / "outputs/demo/shards/world",
        help="crop shards an IP-Adapter that is missing is trained on (the demo's, as ELITE's encoders)",
    )
    parser.add_argument("--ip-adapter-steps", type=int, default=1000, help="training steps of a missing IP-Adapter")
    parser.add_argument(
        "--ip-adapter-scales", type=float, nargs="+", default=[1.0, 0.5], help="image-prompt weights to evaluate"
    )
    parser.add_argument("--work", type=Path, default=REPO / "outputs/world/bench_protocols")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/bench_protocols_world.json")
    args = parser.parse_args(argv)

    from data_prep.world import HELD_OUT_TRIPLES, write_concept_folder
    from encoders.tiny import build_tiny_models
    from encoders.world import write_world_models
    from inference.evaluate import main as evaluate

    work = args.work
    models = write_world_models(work / "models")
    if not (work / "models" / "dino").exists():
        build_tiny_models(work / "models", ["dino"])  # DINO-I is not read here; the scorer loads one
    sd, clip = models["sd"], models["clip"]
    # spread over shapes: every len/objects-th held-out triple
    stride = max(1, len(HELD_OUT_TRIPLES) // args.objects)
    triples = [HELD_OUT_TRIPLES[k * stride] for k in range(args.objects)]
    seeds = ",".join(str(s) for s in range(args.seeds))
    common = [
        f"base={sd}",
        f"seeds={seeds}",
        f"num_inference_steps={args.sampling_steps}",
        f"guidance_scale={args.guidance}",
        "resolution=64",
        f"clip_model={clip}",
        f"dino_model={work / 'models' / 'dino'}",
    ]
    timings: dict[str, float] = {}
    concepts, runs = [], []

    def textual_inversion(
        folder: Path, shape: str, seed: int, name: str, extra: list[str], config: str = "textual_inversion.yaml"
    ) -> Path:
        run = work / "runs" / f"{name}_{folder.name}"
        if not (run / "learned_embeds.safetensors").is_file():
            _run(
                [
                    sys.executable,
                    "-m",
                    "training.textual_inversion",
                    "--config",
                    str(REPO / "configs/finetune" / config),
                    f"pretrained_model_name_or_path={sd}",
                    f"concept_dir={folder}",
                    f"initializer_token={shape}",
                    f"class_word={shape}",
                    f"output_dir={run}",
                    "data.resolution=64",
                    f"max_steps={args.steps}",
                    "gradient_accumulation_steps=1",
                    "checkpointing_steps=0",
                    "validation_steps=0",
                    "report_to=none",
                    "mixed_precision=no",
                    f"seed={seed}",
                    *extra,
                ],
                work / f"{name}_{folder.name}.log",
            )
        return run

    tick = time.time()
    for k, (shape, colour, pattern) in enumerate(triples):
        folder = work / "concepts" / f"{colour}_{pattern}_{shape}"
        if not (folder / "03.png").is_file():
            write_concept_folder(folder, shape, colour, pattern, photos=4, seed=k)
        concepts.append((folder, shape))
        runs.append(textual_inversion(folder, shape, k, "ti", []))
    timings["train_textual_inversion_s"] = round(time.time() - tick, 1)

    settings = {
        k: str(v)
        if isinstance(v, Path)
        else [str(x) if isinstance(x, Path) else x for x in v]
        if isinstance(v, list)
        else v
        for k, v in vars(args).items()
    }
    results: dict = {"objects": [f.name for f, _ in concepts], "settings": settings | {"triples": triples}}
    tick = time.time()
    ti_out = work / "eval_textual_inversion"
    evaluate(
        [
            *common,
            f"runs={','.join(map(str, runs))}",
            "methods=base,textual_inversion",
            "protocol=textual_inversion",
            "num_prompts=1",  # "A photo of S*": the world has no moon, oil painting or Elmo
            f"out={ti_out}",
        ]
    )
    timings["eval_textual_inversion_s"] = round(time.time() - tick, 1)
    ti = _scores(ti_out)
    from inference.evaluation.metrics import PresenceClassifier

    classifier = PresenceClassifier(str(models["classifier"]), threshold=0.5)
    attributes = {f.name: (f.name.split("_")[0], f.name.split("_")[1]) for f, _ in concepts}
    identity = _identity(_reads(classifier, ti_out), attributes)
    identity = _diff(_rows(identity, "textual_inversion"), _rows(identity, "base")).reshape(-1, 2)

    def token_minus_word(key: str) -> np.ndarray:
        column = _column(ti, key)
        return _diff(_rows(column, "textual_inversion"), _rows(column, "base"))

    results["textual_inversion"] = {
        "token_minus_initializer_clip_i": bootstrap(token_minus_word("clip_i")),
        "token_minus_initializer_clip_t": bootstrap(token_minus_word("clip_t")),
        "token_minus_initializer_colour_hit": bootstrap(identity[:, 0]),
        "token_minus_initializer_pattern_hit": bootstrap(identity[:, 1]),
    }

    prompts = work / "world_prompts.txt"
    prompts.write_text("".join(f"a photo of {{}} on a {bg} background\n" for bg in BACKGROUNDS))
    if args.batex:
        tick = time.time()
        batex = [
            textual_inversion(folder, shape, k, "batex", [], config="batex.yaml")
            for k, (folder, shape) in enumerate(concepts)
        ]
        timings["train_batex_s"] = round(time.time() - tick, 1)
        tick = time.time()
        batex_out = work / "eval_batex"
        evaluate(
            [
                *common,
                f"runs={','.join(map(str, runs + batex))}",
                "methods=base,textual_inversion,batex",
                f"prompts={prompts}",
                "scheduler=pndm",  # BaTex's protocol sampler, for both rows
                f"out={batex_out}",
            ]
        )
        timings["eval_batex_s"] = round(time.time() - tick, 1)
        scores = _scores(batex_out)
        reads = _reads(classifier, batex_out)  # each image read once, for identity and background
        backgrounds = _background_hits(reads, BACKGROUNDS)
        identity = _identity(reads, attributes)

        def batex_minus_ti(values: dict) -> np.ndarray:
            return _diff(_rows(values, "batex"), _rows(values, "textual_inversion"))

        ident = batex_minus_ti(identity).reshape(-1, 2)
        token = _diff(_rows(identity, "textual_inversion"), _rows(identity, "base")).reshape(-1, 2)
        results["textual_inversion"].update(
            {  # on prompts like the world's captions
                "world_prompts_token_minus_class_word_colour_hit": bootstrap(token[:, 0]),
                "world_prompts_token_minus_class_word_pattern_hit": bootstrap(token[:, 1]),
            }
        )
        results["batex"] = {
            "batex_minus_ti_background_hit": bootstrap(batex_minus_ti(backgrounds)),
            "batex_minus_ti_clip_t": bootstrap(batex_minus_ti(_column(scores, "clip_t"))),
            "batex_minus_ti_colour_hit": bootstrap(ident[:, 0]),
            "batex_minus_ti_pattern_hit": bootstrap(ident[:, 1]),
            "batex_minus_ti_clip_i": bootstrap(batex_minus_ti(_column(scores, "clip_i"))),
            "background_hit_batex": float(np.mean(list(_rows(backgrounds, "batex").values()))),
            "background_hit_ti": float(np.mean(list(_rows(backgrounds, "textual_inversion").values()))),
            "background_hit_class_word": float(np.mean(list(_rows(backgrounds, "base").values()))),
        }
    if (args.encoders / "local_mapping" / "config.json").is_file():
        concept_keys = [f"concepts={','.join(f'{f}={shape}' for f, shape in concepts)}"]
        elite_common = [*common, *concept_keys, f"encoders={args.encoders}", f"prompts={prompts}", "scheduler=pndm"]
        tick = time.time()
        for scale in ("0.6", "0"):
            out = work / f"eval_elite_{scale}"
            evaluate([*elite_common, "methods=base,elite", f"elite_scale={scale}", f"out={out}"])
        timings["eval_elite_s"] = round(time.time() - tick, 1)
        on, off = _scores(work / "eval_elite_0.6"), _scores(work / "eval_elite_0")
        identity = _identity(_reads(classifier, work / "eval_elite_0.6"), attributes)
        identity = _diff(_rows(identity, "elite"), _rows(identity, "base")).reshape(-1, 2)

        def elite_minus(scores: dict, other: dict, key: str, row: str = "base") -> np.ndarray:
            return _diff(_rows(_column(scores, key), "elite"), _rows(_column(other, key), row))

        results["elite"] = {
            "words_and_local_minus_class_word_colour_hit": bootstrap(identity[:, 0]),
            "words_and_local_minus_class_word_pattern_hit": bootstrap(identity[:, 1]),
            "words_and_local_minus_class_word_clip_i": bootstrap(elite_minus(on, on, "clip_i")),
            "words_and_local_minus_class_word_clip_t": bootstrap(elite_minus(on, on, "clip_t")),
            "global_word_alone_minus_class_word_clip_i": bootstrap(elite_minus(off, off, "clip_i")),
            "local_branch_0.6_minus_0_clip_i": bootstrap(elite_minus(on, off, "clip_i", row="elite")),
            "encoders": str(args.encoders),
        }
    else:
        results["elite"] = {"skipped": f"no trained encoders at {args.encoders} (run `make demo` first)"}
    for export in args.ip_adapter:
        name = export.parent.name  # the run folder: ip_adapter, ip_adapter_plus, ...
        if not (export / "ip_adapter" / "ip_adapter.safetensors").is_file() and args.ip_adapter_shards.is_dir():
            tick = time.time()
            _run(  # the trainer's defaults (official lr, drop rates); "plus" in the run folder's name: variant=plus
                [
                    sys.executable,
                    "-m",
                    "training.ip_adapter",
                    f"pretrained_model_name_or_path={sd}",
                    f"image_encoder_name_or_path={clip}",
                    f"train_shards={args.ip_adapter_shards}",
                    "data.resolution=64",
                    "data.clip_size=64",
                    *STORED_CROP_KEYS,
                    f"max_steps={args.ip_adapter_steps}",
                    "train_batch_size=8",
                    "mixed_precision=no",
                    f"output_dir={export.parent}",
                    f"export_dir={export}",
                    "checkpointing_steps=500",
                    "report_to=none",
                    "validation_steps=0",
                    f"variant={'plus' if 'plus' in name else 'base'}",
                ],
                work / f"{name}.log",
            )
            timings[f"train_{name}_s"] = round(time.time() - tick, 1)
        if not (export / "ip_adapter" / "ip_adapter.safetensors").is_file():
            results[name] = {"skipped": f"no IP-Adapter export at {export} (and no shards to train one)"}
            continue
        concept_keys = [f"concepts={','.join(f'{f}={shape}' for f, shape in concepts)}"]
        ip_common = [*common, *concept_keys, f"ip_adapter={export}", f"prompts={prompts}", "scheduler=pndm"]
        tick = time.time()
        results[name] = {"export": str(export)}
        elite_reads = _reads(classifier, work / "eval_elite_0.6") if "skipped" not in results["elite"] else {}
        elite_scores = _scores(work / "eval_elite_0.6") if elite_reads else {}
        for scale in args.ip_adapter_scales:
            out = work / f"eval_{name}_{scale:g}"
            evaluate([*ip_common, "methods=base,ip_adapter", f"ip_adapter_scale={scale:g}", f"out={out}"])
            scores, reads = _scores(out), _reads(classifier, out)
            identity, backgrounds = _identity(reads, attributes), _background_hits(reads, BACKGROUNDS)

            def ip_minus(values: dict, other: dict, row: str = "base") -> np.ndarray:
                return _diff(_rows(values, "ip_adapter"), _rows(other, row))

            ident = ip_minus(identity, identity).reshape(-1, 2)
            entry = {
                "minus_class_word_colour_hit": bootstrap(ident[:, 0]),
                "minus_class_word_pattern_hit": bootstrap(ident[:, 1]),
                "minus_class_word_background_hit": bootstrap(ip_minus(backgrounds, backgrounds)),
                "minus_class_word_clip_i": bootstrap(ip_minus(_column(scores, "clip_i"), _column(scores, "clip_i"))),
                "minus_class_word_clip_t": bootstrap(ip_minus(_column(scores, "clip_t"), _column(scores, "clip_t"))),
                "background_hit": float(np.mean(list(_rows(backgrounds, "ip_adapter").values()))),
            }
            if elite_reads:  # the same objects, prompts and seeds through ELITE (lambda 0.6)
                elite_identity = _identity(elite_reads, attributes)
                elite_backgrounds = _background_hits(elite_reads, BACKGROUNDS)
                versus = ip_minus(identity, elite_identity, row="elite").reshape(-1, 2)
                entry |= {
                    "minus_elite_colour_hit": bootstrap(versus[:, 0]),
                    "minus_elite_pattern_hit": bootstrap(versus[:, 1]),
                    "minus_elite_background_hit": bootstrap(ip_minus(backgrounds, elite_backgrounds, row="elite")),
                    "minus_elite_clip_i": bootstrap(
                        ip_minus(_column(scores, "clip_i"), _column(elite_scores, "clip_i"), row="elite")
                    ),
                    "minus_elite_clip_t": bootstrap(
                        ip_minus(_column(scores, "clip_t"), _column(elite_scores, "clip_t"), row="elite")
                    ),
                    "elite_background_hit": float(np.mean(list(_rows(elite_backgrounds, "elite").values()))),
                }
            results[name][f"scale_{scale:g}"] = entry
        timings[f"eval_{name}_s"] = round(time.time() - tick, 1)
    if args.compositional_objects:
        from data_prep.world import SHAPES

        tick = time.time()
        semantic = [
            textual_inversion(folder, shape, k, "ti_anchors", ["anchors.enabled=true"])
            for k, (folder, shape) in enumerate(concepts[: args.compositional_objects])
        ]
        timings["train_textual_inversion_anchors_s"] = round(time.time() - tick, 1)
        tick = time.time()
        comp_out = work / "eval_compositional"
        evaluate(
            [
                *[key for key in common if not key.startswith("seeds=")],
                f"seeds={','.join(str(s) for s in range(args.compositional_seeds))}",
                f"runs={','.join(map(str, runs[: args.compositional_objects] + semantic))}",
                "methods=textual_inversion",
                "protocol=compositional",
                f"coi_objects={','.join(SHAPES)}",
                f"detector_model={models['classifier']}",
                "detection_threshold=0.5",
                f"out={comp_out}",
            ]
        )
        timings["eval_compositional_s"] = round(time.time() - tick, 1)
        comp = _scores(comp_out)
        hits = _column(comp, "coi_hit")
        plain = _rows(hits, "textual_inversion (")
        both = _rows(hits, "textual_inversion + semantic + spatial (")
        common_keys = sorted(set(plain) & set(both))
        results["compositional"] = {
            "semantic_and_spatial_minus_plain_coi": bootstrap(_diff(both, plain)),
            "plain_coi": float(np.mean([plain[k] for k in common_keys])),
            "semantic_and_spatial_coi": float(np.mean([both[k] for k in common_keys])),
        }
    results["timings"] = timings
    write_results(results, args.json)

    print("| claim (paired per image, world CLIP) | mean | 95 % interval | n |")
    print("|---|---|---|---|")
    ip_sections = [export.parent.name for export in args.ip_adapter]
    for section in ("textual_inversion", "batex", "elite", *ip_sections, "compositional"):
        entries = results.get(section, {})
        flat = {
            f"{sub} {k}": v
            for sub, d in entries.items()
            if isinstance(d, dict) and "mean" not in d
            for k, v in d.items()
        }
        for name, value in {**entries, **flat}.items():
            if isinstance(value, dict) and "mean" in value:
                lo, hi = value["ci95"]
                print(f"| {section}: {name} | {value['mean']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {value['n']} |")
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
