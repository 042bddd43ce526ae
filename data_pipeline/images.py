"""Guarded image decoding and the shard writer's resize/re-encode step (PIL only)."""

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

# PIL's own bomb guard is a warning below 2x this; we check an explicit, configurable limit instead.
DEFAULT_MAX_PIXELS = 89_478_485
# Shorter side below this is a thumbnail, icon or spacer: the 0.5-scale random crop would upscale under 46 px of
# content to the model's input (ALBEF: 256 px), i.e. train on interpolation. Real COCO/Flickr images are >= 100 px.
DEFAULT_MIN_SIDE = 64
# only these decoders are ever tried (less attack surface, and no probing of dozens of plugins)
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageRejected(Exception):
    """An image that must be skipped; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily, refusing decompression bombs from the header before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: we reject by our own limit just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
    except Image.DecompressionBombError as exc:  # over 2x PIL's limit PIL refuses first; still a pixel bomb
        raise ImageRejected("too_many_pixels", str(exc)) from exc
    except Exception as exc:
        raise ImageRejected(_decode_failure(exc), str(exc)) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    return image


def check_min_side(image: Image.Image, min_side: int) -> None:
    """Reject an image whose shorter side is under `min_side` (from the header: nothing is decoded)."""
    if min(image.size) < min_side:
        raise ImageRejected("image_too_small", f"{image.width}x{image.height}: shorter side < {min_side}")


def load_rgb(image: Image.Image) -> Image.Image:
    """Fully decode (so truncated files fail here, not later) and convert to RGB (no copy if it is RGB)."""
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:
        raise ImageRejected(_decode_failure(exc), str(exc)) from exc


def _decode_failure(exc: Exception) -> str:
    """A file cut short (an interrupted download or copy: fetch it again) apart from bytes that are no image."""
    return "truncated_image" if "truncated" in str(exc).lower() else "undecodable_image"


@dataclass
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str


def prepare_for_shard(
    data: bytes,
    *,
    max_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    quality: int = 90,
) -> PreparedImage:
    """Shorter side down to `max_size` (aspect kept) and JPEG-encode; small JPEGs keep their exact bytes.

    Images whose shorter side is under `min_side` are rejected as `image_too_small`, from the header alone.
    """
    image = open_checked(data, max_pixels)
    check_min_side(image, min_side)
    is_jpeg = image.format == "JPEG"
    original = image.size
    rgb = load_rgb(image)
    if min(original) > max_size:
        scale = max_size / min(original)
        size = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    elif is_jpeg:
        return PreparedImage(data, *original, *original, hashlib.sha256(data).hexdigest())
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    encoded = buffer.getvalue()
    return PreparedImage(encoded, *rgb.size, *original, hashlib.sha256(encoded).hexdigest())
