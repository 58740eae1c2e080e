"""Quality bars of the miniature world's base models, measured on held-out scenes.

    .venv/bin/python benchmarks/bench_world.py [--models outputs/world/models] [--images 128] [--out results.json]

Every number is on the `heldout` split (shape x colour x pattern triples no model saw in training),
single-object scenes, world seed 7:

- VAE: PSNR of encode -> decode (posterior mean), and the mean colour error of the object's pixels;
- CLIP zero-shot accuracy per attribute: the true caption against the same caption with that
  attribute replaced by each other value (chance 1 / number of values);
- the world classifier's accuracy on the real renders (how far its readings of generated images can be trusted);
- where the background comes from: at high timesteps, the squared error of the per-channel mean of the UNet's
  predicted clean latent (the picture's global colour) with the own caption, with the background word
  changed, and with the empty caption; a UNet that ignores the caption for it scores the same three times;
- generation: the UNet samples each held-out caption (PNDM, `--steps`, guidance `--guidance`) and the
  classifier reads background, colour, shape and pattern from the result; accuracy vs chance, and the
  same for the empty prompt (what the classifier finds without any text: the floor).

Prints a table, writes JSON (default benchmarks/results/bench_world.json) and a picture of the
generated samples beside it (`bench_world_samples.png`: each row a caption, real render first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from results_io import write_results  # this folder's own helper (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks/results/bench_world.json"
GROUPS = ("background", "colour", "shape", "pattern")


def held_out_scenes(count: int, seed: int = 7) -> list:
    """`count` single-object scenes of the heldout split."""
    from data_prep.world import render_scene

    scenes, index = [], 0
    while len(scenes) < count:
        scene = render_scene(seed, index, "heldout", two_object_fraction=0.0)
        scenes.append(scene)
        index += 1
    return scenes


def truth(scene) -> dict[str, str]:
    obj = scene.objects[0]
    return {"background": scene.background, "colour": obj.colour, "shape": obj.shape, "pattern": obj.pattern}


def caption_for(attributes: dict[str, str]) -> str:
    pattern = "" if attributes["pattern"] == "plain" else f" {attributes['pattern']}"
    return (
        f"a photo of a {attributes['colour']}{pattern} {attributes['shape']} on a {attributes['background']} background"
    )


def to_pixels(images) -> torch.Tensor:
    """PIL images -> float [N, 3, 64, 64] in [-1, 1]."""
    array = np.stack([np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


class WorldClassifier:
    """The world's attribute classifier: per group, the value with the highest logit."""

    def __init__(self, folder: Path):
        from transformers import ResNetForImageClassification

        self.model = ResNetForImageClassification.from_pretrained(folder).eval()
        labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.groups = {
            g: [(i, label.split(":", 1)[1]) for i, label in enumerate(labels) if label.startswith(g + ":")]
            for g in GROUPS
        }

    @torch.no_grad()
    def read(self, images) -> list[dict[str, str]]:
        logits = torch.cat(
            [self.model(pixel_values=to_pixels(images[i : i + 64])).logits for i in range(0, len(images), 64)]
        )
        out = []
        for row in logits:
            out.append({g: max(members, key=lambda m: float(row[m[0]]))[1] for g, members in self.groups.items()})
        return out


def accuracy(readings: list[dict], truths: list[dict]) -> dict[str, float]:
    return {g: float(np.mean([r[g] == t[g] for r, t in zip(readings, truths)])) for g in GROUPS}


@torch.no_grad()
def vae_quality(sd: Path, scenes) -> dict:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").eval()
    pixels = to_pixels([s.image for s in scenes])
    recon = torch.cat(
        [
            vae.decode(vae.encode(pixels[i : i + 64]).latent_dist.mean).sample.clamp(-1, 1)
            for i in range(0, len(pixels), 64)
        ]
    )
    mse = ((recon - pixels) ** 2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(4.0 / mse)
    masks = torch.from_numpy(np.stack([s.objects[0].mask for s in scenes]))[:, None].float()
    colour_error = (
        ((recon - pixels).abs() * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)).clamp_min(1)
    ).mean() * 127.5
    return {"psnr_db": float(psnr.mean()), "object_colour_error_8bit": float(colour_error)}


@torch.no_grad()
def clip_zero_shot(clip_dir: Path, scenes) -> dict[str, float]:
    from transformers import CLIPModel, CLIPTokenizer

    from data_prep.world import ATTRIBUTE_GROUPS

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    from encoders.clip_features import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    image_features = model.get_image_features(
        pixel_values=(((to_pixels([s.image for s in scenes]) + 1) / 2) - mean) / std
    )
    image_features = torch.nn.functional.normalize(getattr(image_features, "pooler_output", image_features), dim=-1)
    hits = {g: [] for g in GROUPS}
    for n, scene in enumerate(scenes):
        t = truth(scene)
        for group in GROUPS:
            values = list(ATTRIBUTE_GROUPS[group])
            texts = [caption_for({**t, group: v}) for v in values]
            ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            text_features = model.get_text_features(input_ids=ids)
            text_features = torch.nn.functional.normalize(
                getattr(text_features, "pooler_output", text_features), dim=-1
            )
            hits[group].append(values[int((text_features @ image_features[n]).argmax())] == t[group])
    return {g: float(np.mean(v)) for g, v in hits.items()}


@torch.no_grad()
def caption_reliance(sd: Path, scenes, timesteps=(999, 900, 600), seed: int = 0) -> dict:
    """timestep -> squared error of the predicted clean latent's per-channel means (own caption, another
    background word, empty caption), on the scenes noised with one seeded draw; the variance of the means for scale."""
    from diffusers import StableDiffusionPipeline

    from data_prep.world import BACKGROUNDS

    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    scheduler, unet, vae = pipe.scheduler, pipe.unet, pipe.vae
    latents = vae.encode(to_pixels([s.image for s in scenes])).latent_dist.mean * vae.config.scaling_factor
    means = latents.mean(dim=(2, 3))

    def embed(captions):
        ids = pipe.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return pipe.text_encoder(ids)[0]

    names = list(BACKGROUNDS)
    other = [names[(names.index(s.background) + 3) % len(names)] for s in scenes]
    texts = {
        "own_caption": embed([caption_for(truth(s)) for s in scenes]),
        "other_background": embed([caption_for({**truth(s), "background": b}) for s, b in zip(scenes, other)]),
        "empty_caption": embed([""] * len(scenes)),
    }
    generator = torch.Generator().manual_seed(seed)
    out = {"variance_of_means": float(means.var())}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        step = torch.full((len(scenes),), t)
        noisy = scheduler.add_noise(latents, noise, step)
        alpha = scheduler.alphas_cumprod[t]
        row = {}
        for name, text in texts.items():
            pred = torch.cat(
                [unet(noisy[i : i + 64], step[i : i + 64], text[i : i + 64]).sample for i in range(0, len(scenes), 64)]
            )
            if scheduler.config.prediction_type == "v_prediction":
                clean = alpha.sqrt() * noisy - (1 - alpha).sqrt() * pred
            else:
                clean = (noisy - (1 - alpha).sqrt() * pred) / alpha.sqrt()
            row[name] = float(((clean.mean(dim=(2, 3)) - means) ** 2).mean())
        out[str(t)] = row
    return out


@torch.no_grad()
def generate(sd: Path, captions: list[str], steps: int, guidance: float, seed: int) -> list:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(captions), 32):
        chunk = captions[start : start + 32]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def samples_sheet(real: list, generated: list[list], path: Path) -> None:
    """One row per caption: the real held-out render, then its generated samples (each 64 px, shown 2x)."""
    from PIL import Image

    columns = 1 + len(generated[0])
    sheet = Image.new("RGB", (columns * 132, len(real) * 132), "white")
    for r, (image, row) in enumerate(zip(real, generated)):
        for c, im in enumerate([image, *row]):
            sheet.paste(im.resize((128, 128), Image.NEAREST), (c * 132 + (4 if c else 0), r * 132 + 2))
    sheet.save(path)


def run(args) -> dict:
    from data_prep.world import ATTRIBUTE_GROUPS

    models = Path(args.models)
    started = time.time()
    scenes = held_out_scenes(args.images)
    truths = [truth(s) for s in scenes]
    classifier = WorldClassifier(models / "classifier")
    results: dict = {"chance": {g: 1 / len(ATTRIBUTE_GROUPS[g]) for g in GROUPS}}
    results["vae"] = vae_quality(models / "sd", scenes)
    results["clip_zero_shot"] = clip_zero_shot(models / "clip", scenes)
    results["classifier_on_renders"] = accuracy(classifier.read([s.image for s in scenes]), truths)
    results["caption_reliance"] = caption_reliance(models / "sd", scenes, seed=args.seed)
    captions = [caption_for(t) for t in truths]
    generated = generate(models / "sd", captions, args.steps, args.guidance, args.seed)
    results["generation"] = accuracy(classifier.read(generated), truths)
    unconditional = generate(models / "sd", [""] * len(captions), args.steps, args.guidance, args.seed)
    results["generation_empty_prompt"] = accuracy(classifier.read(unconditional), truths)
    rows = min(8, len(scenes))
    extra = [
        generate(models / "sd", captions[:rows], args.steps, args.guidance, args.seed + 1000 * k) for k in range(1, 4)
    ]
    sheet = Path(args.out).with_name(Path(args.out).stem + "_samples.png")
    sheet.parent.mkdir(parents=True, exist_ok=True)
    samples_sheet(
        [s.image for s in scenes[:rows]], [[generated[i], *(e[i] for e in extra)] for i in range(rows)], sheet
    )
    results["settings"] = {
        "images": args.images,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "models": str(models),
        "split": "heldout, single objects, world seed 7",
        "samples_picture": sheet.name,
        "captions_shown": captions[:rows],
    }
    results["seconds"] = round(time.time() - started, 1)
    return results


def table(results: dict) -> str:
    lines = ["| measure | background | colour | shape | pattern |", "|---|---|---|---|---|"]
    for key, name in (
        ("chance", "chance"),
        ("clip_zero_shot", "CLIP zero-shot"),
        ("classifier_on_renders", "classifier on real renders"),
        ("generation", "generated from the caption (classifier)"),
        ("generation_empty_prompt", "generated from the empty prompt"),
    ):
        lines.append(f"| {name} | " + " | ".join(f"{100 * results[key][g]:.0f} %" for g in GROUPS) + " |")
    reliance = results.get("caption_reliance")
    if reliance:
        lines += [
            "",
            "| predicted clean latent, error of its channel means (variance of the means: "
            f"{reliance['variance_of_means']:.3f}) | own caption | other background word | empty caption |",
            "|---|---|---|---|",
        ]
        for t, row in reliance.items():
            if t != "variance_of_means":
                lines.append(
                    f"| timestep {t} | {row['own_caption']:.3f} | {row['other_background']:.3f} | "
                    f"{row['empty_caption']:.3f} |"
                )
    vae = results["vae"]
    lines.append(
        f"\nVAE: {vae['psnr_db']:.1f} dB PSNR, object colour error {vae['object_colour_error_8bit']:.1f} / 255"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=str(REPO / "outputs/world/models"),
        help="the world's models folder (sd/, clip/, classifier/)",
    )
    parser.add_argument("--images", type=int, default=128, help="held-out scenes")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    results = run(args)
    print(table(results))
    write_results(results, Path(args.out))
    return results


if __name__ == "__main__":
    main()
