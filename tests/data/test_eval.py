"""Evaluation data: every caption of every image, unshuffled, equal batches on every rank."""

import json

import pytest
import torch

from data_pipeline import load_eval_data
from data_pipeline.samples import image_id_of
from data_pipeline.text import clean_caption


@pytest.fixture(scope="module")
def eval_data(synthetic_shards, tokenizer):
    return load_eval_data(str(synthetic_shards["val"]), tokenizer, image_size=32, max_len=40)


def test_every_caption_of_every_image_in_shard_order(eval_data, synthetic_shards, synthetic_coco, tokenizer):
    import webdataset as wds

    manifest = json.loads((synthetic_shards["val"] / "manifest.json").read_text())
    urls = [str(synthetic_shards["val"] / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
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


def test_eval_images_are_deterministic(eval_data):
    first = next(eval_data.image_batches(3))["pixel_values"]
    assert torch.equal(first, next(eval_data.image_batches(3))["pixel_values"])
