"""ALBEF's augmentation: the flip mirrors pixels and caption together, RandAugment keeps every colour and is
seeded, the crop keeps to its scale, and every_caption mode visits each (image, caption) pair once per epoch."""

import json
import random
from collections import Counter

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from data_pipeline import make_train_loader
from data_pipeline.samples import caption_pairs, count_pairs, read_samples
from data_pipeline.text import mirror_caption
from data_pipeline.transforms import RANDAUGMENT_OPS, RandAugment, random_crop_box, to_uint8_tensor
from tests.helpers.data import CLIP_MEAN, CLIP_STD, encoded, image_bytes, write_tar

RED, WHITE = (200, 70, 70), (240, 240, 240)  # no channel clips when sharpness overshoots red


def red_square_left(size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), WHITE)
    ImageDraw.Draw(image).rectangle((size // 16, size // 3, size * 3 // 8, size * 2 // 3), fill=RED)
    return image


def uint8_pixels(batch: dict) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return (batch["pixel_values"].double() * std + mean).round()


def test_mirror_caption_swaps_whole_words_only():
    assert (mirror_caption("a red circle on the left and a blue square in the top right")
            == "a red circle on the right and a blue square in the top left")
    assert mirror_caption("leftover bright lights") == "leftover bright lights"


def test_the_flip_swaps_the_words_and_the_pixels_together(tmp_path, tokenizer):
    """A red square on the left, captioned so: whichever rows come back flipped (about half), the red pixels sit
    on the side the row's caption names."""
    members = {}
    for i in range(8):
        members[f"s{i}.png"] = encoded(red_square_left())
        members[f"s{i}.json"] = json.dumps({"captions": ["a small red square on the left"]}).encode()
    write_tar(tmp_path / "left.tar", members)
    train = make_train_loader(str(tmp_path / "left.tar"), tokenizer, batch_size=8, rank=0, world_size=1,
                              num_workers=0, seed=0, image_size=32, max_len=16, crop_scale=(1.0, 1.0), hflip=True)
    sides = Counter()
    for _ in range(4):  # epochs
        (batch,) = list(train)
        pixels = uint8_pixels(batch)
        for row, ids in zip(pixels, batch["input_ids"], strict=True):
            caption = tokenizer.decode(ids, skip_special_tokens=True)
            red = ((row - torch.tensor(RED).view(3, 1, 1)).abs().amax(dim=0) < 20).nonzero()[:, 1]
            side = "left" if red.float().mean() < 16 else "right"
            assert caption == f"a small red square on the {side}", (caption, red.float().mean())
            sides[side] += 1
    assert sides["left"] >= 6 and sides["right"] >= 6, sides


def on_line_distance(image: Image.Image, a=RED, b=WHITE) -> float:
    """The largest distance of a pixel from the line through colours a and b (geometry and sharpness only mix
    and extrapolate the two colours, so their pixels stay on it; a colour op moves them off)."""
    pixels = to_uint8_tensor(image).double().flatten(1).T
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    direction = (a - b) / (a - b).norm()
    offset = pixels - b
    return float((offset - (offset @ direction)[:, None] * direction).norm(dim=1).max())


def test_randaugment_keeps_every_colour_and_applies_its_ops():
    picture = red_square_left(48)
    augment = RandAugment(ops=2, magnitude=7)
    unchanged = 0
    for seed in range(200):
        out = augment(picture, random.Random(seed))
        assert on_line_distance(out) < 6, seed
        unchanged += to_uint8_tensor(out).equal(to_uint8_tensor(picture))
    # nothing happens when both draws are identity or skipped: (1/7 + 6/7 * 1/2)^2 = 0.33 of the images
    assert 40 <= unchanged <= 95, unchanged
    # the check can fail: each colour op ALBEF's list has moves these pixels off the line
    for colour_op in (ImageOps.autocontrast, ImageOps.equalize, lambda i: ImageEnhance.Brightness(i).enhance(0.37)):
        assert on_line_distance(colour_op(picture)) > 20
    assert set(RANDAUGMENT_OPS) == {"identity", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
                                    "rotate"}


def test_randaugment_is_seeded():
    picture = red_square_left(48)
    augment = RandAugment(ops=2, magnitude=7)
    outputs = [to_uint8_tensor(augment(picture, random.Random(seed))) for seed in range(12)]
    assert all(out.equal(to_uint8_tensor(augment(picture, random.Random(seed)))) for seed, out in enumerate(outputs))
    assert len({out.numpy().tobytes() for out in outputs}) >= 5
    # magnitude 0 moves nothing: every op is the identity at level 0 (sharpness 0.1 still blurs, so it differs)
    still = RandAugment(ops=2, magnitude=0)
    geometric = [still(picture, random.Random(s)) for s in range(30)]
    assert sum(to_uint8_tensor(g).equal(to_uint8_tensor(picture)) for g in geometric) >= 15


def test_crop_boxes_keep_to_the_scale():
    areas = []
    rng = random.Random(0)
    for _ in range(2000):
        left, top, right, bottom = random_crop_box(96, 96, rng, (0.2, 1.0))
        areas.append((right - left) * (bottom - top) / 96**2)
    assert 0.19 <= min(areas) < 0.22 and 0.97 < max(areas) <= 1.0
    # about uniform over [0.2, 1] (draws too wide or tall for the image are redrawn, which favours small areas)
    assert 0.4 < sum(a < 0.6 for a in areas) / len(areas) < 0.65


WORDS = iter(f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow", "purple", "orange")
             for shape in ("circle", "square", "triangle", "diamond"))  # 24 captions the tokenizer spells out


def captioned_shard(path, counts: dict[str, int]) -> Counter:
    members, pairs = {}, Counter()
    for key, n in counts.items():
        captions = [next(WORDS) for _ in range(n)]
        members[f"{key}.jpg"] = image_bytes(24, 24)
        members[f"{key}.json"] = json.dumps({"captions": captions}).encode()
        pairs.update((key, c) for c in captions)
    write_tar(path, members)
    return pairs


def test_every_caption_mode_visits_each_pair_once_per_epoch(tmp_path, tokenizer):
    """Two shards of 10 pairs each (1 to 4 captions per image), two workers, batches of 5: each (image, caption)
    pair exactly once per epoch; random_caption mode sees each image once with one caption."""
    expected = captioned_shard(tmp_path / "a.tar", {"a0": 1, "a1": 2, "a2": 3, "a3": 4})
    expected += captioned_shard(tmp_path / "b.tar", {"b0": 4, "b1": 4, "b2": 2})
    assert count_pairs(str(tmp_path / "a.tar"), 30) == 10 == sum(1 for _ in caption_pairs(
        read_samples([str(tmp_path / "a.tar")], Counter()), 30))
    spec = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    options = dict(batch_size=5, rank=0, world_size=1, num_workers=2, seed=0, image_size=16, max_len=16)
    every = make_train_loader(spec, tokenizer, pairs="every_caption", **options)
    assert len(every) == 4
    for _ in range(2):  # epochs
        seen = Counter()
        for batch in every:
            for key, ids in zip(batch["keys"], batch["input_ids"], strict=True):
                seen[(key, tokenizer.decode(ids, skip_special_tokens=True))] += 1
        assert seen == expected
    one = make_train_loader(spec, tokenizer, **{**options, "num_workers": 1})
    assert len(one) == 1 and len(set(next(iter(one))["keys"])) == 5
