"""Image transforms without torchvision: random resized crop, flip, ALBEF's RandAugment, normalization, eval resize.

JPEGs decode at 1/2, 1/4 or 1/8 scale in the DCT domain when the crop will be downsampled anyway (jpeg.py:
libjpeg-turbo where installed, else PIL's draft mode), which is most of the loader's speed advantage on
large images.
"""

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance, ImageStat

from data_pipeline.images import DEFAULT_MAX_PIXELS, check_min_side, open_checked
from data_pipeline.jpeg import decode_rgb

# CLIP/ALBEF statistics; the model room normalizes nothing itself.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def random_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """The crop rule of torchvision's RandomResizedCrop: area in `scale`, log-uniform aspect in `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # fallback, as torchvision's: the central crop at the allowed aspect nearest the image's (whole if allowed)
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _decode_for(image: Image.Image, box: tuple[int, int, int, int], size: int):
    """Decode with the largest JPEG draft reduction that keeps the crop box at least `size` pixels."""
    full_w, full_h = image.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    rgb = decode_rgb(image, (math.ceil(full_w * size / crop_w), math.ceil(full_h * size / crop_h)))
    sx, sy = rgb.size[0] / full_w, rgb.size[1] / full_h
    return rgb, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


# ALBEF's RandomAugment ops without its colour-changing ones (AutoContrast and Equalize stretch each channel
# apart, Brightness moves a gray background to black or white): captions name colours, and an op that
# changes them makes a true caption false. Geometry and sharpness leave every colour as it is.
RANDAUGMENT_OPS = ("identity", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "rotate")


@dataclass(frozen=True)
class RandAugment:
    """`ops` ops drawn uniformly (with replacement) from RANDAUGMENT_OPS, each applied with probability 1/2
    at `magnitude` out of 10, with ALBEF's scales (shear 0.3, rotation 30 degrees, translation 10/256 of the
    side, sharpness factor 0.1 + 1.8 m / 10 at magnitude 10) and a random sign for the geometric ones. Areas
    the geometry uncovers take the median colour of the image's border (the background, not ALBEF's gray)."""

    ops: int = 2
    magnitude: int = 7

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        level = self.magnitude / 10
        for name in [rng.choice(RANDAUGMENT_OPS) for _ in range(self.ops)]:
            if rng.random() < 0.5 or name == "identity":
                continue
            if name == "sharpness":
                image = ImageEnhance.Sharpness(image).enhance(0.1 + 1.8 * level)
                continue
            sign = rng.choice((-1, 1))
            fill = _border_colour(image)
            width, height = image.size
            if name == "rotate":
                image = image.rotate(sign * 30 * level, Image.Resampling.BILINEAR, fillcolor=fill)
                continue
            # affine maps output (x, y) to input (a x + b y + c, d x + e y + f); shears keep the centre in place
            shear, shift = sign * 0.3 * level, sign * 10 / 256 * level
            matrix = {
                "shear_x": (1, shear, -shear * height / 2, 0, 1, 0),
                "shear_y": (1, 0, 0, shear, 1, -shear * width / 2),
                "translate_x": (1, 0, shift * width, 0, 1, 0),
                "translate_y": (1, 0, 0, 0, 1, shift * height),
            }[name]
            image = image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                                    fillcolor=fill)
        return image


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    width, height = image.size
    border = Image.new("RGB", (2 * (width + height), 1))
    for offset, strip in enumerate((image.crop((0, 0, width, 1)), image.crop((0, height - 1, width, height)))):
        border.paste(strip, (offset * width, 0))
    for offset, strip in enumerate((image.crop((0, 0, 1, height)), image.crop((width - 1, 0, width, height)))):
        border.paste(strip.transpose(Image.Transpose.ROTATE_90), (2 * width + offset * height, 0))
    return tuple(int(v) for v in ImageStat.Stat(border).median)


def train_image(
    data: bytes,
    rng: random.Random,
    *,
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    flip: bool = False,
    augment: RandAugment | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 0,
) -> torch.Tensor:
    """Random resized crop, then the mirror image if `flip`, then `augment`, to uint8 [3, size, size] (ALBEF's
    order). The caller decides the flip: it must mirror the caption too (text.mirror_caption). An image whose
    shorter side is under `min_side` is rejected as image_too_small."""
    image = open_checked(data, max_pixels)
    check_min_side(image, min_side)
    box = random_crop_box(*image.size, rng, scale)
    rgb, box = _decode_for(image, box, size)
    out = rgb.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if augment is not None:
        out = augment(out, rng)
    return to_uint8_tensor(out)


def eval_image(data: bytes, *, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The whole image resized (bicubic, aspect not kept) to uint8 [3, size, size].

    ALBEF's and BLIP's retrieval evaluation protocol: no crop, so nothing a caption mentions is cut off and
    reported numbers compare with theirs. Decoded whole (no JPEG draft reduction, unlike training) so the
    export's AutoImageProcessor, which decodes whole, gives these pixels for every image size.
    """
    image = open_checked(data, max_pixels)
    rgb = decode_rgb(image, image.size)
    return to_uint8_tensor(rgb.resize((size, size), Image.Resampling.BICUBIC))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalized float, once per batch (in place: ~20x faster than `(x - m) / s`)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    inverse_std = 1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    return batch.float().sub_(mean).mul_(inverse_std)
