"""ELITE in the other Stable Diffusion pipeline families: img2img, inpainting, ControlNet, and LoRAs beside it.

ELITE changes only the UNet's attention processors and the prompt embeddings it hands the pipeline, so any
diffusers pipeline that shares the UNet (made with `from_pipe`) generates with it: `family_pipeline` makes the
img2img / inpainting / ControlNet pipeline from a loaded one with diffusers' `AutoPipelineFor*` (SD and SDXL
alike) and says which call arguments it needs; `load_loras` loads LoRAs with diffusers' own
`load_lora_weights` (through peft). In Python:

    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    elite = load_elite(pipe, ENCODERS)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    images = load_elite(img2img, ENCODERS)("a photo of S*", concept, image=init, strength=0.6).images
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from .inputs import ConceptInputError, check_pixel_count


@dataclass
class FamilyInputs:
    """What turns a text-to-image call into another family's: an init image (img2img), a mask on it (inpainting),
    a control image with its ControlNet. All images are resized to the generated size."""

    init_image: str | None = None
    strength: float = 0.8
    inpaint_mask: str | None = None
    control_image: str | None = None
    controlnet: str | None = None
    controlnet_scale: float = 1.0

    @property
    def kind(self) -> str:
        if self.inpaint_mask:
            return "inpainting"
        return "img2img" if self.init_image else "text2img"

    @property
    def any(self) -> bool:
        return bool(self.init_image or self.inpaint_mask or self.control_image or self.controlnet)

    def check(self) -> None:
        """Refuse combinations that cannot mean anything, naming the options, before any model loads."""
        if self.inpaint_mask and not self.init_image:
            raise ConceptInputError("--inpaint-mask needs --init-image (the picture whose masked part is repainted)")
        if bool(self.control_image) != bool(self.controlnet):
            raise ConceptInputError("--control-image and --controlnet go together (the ControlNet reads the image)")
        if not 0.0 < self.strength <= 1.0:
            raise ConceptInputError(f"--strength must be in (0, 1], got {self.strength}")


def open_picture(path: str, option: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A picture given on the command line, resized to the generated (width, height); errors name the option."""
    try:
        with Image.open(path) as image:
            check_pixel_count(image, path)
            return image.convert(mode).resize(size, Image.BICUBIC if mode == "RGB" else Image.NEAREST)
    except FileNotFoundError:
        raise ConceptInputError(f"{option} {path}: no such file") from None
    except (OSError, ValueError) as err:
        raise ConceptInputError(f"{option} {path}: not a readable image ({err})") from None


def family_pipeline(pipe, inputs: FamilyInputs, width: int, height: int):
    """`(pipeline, call keywords)`: `pipe` itself for plain text-to-image, else the img2img / inpainting / ControlNet
    pipeline made from it with `from_pipe` (sharing its UNet, so ELITE loaded on `pipe` acts there too)."""
    if not inputs.any:
        return pipe, {}
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        ControlNetModel,
    )

    extra: dict = {}
    components: dict = {}
    if inputs.controlnet:
        components["controlnet"] = ControlNetModel.from_pretrained(inputs.controlnet, torch_dtype=pipe.unet.dtype).to(
            pipe.device
        )
        extra["controlnet_conditioning_scale"] = inputs.controlnet_scale
    auto = {
        "text2img": AutoPipelineForText2Image,
        "img2img": AutoPipelineForImage2Image,
        "inpainting": AutoPipelineForInpainting,
    }[inputs.kind]
    family = auto.from_pipe(pipe, **components)
    size = (width, height)
    if inputs.init_image:
        extra.update(image=open_picture(inputs.init_image, "--init-image", size), strength=inputs.strength)
    if inputs.inpaint_mask:
        extra["mask_image"] = open_picture(inputs.inpaint_mask, "--inpaint-mask", size, mode="L")
    if inputs.control_image:
        control = open_picture(inputs.control_image, "--control-image", size)
        extra["image" if inputs.kind == "text2img" else "control_image"] = control
    return family, extra


def load_loras(pipe, sources: Sequence[str], scale: float = 1.0) -> list[str]:
    """Load each LoRA (a folder or Hub repo in diffusers' layout, or a .safetensors file) with diffusers'
    `load_lora_weights`, all active at `scale`; returns the adapter names."""
    names = []
    for k, source in enumerate(sources):
        name = f"lora_{k}"
        try:
            pipe.load_lora_weights(source, adapter_name=name)
        except (OSError, ValueError) as err:
            raise ConceptInputError(f"--lora {source}: cannot be loaded as a diffusers LoRA ({err})") from None
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[float(scale)] * len(names))
    return names


def load_ip_adapter(pipe, source: str, image: str, scale: float = 1.0) -> dict:
    """An IP-Adapter (a `training.ip_adapter` export, its `ip_adapter/` folder, or a Hub repo with `ip_adapter/`)
    loaded with diffusers' `load_ip_adapter` at `scale`; returns the call keywords with the image prompt. ELITE on
    the same pipeline adds the image prompt's attention to its own (`encoders.attention`)."""
    from encoders.ip_adapter import EXPORT_FILE

    from .methods import MethodError, locate_ip_adapter

    try:
        folder, subfolder = locate_ip_adapter(source)
        pipe.load_ip_adapter(folder, subfolder=subfolder, weight_name=EXPORT_FILE)
    except (OSError, ValueError, MethodError) as err:
        raise ConceptInputError(f"--ip-adapter {source}: cannot be loaded as an IP-Adapter ({err})") from None
    pipe.set_ip_adapter_scale(float(scale))
    try:
        with Image.open(image) as opened:
            check_pixel_count(opened, image)
            picture = opened.convert("RGB")
    except FileNotFoundError:
        raise ConceptInputError(f"--ip-adapter-image {image}: no such file") from None
    except (OSError, ValueError) as err:
        raise ConceptInputError(f"--ip-adapter-image {image}: not a readable image ({err})") from None
    return {"ip_adapter_image": picture}
