"""JPEG decoding through libjpeg-turbo (simplejpeg) where installed, PIL otherwise.

Both decode in the DCT domain at 1/2, 1/4 or 1/8 scale when the caller needs at most that many pixels
(PIL's `draft` rule: the largest power-of-two reduction that keeps both sides at least the requested size),
so both give the same pixels up to the IDCT rounding of the libjpeg build. simplejpeg saves PIL's
per-image overhead (file object, tile loop, mode conversion), which dominates on small images. Any image
the turbo path cannot take (CMYK, a damaged stream, a non-BytesIO source) goes to PIL, which decodes it
or rejects it with the usual reason.
"""

import io
import math

from PIL import Image

from data_pipeline.images import load_rgb

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything without it
    simplejpeg = None

DRAFT_SCALES = (8, 4, 2)


def turbo_available() -> bool:
    return simplejpeg is not None


def draft_scale(size: tuple[int, int], wanted: tuple[int, int]) -> int:
    """PIL's draft reduction: the largest of 8, 4, 2 that the stored size divided by `wanted` allows, else 1."""
    allowed = min(size[0] // max(1, wanted[0]), size[1] // max(1, wanted[1]))
    return next((scale for scale in DRAFT_SCALES if scale <= allowed), 1)


def decode_rgb(image: Image.Image, wanted: tuple[int, int], turbo: bool = True) -> Image.Image:
    """The opened (not yet loaded) `image` decoded to RGB with at least `wanted` pixels per side where it has them.

    JPEGs opened from bytes are decoded by libjpeg-turbo when installed and `turbo` is set; everything else,
    and every JPEG the turbo path refuses, by PIL with its draft mode.
    """
    if image.format != "JPEG":
        return load_rgb(image)
    scale = draft_scale(image.size, wanted)
    # CMYK goes to PIL: simplejpeg converts it to RGB itself, one level apart from PIL (and the HF processor)
    usable = turbo and simplejpeg is not None and isinstance(image.fp, io.BytesIO) and image.mode in ("RGB", "L")
    data = image.fp.getvalue() if usable else None
    if data is not None:
        try:
            # libjpeg-turbo picks the smallest scale n/8 keeping both sides at least this: exactly 1/scale
            pixels = simplejpeg.decode_jpeg(
                data, "RGB", min_width=math.ceil(image.size[0] / scale), min_height=math.ceil(image.size[1] / scale)
            )
            return Image.fromarray(pixels)
        except ValueError:  # CMYK or damaged: PIL decodes it or names the reason
            pass
    image.draft("RGB", wanted)  # the same rule as draft_scale
    return load_rgb(image)
