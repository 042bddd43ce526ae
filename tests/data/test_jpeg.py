"""The libjpeg-turbo decoder against PIL's: the same reduced size and the same pixels up to IDCT rounding.

Tolerance: decoded uint8 values may differ by at most 2 (libjpeg builds may round the scaled IDCT and the
chroma upsampling differently) and by at most 0.25 on average; with the same libjpeg-turbo build the two
are identical (0 here), so the mean bound catches any real difference (a shifted scale, a wrong colour
conversion shows as tens of levels).
"""

import io
import random

import numpy as np
import pytest
from PIL import Image

from data_pipeline import jpeg
from data_pipeline.images import ImageRejected, open_checked
from data_pipeline.transforms import eval_image, train_image
from tests.helpers.data import encoded, ramp_with_marker

pytestmark = pytest.mark.skipif(not jpeg.turbo_available(), reason="simplejpeg is not installed")
MAX_DIFFERENCE, MAX_MEAN_DIFFERENCE = 2, 0.25


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A ramp with a marker plus seeded noise: every 8x8 block has high-frequency content to round."""
    ramp = np.asarray(ramp_with_marker(width, height, marker=(width // 5, height // 3, width // 2, height // 2)))
    noise = np.random.default_rng(seed).integers(-40, 40, ramp.shape)
    return Image.fromarray(np.clip(ramp.astype(int) + noise, 0, 255).astype(np.uint8))


def pil_decoded(data: bytes, wanted: tuple[int, int]) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", wanted)
    return np.asarray(image.convert("RGB")).astype(int)


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert difference.max() <= MAX_DIFFERENCE and difference.mean() <= MAX_MEAN_DIFFERENCE, (
        difference.max(), difference.mean())  # fmt: skip


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("wanted", [(481, 357), (300, 100), (240, 178), (100, 80), (60, 44), (1, 1)])
def test_turbo_decodes_to_pils_size_and_pixels(subsampling, mode, wanted):
    data = encoded(photo_like(481, 357, seed=sum(wanted)).convert(mode), "JPEG", quality=85, subsampling=subsampling)
    reference = pil_decoded(data, wanted)
    decoded = jpeg.decode_rgb(open_checked(data), wanted)
    scale = jpeg.draft_scale((481, 357), wanted)
    assert decoded.size == (-(-481 // scale), -(-357 // scale))  # ceil: what libjpeg's 1/scale decode gives
    assert_close(np.asarray(decoded), reference)


def test_reduction_follows_pils_draft_rule():
    assert [jpeg.draft_scale((481, 357), w) for w in [(481, 357), (240, 178), (240, 179), (60, 44), (1, 1)]] == [
        1, 2, 1, 8, 8]  # fmt: skip


def test_train_and_eval_pixels_equal_the_pil_path(monkeypatch):
    data = encoded(photo_like(400, 300, seed=1), "JPEG", quality=90)
    outputs = {}
    for turbo in (True, False):
        monkeypatch.setattr(jpeg, "simplejpeg", jpeg.simplejpeg if turbo else None)
        outputs[turbo] = (
            [train_image(data, random.Random(seed), size=48).numpy() for seed in range(6)],  # reduced 2x or 4x
            eval_image(data, size=48).numpy(),
        )
    for ours, reference in zip(outputs[True][0], outputs[False][0]):
        assert_close(ours, reference)
    assert_close(outputs[True][1], outputs[False][1])


def test_what_turbo_refuses_goes_to_pil():
    cmyk = encoded(photo_like(64, 48, seed=2).convert("CMYK"), "JPEG")
    decoded = jpeg.decode_rgb(open_checked(cmyk), (64, 48))
    assert decoded.mode == "RGB" and decoded.size == (64, 48)
    whole = encoded(photo_like(64, 48, seed=3), "JPEG")
    with pytest.raises(ImageRejected, match="truncated_image"):  # cut short: PIL names the reason
        jpeg.decode_rgb(open_checked(whole[: len(whole) // 2]), (64, 48))
