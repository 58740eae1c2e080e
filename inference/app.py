"""A web demo (Gradio): upload a photo of your object, paint or auto-make its mask, type a prompt with S*.

    python -m inference.app --base CompVis/stable-diffusion-v1-4 --encoders ORG/elite-encoders
    # then open http://127.0.0.1:7860

One concept: a photo (paint over the object to mask it; unpainted photos are masked automatically
with CLIPSeg when `--mask-model` loads, else used whole), optional extra photos of the same object,
a prompt with S*, lambda (the local branch's weight), seed, steps and the sampling preset. Two
concepts: two photos, a prompt with S1 and S2, and optional boxes for each. Each run shows the images
and the masks that were used. Everything runs through `inference.ElitePipeline`, loaded once.

Needs `pip install gradio` (the `app` extra); the rest of the package does not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from encoders.common.config import parse_keyed_args, program_name
from encoders.common.images import MAX_IMAGE_PIXELS

from .inputs import ConceptInputError
from .loading import ModelLoadError
from .masking import DEFAULT_MASK_MODEL, DEFAULT_MASK_PROMPT, AutoMasker
from .methods import Elite
from .pictures import mask_preview
from .pipeline import ElitePipeline
from .presets import PRESETS, preset_settings

NO_PRESET = "none (the settings below)"
MAX_UPLOAD = "20mb"  # per file; the pixel count is limited too (MAX_IMAGE_PIXELS, the same as `encode`'s)


def limit_uploads() -> None:
    """Make PIL refuse, while Gradio decodes an upload, any image over `MAX_IMAGE_PIXELS` (PIL only warns between
    its limit and twice it, so the warning is made an error): the page shows the error, the process stays small."""
    import warnings

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _box(text: str | None) -> list[float] | None:
    """ "x0,y0,x1,y1" in 0..1 -> a box; empty -> None."""
    if not text or not text.strip():
        return None
    try:
        box = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise ConceptInputError(f"box {text!r}: give x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return box


def painted_mask(editor_value) -> tuple[Image.Image | None, Image.Image | None]:
    """An ImageEditor value -> (photo, mask painted on it or None when nothing was painted)."""
    if editor_value is None:
        return None, None
    if isinstance(editor_value, Image.Image):
        return editor_value.convert("RGB"), None
    photo = editor_value.get("background")
    if photo is None:
        return None, None
    photo = photo if isinstance(photo, Image.Image) else Image.fromarray(np.asarray(photo))
    painted = None
    for layer in editor_value.get("layers") or []:
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        alpha = np.asarray(layer.convert("RGBA").resize(photo.size, Image.NEAREST))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    mask = Image.fromarray((painted * 255).astype(np.uint8), "L") if painted is not None and painted.any() else None
    return photo.convert("RGB"), mask


class DemoApp:
    """The state behind the page: the pipeline (loaded once) and the mask model (loaded when first needed)."""

    def __init__(self, elite: ElitePipeline, mask_model: str | None = DEFAULT_MASK_MODEL, max_steps: int = 100):
        self.elite = elite
        self.mask_model = mask_model
        self.max_steps = max_steps
        self._masker: AutoMasker | None = None
        self._masker_error: str | None = None

    def masker(self) -> AutoMasker | None:
        if self._masker is None and self._masker_error is None and self.mask_model:
            try:
                self._masker = AutoMasker.from_pretrained(self.mask_model)
            except ModelLoadError as err:
                self._masker_error = str(err)
        return self._masker

    def concept_inputs(self, photo, painted, extra_files: Sequence | None, auto_mask: bool, mask_word: str):
        """Photos and masks of one concept: the painted mask wins; unpainted photos are auto-masked."""
        photos = [photo] + [Image.open(getattr(f, "name", f)).convert("RGB") for f in (extra_files or [])]
        masks = [painted] + [None] * (len(photos) - 1)
        notes = []
        for k, (image, mask) in enumerate(zip(photos, masks)):
            if mask is None and auto_mask:
                masker = self.masker()
                if masker is None:
                    notes.append(f"photo {k + 1}: whole photo ({self._masker_error or 'no mask model'})")
                else:
                    masks[k] = masker(image, mask_word.strip() or DEFAULT_MASK_PROMPT)
                    notes.append(f"photo {k + 1}: automatic mask for {mask_word.strip() or DEFAULT_MASK_PROMPT!r}")
            elif mask is None:
                notes.append(f"photo {k + 1}: whole photo")
            else:
                notes.append(f"photo {k + 1}: painted mask")
        return photos, masks, notes

    def generate(
        self,
        prompt: str,
        concepts_in: list[tuple],
        elite_scale: float,
        seed: int,
        steps: int,
        preset: str,
        guidance: float,
        num_images: int,
        boxes=None,
        placeholders=None,
    ):
        """-> (images, masks used as previews, a status line)."""
        if not prompt or not prompt.strip():
            raise ConceptInputError("type a prompt (with S* for your object)")
        concepts, previews, notes = [], [], []
        for photos, masks, note in concepts_in:
            concept, prepared = self.elite.encode_concept(photos, masks, return_input=True)
            concepts.append(concept)
            previews.append(mask_preview(prepared.image, prepared.mask))
            notes += note
        settings = preset_settings(None if preset == NO_PRESET else preset)
        steps = int(settings.get("num_inference_steps", steps))
        method = Elite(self.elite, concepts, placeholders, None if preset == "paper" else float(elite_scale))
        scale = method.scale_for(prompt)  # the paper preset: lambda by prompt
        result = method(
            prompt,
            seed=int(seed),
            num_inference_steps=min(steps, self.max_steps),
            guidance_scale=float(settings.get("guidance_scale", guidance)),
            num_images_per_prompt=int(num_images),
            boxes=boxes,
            preset=None if preset == NO_PRESET else preset,
        )
        status = f"lambda {scale:g}, {min(steps, self.max_steps)} steps, seed {int(seed)}; " + "; ".join(notes)
        return list(result.images), previews, status

    # ---- the page ------------------------------------------------------------------------------------
    def build(self):
        import gradio as gr

        presets = [NO_PRESET, *PRESETS]

        def one(editor, extra, auto_mask, mask_word, prompt, scale, seed, steps, preset, guidance, num_images):
            try:
                photo, painted = painted_mask(editor)
                if photo is None:
                    raise ConceptInputError("upload a photo of your object first")
                inputs = self.concept_inputs(photo, painted, extra, auto_mask, mask_word)
                return self.generate(prompt, [inputs], scale, seed, steps, preset, guidance, num_images)
            except (ConceptInputError, ValueError) as err:
                raise gr.Error(str(err)) from None

        def two(editor1, editor2, box1, box2, auto_mask, prompt, scale, seed, steps, preset, guidance, num_images):
            try:
                inputs = []
                for k, editor in enumerate((editor1, editor2)):
                    photo, painted = painted_mask(editor)
                    if photo is None:
                        raise ConceptInputError(f"upload a photo for S{k + 1}")
                    inputs.append(self.concept_inputs(photo, painted, None, auto_mask, ""))
                boxes = [_box(box1), _box(box2)]
                if any(b is None for b in boxes) and any(b is not None for b in boxes):
                    raise ConceptInputError("give a box to both concepts, or to neither")
                return self.generate(
                    prompt,
                    inputs,
                    scale,
                    seed,
                    steps,
                    preset,
                    guidance,
                    num_images,
                    boxes=boxes if boxes[0] else None,
                    placeholders=["S1", "S2"],
                )
            except (ConceptInputError, ValueError) as err:
                raise gr.Error(str(err)) from None

        def sampling_controls():
            with gr.Row():
                scale = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="lambda (local detail)", elem_id="scale")
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            with gr.Row():
                steps = gr.Slider(
                    1, self.max_steps, value=min(50, self.max_steps), step=1, label="steps", elem_id="steps"
                )
                guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="guidance scale")
                num_images = gr.Slider(1, 4, value=1, step=1, label="images")
            preset = gr.Dropdown(
                presets, value=NO_PRESET, label="preset (paper: LMS 100 steps, guidance 5, lambda by prompt)"
            )
            return scale, seed, steps, preset, guidance, num_images

        with gr.Blocks(title="Zero-step personalization", analytics_enabled=False) as page:
            gr.Markdown(
                "## Your object in new scenes, in one forward pass (ELITE)\n"
                "Upload a photo, paint over the object (or leave it: it is masked automatically), "
                "write a prompt with **S\\*** for it."
            )
            with gr.Tab("One concept"):
                with gr.Row():
                    with gr.Column():
                        editor = gr.ImageEditor(
                            type="pil", label="photo (paint the object to mask it)", elem_id="photo"
                        )
                        extra = gr.File(
                            file_count="multiple", file_types=["image"], label="more photos of it (optional)"
                        )
                        with gr.Row():
                            auto_mask = gr.Checkbox(value=True, label="automatic mask when not painted")
                            mask_word = gr.Textbox(value="", label="what to segment (e.g. dog)", elem_id="mask_word")
                        prompt = gr.Textbox(value="a photo of S* on the beach", label="prompt", elem_id="prompt")
                        controls = sampling_controls()
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column():
                        gallery = gr.Gallery(label="images", elem_id="gallery", columns=2, height=360)
                        masks = gr.Gallery(
                            label="what was encoded (mask shown)", elem_id="masks", columns=3, height=240
                        )
                        status = gr.Textbox(label="settings used", elem_id="status", interactive=False)
                run.click(one, [editor, extra, auto_mask, mask_word, prompt, *controls], [gallery, masks, status])
            with gr.Tab("Two concepts"):
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            editor1 = gr.ImageEditor(type="pil", label="S1", elem_id="photo1")
                            editor2 = gr.ImageEditor(type="pil", label="S2", elem_id="photo2")
                        with gr.Row():
                            box1 = gr.Textbox(label="S1 box x0,y0,x1,y1 (optional)", placeholder="0,0.2,0.5,1")
                            box2 = gr.Textbox(label="S2 box x0,y0,x1,y1 (optional)", placeholder="0.5,0.2,1,1")
                        auto_mask2 = gr.Checkbox(value=True, label="automatic masks when not painted")
                        prompt2 = gr.Textbox(value="S1 and S2 on a table", label="prompt (S1, S2)")
                        controls2 = sampling_controls()
                        run2 = gr.Button("Generate", variant="primary", elem_id="generate2")
                    with gr.Column():
                        gallery2 = gr.Gallery(label="images", columns=2, height=360)
                        masks2 = gr.Gallery(label="what was encoded", columns=3, height=240)
                        status2 = gr.Textbox(label="settings used", interactive=False)
                run2.click(
                    two, [editor1, editor2, box1, box2, auto_mask2, prompt2, *controls2], [gallery2, masks2, status2]
                )
        return page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("python -m inference.app"), description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default="CompVis/stable-diffusion-v1-4", help="Stable Diffusion pipeline (folder or Hub id)"
    )
    parser.add_argument("--encoders", required=True, help="ELITE encoders folder or Hub repo")
    parser.add_argument("--image-encoder", default=None, help="image encoder (default: the one the encoders record)")
    parser.add_argument("--mask-model", default=DEFAULT_MASK_MODEL, help="CLIPSeg for automatic masks ('' to turn off)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument(
        "--max-steps", type=int, default=100, help="the most sampling steps the page allows (default: 100)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also a public gradio.live link")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_keyed_args(build_parser(), argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web demo needs gradio: pip install 'zero-step-personalization[app]'", file=sys.stderr)
        return 2
    try:
        elite = ElitePipeline.from_pretrained(
            args.base,
            encoders=args.encoders,
            image_encoder=args.image_encoder,
            device=args.device,
            dtype=args.dtype,
            allow_sdxl=True,
        )
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    page = DemoApp(elite, args.mask_model or None, max_steps=args.max_steps).build()
    limit_uploads()
    page.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
