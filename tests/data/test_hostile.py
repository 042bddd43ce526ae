"""A hostile shard set (tests.helpers.data.write_hostile_shards): each planted sample skipped, counted once, never
run."""

from collections import Counter

import pytest

from data_pipeline import make_train_loader
from tests.helpers.data import read_tar, write_hostile_shards


@pytest.fixture(scope="module")
def hostile(synthetic_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "pickle-was-executed"
    planted = write_hostile_shards(synthetic_shards["train"], root / "shards", marker)
    return root / "shards", marker, planted


def rank_loaders(spec, tokenizer, world_size: int, seed: int) -> list:
    return [
        make_train_loader(
            str(spec), tokenizer, batch_size=8, rank=rank, world_size=world_size, num_workers=1, seed=seed,
            image_size=32, max_len=24,
        )  # fmt: skip
        for rank in range(world_size)
    ]


def test_the_hostile_set_plants_every_kind_of_damage(hostile):
    spec, _, planted = hostile
    assert planted == {
        "unreadable_shard": 1, "undecodable_image": 1, "truncated_image": 1, "missing_image": 1, "no_caption": 2,
        "bad_text_encoding": 2,
        "too_many_pixels": 2,
    }  # fmt: skip
    names = [name for shard in sorted(spec.glob("*.tar"))[1:] for name in read_tar(shard)]
    assert sum(name.endswith((".pyd", ".pkl", ".pth")) for name in names) == 9


@pytest.mark.parametrize(("world_size", "batches", "seeds"), [(1, 6, [0]), (2, 3, [0, 2, 3])])
def test_every_planted_sample_is_skipped_and_counted_once_per_epoch(hostile, tokenizer, world_size, batches, seeds):
    spec, marker, planted = hostile
    partners = set()  # what the rank reading the cut shard meets besides: which shard it was paired with
    for seed in seeds:
        loaders = rank_loaders(spec, tokenizer, world_size, seed)
        for loader in loaders:
            assert sum(1 for _ in loader) == len(loader) == batches
        assert sum((Counter(loader.skip_counts()) for loader in loaders), Counter()) == planted
        # all 44 readable samples read (5 of the cut shard + 30 good + 9 planted), the epoch filled by padding
        assert sum(loader.stats()["seen"] for loader in loaders) == 44
        assert sum(loader.stats()["padded"] for loader in loaders) == world_size * batches * 8 - 35
        counts = [loader.skip_counts() for loader in loaders]
        partners |= {frozenset(rank_counts) for rank_counts in counts if "unreadable_shard" in rank_counts}
    assert len(partners) == len(seeds)  # 2 ranks: the seeds pair up the 4 shards in all 3 possible ways
    assert not marker.exists()
