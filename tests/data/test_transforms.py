"""The train transform, pixel for pixel: the crop rule, the bicubic resize of exactly that box, the flip, the
JPEG draft decode, and CLIP normalisation against the literal constants."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.transforms import normalize, random_crop_box, train_image
from tests.helpers.data import CLIP_MEAN, CLIP_STD, encoded, ramp_with_marker

WHITE = torch.tensor([255, 255, 255], dtype=torch.uint8).view(3, 1, 1)


def rule_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, written from its documentation, drawing from `rng` (left is
    drawn before top): 10 tries at an area fraction uniform in `scale` and an aspect log-uniform in `ratio`;
    if none fits, the central crop of the allowed aspect nearest the image's (the whole image when in range)."""
    for _ in range(10):
        target_area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def pil_crop_resized(data: bytes, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The expected train pixels, by PIL alone: decode fully, resize `box` bicubic to size x size."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return as_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (96, 96), (120, 100), (1000, 10), (10, 1000)])
@pytest.mark.parametrize("scale", [(0.5, 1.0), (1.0, 1.0), (0.08, 1.0)])
def test_crop_box_is_random_resized_crops_rule(size, scale):
    for seed in range(100):
        ours, reference = random.Random(seed), random.Random(seed)
        assert random_crop_box(*size, ours, scale) == rule_box(*size, reference, scale), seed
        assert ours.getstate() == reference.getstate()  # the same draws: the flip draw that follows is the same


def test_crop_box_fallback_is_torchvisions_central_crop():
    """When no try fits: a central crop at the nearest allowed aspect, the whole image when its aspect is allowed.
    Scale (1, 1) on a 6:5 image misses in most tries (the aspect must land within rounding of 1.2), and a try
    that fits is within a pixel of the whole image: never the central 100x100 square."""
    for seed in range(20):
        assert random_crop_box(1000, 10, random.Random(seed), (0.5, 1.0)) == (493, 0, 506, 10)  # 13 = 10 * 4/3
        assert random_crop_box(10, 1000, random.Random(seed), (0.5, 1.0)) == (0, 493, 10, 506)
        left, top, right, bottom = random_crop_box(120, 100, random.Random(seed), (1.0, 1.0))
        assert right - left >= 119 and bottom - top >= 99


def test_train_image_is_the_bicubic_resize_of_the_drawn_box():
    data = encoded(ramp_with_marker(60, 40, marker=(6, 24, 10, 30)), "PNG")
    whole = pil_crop_resized(data, (0, 0, 60, 40), 16)
    for seed in range(8):
        box = rule_box(60, 40, random.Random(seed), (0.5, 1.0))
        expected = pil_crop_resized(data, box, 16)
        assert box != (0, 0, 60, 40) and not torch.equal(expected, whole)  # the crop shows in the pixels
        pixels = train_image(data, random.Random(seed), size=16, scale=(0.5, 1.0))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
        assert torch.equal(pixels, expected), (seed, box)


def test_a_large_jpeg_decoded_at_draft_scale_keeps_the_drawn_box():
    """256x256 JPEG to 16x16: libjpeg decodes at 1/8 scale and the box is scaled with it. Against PIL's full
    decode the difference is DCT rounding (measured: mean 0.4-0.6, max 11 levels, at the marker's edges); a box
    left unscaled or shifted by a pixel of the small image differs by tens of levels on this ramp."""
    data = encoded(ramp_with_marker(256, 256, marker=(40, 100, 56, 116)), "JPEG", quality=95)
    draft = Image.open(io.BytesIO(data))
    draft.draft("RGB", (32, 32))
    assert draft.size == (32, 32)  # the reduced decode this test is about does happen
    for seed in range(4):
        box = rule_box(256, 256, random.Random(seed), (0.5, 1.0))
        difference = (train_image(data, random.Random(seed), size=16).int() - pil_crop_resized(data, box, 16)).abs()
        assert difference.float().mean() < 1.5 and difference.max() < 32, (seed, box)


def test_flip_is_off_by_default_and_mirrors_the_same_crop():
    """A 32x32 picture at scale (1, 1) and size 32 comes back unchanged, so a flip must move the marker pixel
    from column 5 to column 26 exactly; at scale (0.5, 1) a flip mirrors the crop drawn without it (the flip
    draws nothing: the caller decides it, as it must mirror the caption too)."""
    picture = ramp_with_marker(32, 32, marker=(5, 9, 6, 10))
    data = encoded(picture, "PNG")
    original = as_tensor(picture)
    for seed in range(8):
        assert torch.equal(train_image(data, random.Random(seed), size=32, scale=(1.0, 1.0)), original)
        pixels = train_image(data, random.Random(seed), size=32, scale=(1.0, 1.0), flip=True)
        assert (pixels == WHITE).all(dim=0).nonzero().tolist() == [[9, 26]]  # [[row, column]]
        assert torch.equal(pixels, original.flip(2))
        cropped = train_image(data, random.Random(seed), size=16, scale=(0.5, 1.0))
        assert torch.equal(train_image(data, random.Random(seed), size=16, scale=(0.5, 1.0), flip=True),
                           cropped.flip(2))


def test_normalize_uses_the_clip_statistics():
    pixels = torch.arange(2 * 3 * 8 * 8).remainder(256).to(torch.uint8).view(2, 3, 8, 8)
    pixels[0, :, 0, 0], pixels[0, :, 0, 1] = 0, 255
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    result = normalize(pixels)
    assert result.dtype == torch.float32 and pixels[0, 0, 0, 1] == 255  # the uint8 input is left alone
    torch.testing.assert_close(result.double(), (pixels.double() / 255 - mean) / std, rtol=0, atol=1e-5)
    # black and white per channel, as numbers: x/255 (0 and 1) or ImageNet's statistics would not give these
    torch.testing.assert_close(result[0, :, 0, 0].double(), torch.tensor([-1.79226, -1.75209, -1.48021],
                               dtype=torch.float64), rtol=0, atol=1e-4)  # fmt: skip
    torch.testing.assert_close(result[0, :, 0, 1].double(), torch.tensor([1.93030, 2.07485, 2.14589],
                               dtype=torch.float64), rtol=0, atol=1e-4)  # fmt: skip
