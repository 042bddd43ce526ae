"""Evaluation data: every caption of every image, unshuffled, split evenly across ranks.

Images stay as encoded bytes in memory and are decoded batch by batch. Each rank gets a contiguous slice
of ceil(N / world_size) rows (the last slices padded with copies marked image_ids = -1), so every rank
runs the same number of equally shaped batches and the ranks' real rows, concatenated in rank order,
are the global order.
"""

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from data_pipeline.collate import tokenize
from data_pipeline.errors import DataError
from data_pipeline.images import DEFAULT_MAX_PIXELS, ImageRejected
from data_pipeline.samples import cleaned_captions, image_id_of, parse_sample, read_samples
from data_pipeline.shards import resolve_shards
from data_pipeline.text import MAX_WORDS
from data_pipeline.transforms import eval_image, normalize


@dataclass
class EvalData:
    keys: list[str]
    image_ids: torch.Tensor  # [num_images]
    images: list[bytes]
    texts: list[str]
    text_image_ids: torch.Tensor  # [num_texts]: the image each caption belongs to
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_size: int
    skipped: dict[str, int]
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    def image_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        for rows, pad in _rank_batches(self.num_images, batch_size, rank, world_size):
            pixels = [eval_image(self.images[i], size=self.image_size, max_pixels=self.max_pixels) for i in rows]
            yield {"pixel_values": normalize(torch.stack(pixels)), "image_ids": _ids(self.image_ids, rows, pad)}

    def text_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        for rows, pad in _rank_batches(self.num_texts, batch_size, rank, world_size):
            yield {
                "input_ids": self.input_ids[rows],
                "attention_mask": self.attention_mask[rows],
                "image_ids": _ids(self.text_image_ids, rows, pad),
            }


def _rank_batches(total: int, batch_size: int, rank: int, world_size: int):
    """(row indices, padding mask) per batch of this rank's slice of ceil(total / world_size) rows."""
    per_rank = math.ceil(total / world_size)
    start = rank * per_rank
    real = list(range(start, min(start + per_rank, total)))
    rows = real + [real[-1] if real else 0] * (per_rank - len(real))
    padding = [False] * len(real) + [True] * (per_rank - len(real))
    for begin in range(0, per_rank, batch_size):
        yield torch.tensor(rows[begin : begin + batch_size]), torch.tensor(padding[begin : begin + batch_size])


def _ids(ids: torch.Tensor, rows: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    return torch.where(pad, torch.full_like(rows, -1), ids[rows])


def load_eval_data(
    spec, tokenizer, *, image_size: int, max_len: int, max_words: int = MAX_WORDS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> EvalData:
    """Read every sample of `spec` in manifest order; images that cannot be decoded are skipped and counted."""
    skipped: Counter = Counter()
    keys, images, texts, text_owner = [], [], [], []
    paths = [shard.path for shard in resolve_shards(spec).shards]
    for raw in read_samples(paths, skipped):
        parsed = parse_sample(raw, skipped)
        captions = cleaned_captions(parsed, max_words) if parsed is not None else []
        if parsed is not None and not captions:
            skipped["no_caption"] += 1
        if not captions:
            continue
        try:  # decode once up front so a bad image is dropped here, not mid-evaluation on one rank
            eval_image(parsed.image, size=image_size, max_pixels=max_pixels)
        except ImageRejected as rejected:
            skipped[rejected.reason] += 1
            continue
        text_owner.extend([len(images)] * len(captions))
        keys.append(parsed.key)
        images.append(parsed.image)
        texts.extend(captions)
    if not images:
        raise DataError(f"no valid evaluation sample in {spec!r} (skipped: {dict(skipped)}); check the shards")
    image_ids = torch.tensor([image_id_of(key) for key in keys], dtype=torch.long)
    text = tokenize(tokenizer, texts, max_len)
    return EvalData(
        keys,
        image_ids,
        images,
        texts,
        image_ids[torch.tensor(text_owner)],
        text["input_ids"],
        text["attention_mask"],
        image_size,
        dict(skipped),
        max_pixels,
    )
