"""Read a concept photo and its object mask, the way users hand them over, and check them.

A concept is one photo of the user's object plus a mask of where the object is. The mask may come
as a separate file, as the photo's alpha channel (an RGBA cut-out), or not at all (then the whole
photo is the object, with a warning). Pixels are read as `data_prep` reads them
(`encoders.common.images`): any photo mode becomes 8-bit RGB (16-bit grey scaled from its full range),
and a mask pixel is object where its brightest channel is above a threshold (white, grey, or any
colour; 127 by default, the encoders' `mask_threshold` when they encode, 0 for official ELITE
settings), or by its alpha when a flat-coloured mask has transparency. Everything that can go wrong with these
files gets a clear error that names the file, or a warning that says what was done about it:

- unreadable photo or mask            -> `ConceptInputError` naming the file and the reason
- photo under 16 px, object under 8 px -> `ConceptInputError` (too small to encode)
- EXIF-rotated photo                   -> turned upright; its mask turned with it when the mask has the
                                          size of the photo's stored (unrotated) pixels, with a warning
- mask of another size than the photo  -> resized (nearest) with a warning
- empty mask                           -> `ConceptInputError`
- no mask and no alpha                 -> whole photo, with a warning

`prepare_concept_image` can then crop a square around the mask (`concept_crop="square"`: object
crops with a small margin, as `data_prep` makes them, so a small object in a big photo fills the
image encoder's view); the official ELITE inference encodes the whole photo.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from encoders.common.images import MAX_IMAGE_PIXELS, apply_orientation, exif_orientation, mask_to_binary, to_rgb

ImageLike = str | Path | Image.Image

# Fraction of the object box added on each side when cropping around the mask: data_prep's crop
# padding (configs/data/crops.yaml), so the encoders see objects framed as in training.
DEFAULT_CROP_MARGIN = 0.1
# Default object threshold of `load_concept_image`: a brightest channel of 128 and up is object.
DEFAULT_MASK_THRESHOLD = 127
# Letterbox fill when an object is longer than the photo's short side: CLIP's mean colour, as data_prep.
LETTERBOX_RGB = (122, 116, 104)


class ConceptInputError(ValueError):
    """A concept photo, mask or prompt that cannot be used; the message names the file or prompt."""


class ConceptInputWarning(UserWarning):
    """Something about a concept input was fixed up (mask resized, no mask given); says what."""


@dataclass
class ConceptImage:
    """A concept photo and its object mask, checked and aligned.

    image: RGB photo (cropped around the object when prepared); mask: mode "L", 0/255, same size.
    source / mask_source: where they came from (file name, "alpha channel", "whole image").
    crop_xyxy: the region of the original photo that `image` shows, in original pixels.
    """

    image: Image.Image
    mask: Image.Image
    source: str
    mask_source: str
    crop_xyxy: tuple[int, int, int, int]

    @property
    def mask_fraction(self) -> float:
        return float((np.asarray(self.mask) > 0).mean())

    def masked_image(self, background: int = 0) -> Image.Image:
        """The object alone (x * m): background pixels set to `background` (black, as ELITE does)."""
        fill = Image.new("RGB", self.image.size, (background,) * 3)
        return Image.composite(self.image, fill, self.mask)


def _describe(source: ImageLike) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<in-memory {type(source).__name__} {getattr(source, 'size', '')}>"


MIN_PHOTO_SIDE = 16  # px: a smaller photo holds too little to encode
MIN_OBJECT_SIDE = 8  # px: the object's box in the mask must be at least this on each side


def _open_image(source: ImageLike, what: str) -> Image.Image:
    """Open and fully decode an image (so a truncated file fails here, with its name); EXIF not applied."""
    if isinstance(source, Image.Image):
        check_pixel_count(source, f"{what} {_describe(source)}")
        return source
    path = Path(source)
    if not path.is_file():
        raise ConceptInputError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as opened:
            check_pixel_count(opened, f"{what} {path}")  # from the header, before any pixel is decoded
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise ConceptInputError(f"{what} {path}: cannot be read as an image ({err})") from err


def check_pixel_count(image: Image.Image, name: str) -> None:
    """Refuse an image larger than `MAX_IMAGE_PIXELS` (a decompression bomb, or a photo to shrink first)."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ConceptInputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.0f} million pixels; the limit is "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} million. Resize it first (the encoder sees 224 px)"
        )


def _binary_mask(mask: Image.Image, threshold: int) -> Image.Image:
    """Any-mode mask -> mode "L", values 0/255: object where the brightest channel (or the alpha of a
    flat-coloured mask) is above `threshold` (`encoders.common.images.mask_to_binary`'s rule)."""
    return Image.fromarray(mask_to_binary(mask, threshold + 1).astype(np.uint8) * 255, mode="L")


def _upright_mask(
    mask: Image.Image,
    photo_orientation: int,
    stored_size: tuple[int, int],
    upright_size: tuple[int, int],
    mask_name: str,
    photo_name: str,
) -> Image.Image:
    """The mask in the upright photo's frame: its own EXIF applied, then the photo's turn when the mask
    has the size of the photo's stored pixels (drawn on the file as stored, not as shown)."""
    own = exif_orientation(mask)
    if own != 1:
        return apply_orientation(mask, own)
    if photo_orientation == 1 or mask.size == upright_size and stored_size != upright_size:
        return mask
    if mask.size == stored_size and stored_size != upright_size:
        warnings.warn(
            f"mask {mask_name} is {mask.size[0]}x{mask.size[1]}, the size of {photo_name} as stored, but the photo "
            f"is shown turned (EXIF orientation {photo_orientation}): turning the mask with it",
            ConceptInputWarning,
            stacklevel=3,
        )
        return apply_orientation(mask, photo_orientation)
    if mask.size == stored_size:  # a square photo: the mask fits both frames
        warnings.warn(
            f"{photo_name} is shown turned (EXIF orientation {photo_orientation}); reading the mask {mask_name} "
            "on the photo as shown. If it was drawn on the stored pixels, save it upright (or with the same EXIF tag)",
            ConceptInputWarning,
            stacklevel=3,
        )
    return mask


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_concept_image(
    image: ImageLike, mask: ImageLike | None = None, mask_threshold: int = DEFAULT_MASK_THRESHOLD
) -> ConceptImage:
    """Read a concept photo and its mask, with the checks listed in the module docstring.

    `mask` wins over an alpha channel when both are there (with a warning, so nobody is surprised).
    A mask pixel is object where its brightest channel (or alpha) is above `mask_threshold` (default
    127; encoders pass their own, the official ELITE value being 0: any pixel that is not black).
    """
    name = _describe(image)
    stored = _open_image(image, "concept image")
    orientation = exif_orientation(stored)
    # photos from phones carry their rotation in EXIF: show the object the way the user sees it
    photo = apply_orientation(stored, orientation)
    if min(photo.size) < MIN_PHOTO_SIDE:
        raise ConceptInputError(
            f"concept image {name} is {photo.size[0]}x{photo.size[1]} px: too small to encode "
            f"(at least {MIN_PHOTO_SIDE} px on each side)"
        )
    alpha = photo.convert("RGBA").getchannel("A") if _has_alpha(photo) else None
    try:
        rgb, _ = to_rgb(photo)
    except ValueError as err:
        raise ConceptInputError(f"concept image {name}: {err}") from err

    if mask is not None:
        mask_name = _describe(mask)
        mask_image = _upright_mask(_open_image(mask, "mask"), orientation, stored.size, photo.size, mask_name, name)
        binary = _binary_mask(mask_image, mask_threshold)
        mask_source = mask_name
        if alpha is not None and np.asarray(alpha).min() < 255:
            warnings.warn(
                f"concept image {name} has an alpha channel; using the mask {mask_name} instead of it",
                ConceptInputWarning,
                stacklevel=2,
            )
        if binary.size != rgb.size:
            warnings.warn(
                f"mask {mask_name} is {binary.size[0]}x{binary.size[1]} but the image {name} is "
                f"{rgb.size[0]}x{rgb.size[1]}; resizing the mask to the image (nearest)",
                ConceptInputWarning,
                stacklevel=2,
            )
            binary = binary.resize(rgb.size, Image.NEAREST)
    elif alpha is not None and np.asarray(alpha).min() < 255:
        binary = _binary_mask(alpha, mask_threshold)
        mask_name, mask_source = f"alpha channel of {name}", "alpha channel"
    else:
        warnings.warn(
            f"no mask for concept image {name}: using the whole image as the object "
            "(pass a mask, or an RGBA cut-out, for better detail)",
            ConceptInputWarning,
            stacklevel=2,
        )
        binary = Image.new("L", rgb.size, 255)
        mask_name, mask_source = "whole image", "whole image"

    pixels = np.asarray(binary) > 0
    if not pixels.any():
        raise ConceptInputError(
            f"{mask_name}: the mask is empty (no pixel with a channel above {mask_threshold}), so there is nothing "
            "to encode"
        )
    ys, xs = np.nonzero(pixels)
    width, height = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    if min(width, height) < MIN_OBJECT_SIDE:
        raise ConceptInputError(
            f"{mask_name}: the object is only {width}x{height} px in the mask; ELITE needs at least "
            f"{MIN_OBJECT_SIDE} px on each side to encode it"
        )
    return ConceptImage(rgb, binary, name, mask_source, (0, 0, rgb.size[0], rgb.size[1]))


def square_box_around(
    box: tuple[int, int, int, int], size: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    """A square holding `box` plus `margin` x its longest side on each side, as data_prep cuts crops.

    The square is shifted to stay inside the image. When it is longer than the image's short side
    (an object that fills the photo's width), it is centred on the image along that axis and passes
    its edges: the part outside is letterboxed by `crop_square`.
    """
    x0, y0, x1, y1 = box
    width, height = size
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = max(int(round(min(side, max(width, height)))), 1)

    def start(centre: float, extent: int) -> int:
        if side <= extent:
            return int(round(min(max(centre - side / 2, 0), extent - side)))
        return (extent - side) // 2  # wider than the image: centre on it, letterbox both sides

    left, top = start((x0 + x1) / 2, width), start((y0 + y1) / 2, height)
    return left, top, left + side, top + side


def crop_square(image: Image.Image, square: tuple[int, int, int, int], fill) -> Image.Image:
    """`image` cut to `square`; where the square passes the image edge it is filled with `fill`."""
    left, top, right, bottom = square
    if left >= 0 and top >= 0 and right <= image.width and bottom <= image.height:
        return image.crop(square)
    canvas = Image.new(image.mode, (right - left, bottom - top), fill)
    inside = (max(left, 0), max(top, 0), min(right, image.width), min(bottom, image.height))
    canvas.paste(image.crop(inside), (inside[0] - left, inside[1] - top))
    return canvas


def prepare_concept_image(
    concept: ConceptImage, crop: bool = True, margin: float = DEFAULT_CROP_MARGIN
) -> ConceptImage:
    """Crop photo and mask to a square around the object (when `crop`), as the encoders saw in training.

    An object longer than the photo's short side keeps all of it: the square passes the photo's edge
    and is letterboxed with CLIP's mean colour (mask 0 there), like data_prep's crops.
    """
    if not crop or concept.mask_source == "whole image":
        return concept
    mask_np = np.asarray(concept.mask) > 0
    ys, xs = np.nonzero(mask_np)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    square = square_box_around(box, concept.image.size, margin)
    ox, oy = concept.crop_xyxy[:2]
    return ConceptImage(
        image=crop_square(concept.image, square, LETTERBOX_RGB),
        mask=crop_square(concept.mask, square, 0),
        source=concept.source,
        mask_source=concept.mask_source,
        crop_xyxy=(ox + square[0], oy + square[1], ox + square[2], oy + square[3]),
    )


def placeholder_in(prompt: str, placeholder: str) -> bool:
    """Whether `placeholder` is a word of `prompt` on its own (not glued to letters or digits: "S12"
    holds neither S1 nor S2; "S*'s" holds S*)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(placeholder)}(?![A-Za-z0-9])", prompt) is not None


def find_placeholders(prompt: str, placeholders: list[str]) -> None:
    """Raise `ConceptInputError` unless every placeholder occurs in `prompt` as a word of its own."""
    missing = [p for p in placeholders if not placeholder_in(prompt, p)]
    if missing:
        names = ", ".join(repr(p) for p in missing)
        raise ConceptInputError(
            f"prompt {prompt!r} does not contain the placeholder {names} as a word of its own; write it where the "
            "concept goes, "
            f"e.g. {('a photo of ' + missing[0] + ' on the beach')!r}"
        )


def truncated_prompt(tokenizer, prompt: str) -> dict | None:
    """None when `prompt` fits the text encoder; else what it would lose: its token count, the limit and
    the words that are kept (CLIP reads 77 tokens, start and end included, and drops the rest)."""
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = int(tokenizer.model_max_length)
    if len(ids) <= limit:
        return None
    kept = tokenizer.decode(ids[1 : limit - 1])
    return {"tokens": len(ids), "limit": limit, "kept": kept}


def check_placeholders(placeholders: list[str], tokenizer=None) -> None:
    """Refuse placeholders that cannot stand for a concept: empty, with spaces, repeated, or (given the
    base's tokenizer) a word the text encoder already reads as one token ('dog' would replace every dog)."""
    seen = set()
    for token in placeholders:
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ConceptInputError(f"placeholder {token!r} must be one word without spaces, e.g. S* or <my-dog>")
        if token in seen:
            raise ConceptInputError(f"placeholder {token!r} is given twice; each concept needs its own")
        seen.add(token)
        if tokenizer is None or token in tokenizer.get_added_vocab():  # added by an earlier call: a placeholder
            continue
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) == 1:
            raise ConceptInputError(
                f"placeholder {token!r} is a word the text encoder already knows; a concept put there would take the "
                "place of that word everywhere. Choose a new token, e.g. S* or <my-" + token.strip("<>") + ">"
            )
