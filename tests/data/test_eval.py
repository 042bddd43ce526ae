"""Evaluation data: every caption of every image, unshuffled, equal batches on every rank."""

import json

import pytest
import torch

from data_pipeline import load_eval_data
from data_pipeline.samples import image_id_of
from data_pipeline.text import clean_caption
from tests.helpers.data import CLIP_MEAN, CLIP_STD, encoded, ramp_with_marker, read_split


@pytest.fixture(scope="module")
def eval_data(synthetic_shards, tokenizer):
    return load_eval_data(str(synthetic_shards["val"]), tokenizer, image_size=32, max_len=40)


def test_every_caption_of_every_image_in_shard_order(eval_data, synthetic_shards, synthetic_coco, tokenizer):
    samples = read_split(synthetic_shards["val"])
    assert eval_data.num_images == 12 and eval_data.num_texts == 60
    assert eval_data.keys == [s["__key__"] for s in samples]
    assert eval_data.image_ids.tolist() == [image_id_of(s["__key__"]) for s in samples]
    expected_texts = [clean_caption(c) for s in samples for c in json.loads(s["json"])["captions"]]
    assert eval_data.texts == expected_texts
    assert eval_data.text_image_ids.tolist() == [image_id_of(s["__key__"]) for s in samples for _ in range(5)]
    decoded = tokenizer.decode(eval_data.input_ids[7], skip_special_tokens=True)
    assert decoded == expected_texts[7]


@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 5), (3, 2), (5, 2), (7, 4)])
def test_ranks_get_equal_batches_whose_real_rows_concatenate_to_the_global_order(eval_data, world_size, batch_size):
    for name, total, expected_ids in (
        ("image_batches", eval_data.num_images, eval_data.image_ids),
        ("text_batches", eval_data.num_texts, eval_data.text_image_ids),
    ):
        per_rank = [list(getattr(eval_data, name)(batch_size, rank, world_size)) for rank in range(world_size)]
        shapes = [[tuple(b["image_ids"].shape) for b in batches] for batches in per_rank]
        assert all(s == shapes[0] for s in shapes)  # same number and shapes of batches everywhere
        ids = torch.cat([b["image_ids"] for batches in per_rank for b in batches])
        assert torch.equal(ids[ids != -1], expected_ids)
        assert (ids == -1).sum() == -(-total // world_size) * world_size - total
    image_batch = next(eval_data.image_batches(4))
    assert image_batch["pixel_values"].shape == (4, 3, 32, 32)
    text_batch = next(eval_data.text_batches(4))
    assert text_batch["input_ids"].shape == text_batch["attention_mask"].shape == (4, 40)


def test_eval_image_batches_are_the_val_images_in_order_whole_and_normalised(eval_data, synthetic_shards):
    """Each row against PIL's own decode and resize of that sample: the shards hold 96x96 JPEGs, which the
    eval transform decodes at half scale (JPEG draft), so rows match to DCT rounding (measured: 0.9 levels on
    average at most) while any other image of the set differs by 9.5 levels or more."""
    samples = read_split(synthetic_shards["val"])
    expected = torch.stack([pil_resized(sample["jpg"], 32) for sample in samples]).double()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1) * 255
    rows = torch.cat([batch["pixel_values"] for batch in eval_data.image_batches(5)]).double() * std + mean
    assert rows.shape == expected.shape == (12, 3, 32, 32)
    distances = (rows[:, None] - expected[None]).abs().mean(dim=(2, 3, 4))  # [row, sample]
    assert distances.diagonal().max() < 1.5
    assert distances.argmin(dim=1).tolist() == list(range(12))
    assert torch.equal(rows, torch.cat([b["pixel_values"] for b in eval_data.image_batches(5)]).double() * std + mean)


def structured_png() -> bytes:
    """A non-square picture whose left and right thirds differ (a colour ramp, a white marker near the left
    edge): a centre crop would cut them off."""
    return encoded(ramp_with_marker(60, 30, marker=(2, 10, 6, 20)), "PNG")


def pil_resized(data: bytes, size: int) -> torch.Tensor:
    """The ALBEF/BLIP eval protocol done directly with PIL: the whole image, bicubic, to size x size."""
    import io

    import numpy as np
    from PIL import Image

    resized = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def test_eval_image_resizes_the_whole_image_without_a_crop():
    from data_pipeline.transforms import eval_image

    data = structured_png()
    expected = pil_resized(data, 16)
    # what a centre crop would lose: the ramp's ends (blue 255 at x=0, 0 at x=59) and the marker near x=4
    assert expected[2, 0, 0] > 240 and expected[2, 0, 15] < 30
    assert expected[0, 6:10, 1].min() > 150 and expected[0, 0:4, 1].max() < 30
    assert torch.equal(eval_image(data, size=16), expected)


def test_eval_batches_are_normalised_with_the_clip_statistics(tokenizer):
    from data_pipeline.eval_data import EvalData

    data = structured_png()
    ids = torch.tensor([7])
    tokens = torch.ones(1, 4, dtype=torch.long)
    eval_data = EvalData(["k"], ids, [data], ["a caption"], ids, tokens, tokens, image_size=16, skipped={})
    pixels = next(eval_data.image_batches(1))["pixel_values"][0]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    expected = (pil_resized(data, 16).double() / 255 - mean) / std
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels.double(), expected, rtol=0, atol=1e-5)
