"""The training loader: WebDataset shards -> batch dicts, the same number of batches on every rank.

Epoch mode. Every epoch the shard list is shuffled by (seed, epoch), identically on all ranks; rank r
reads shards[r::world_size] and its DataLoader workers split those again. Every rank yields exactly
len(loader) = total_samples // (world_size * batch_size) batches; each worker is given a batch quota
in proportion to the samples its shards hold (manifest counts). Samples beyond a worker's quota are
dropped for that epoch, and a worker whose valid samples fall short (corrupt samples, uneven shards)
repeats its earliest samples, so no rank ever runs out early (a rank that stops early deadlocks
ZeRO-3). Batches never mix workers, so an epoch is exactly-once when every worker's sample count is a
multiple of batch_size; otherwise up to batch_size - 1 samples per worker are dropped or repeated.

Samples are images with one caption drawn per epoch, or with `pairs="every_caption"` each (image, caption)
pair (ALBEF's epoch; its length counted from the shards' caption members, images never read for it).

All randomness is derived from (seed, epoch, rank, worker, sample key), so a loader restored from
state_dict() yields exactly the batches an uninterrupted one would have. Workers are assigned round
robin by DataLoader (in order); a resumed loader rotates worker roles to continue that order.

Resampled mode: an endless stream, shards drawn with replacement, each sample from a source chosen
by the sources' weights. For large multi-node runs where epochs do not matter.
"""

import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from data_pipeline.epoch_plan import epoch_quotas, round_robin_position
from data_pipeline.errors import DataError
from data_pipeline.images import DEFAULT_MAX_PIXELS
from data_pipeline.loader_worker import LoaderConfig, WorkerStream, WorkerTask, survive_scheduler_signals
from data_pipeline.samples import count_pairs
from data_pipeline.shards import ShardSet, check_shards
from data_pipeline.text import MAX_WORDS, check_swap_groups
from data_pipeline.transforms import RandAugment

PAIR_MODES = ("random_caption", "every_caption")

# Workers fork after the main process may have used the fast tokenizer's thread pool; without this
# the tokenizers library warns and disables itself per fork, or can deadlock.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _worker_start_method(num_workers: int) -> str | None:
    """Fork where the platform has it, even inside a spawned rank (which would otherwise spawn its workers
    too, re-importing torch and transformers in every worker every epoch). Workers never touch CUDA."""
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


def epoch_sizes(shard_set: ShardSet, pairs: str, mode: str, max_words: int = MAX_WORDS) -> dict[str, int]:
    """What an epoch visits per shard: its images, or in every_caption mode its (image, caption) pairs."""
    every_pair = pairs == "every_caption" and mode == "epoch"
    return {s.path: count_pairs(s.path, max_words) if every_pair else s.num_samples for s in shard_set.shards}


class TrainLoader:
    """Iterable over batch dicts; one epoch per iter() in epoch mode, endless in resampled mode."""

    def __init__(self, shard_set: ShardSet, tokenizer, config: LoaderConfig, pin_memory: bool = False):
        self.shard_set, self.tokenizer, self.config, self.pin_memory = shard_set, tokenizer, config, pin_memory
        self.num_readers = max(1, config.num_workers)
        self._sizes = epoch_sizes(shard_set, config.pairs, config.mode, config.max_words)
        total = sum(self._sizes.values())
        counted = all(source.counted for source in shard_set.sources)  # resampled shards may have no manifest
        self._len = total // (config.world_size * config.batch_size) if counted else None
        if self._len == 0:
            raise DataError(
                f"{total} samples make no batch of {config.batch_size} on each of "
                f"{config.world_size} ranks; lower batch_size or add data"
            )
        self.epoch = 0
        self.position = 0  # batches this rank has yielded in the current epoch (or in total, resampled)
        self._resume_tag = ""
        self._finished_stats = {"seen": 0, "padded": 0, "read_retries": 0, "skipped": Counter()}
        self._live_stats: dict[int, dict] = {}

    def __len__(self) -> int:
        """Batches per epoch on every rank (in resampled mode, the nominal epoch, when manifests count the shards)."""
        if self._len is None:
            raise TypeError("a resampled stream of shards without manifest counts has no nominal epoch length")
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[dict]:
        if self.config.mode == "epoch" and self.position >= self._len:
            self.epoch, self.position = self.epoch + 1, 0
        loader = DataLoader(
            WorkerStream(self.config, self.tokenizer, self.epoch, self._tasks()),
            batch_size=None,
            num_workers=self.config.num_workers,
            pin_memory=self.pin_memory,
            in_order=True,
            multiprocessing_context=_worker_start_method(self.config.num_workers),
            worker_init_fn=survive_scheduler_signals,
            # Our streams seed themselves from (seed, epoch); without its own generator every new
            # iterator would draw from the global torch RNG, so a mid-epoch resume would shift the
            # model's random draws (ITM negatives) by one.
            generator=torch.Generator(),
        )
        try:
            for batch in loader:
                stats = batch.pop("_stats")
                self._live_stats[stats["worker"]] = stats
                self.position += 1
                yield batch
        except DataError as error:  # a worker's error arrives wrapped in its traceback; keep the one line
            # its traceback and the frame that raised it hold each other and the DataLoader iterator: left to
            # the garbage collector, the iterator's queues are torn down first and its shutdown then waits 5 s
            # per worker (MP_STATUS_CHECK_INTERVAL) at some later point; dropped here, the workers end at once
            error.__traceback__ = None
            raise DataError(
                str(error).strip().splitlines()[-1].removeprefix("data_pipeline.errors.DataError: ")
            ) from None
        finally:
            self._fold_stats()

    def _tasks(self) -> list[WorkerTask]:
        config, n = self.config, self.num_readers
        if config.mode == "resampled":
            sources = [[shard.path for shard in source.shards] for source in self.shard_set.sources]
            weights = [source.weight for source in self.shard_set.sources]
            tag = f"-{self._resume_tag}" if self._resume_tag else ""
            return [WorkerTask(w, [], 0, 0, weights, sources, tag) for w in range(n)]
        shards = list(self.shard_set.shards)
        random.Random(f"shards-{config.seed}-{self.epoch}").shuffle(shards)
        per_rank = [shards[r :: config.world_size] for r in range(config.world_size)]
        layout = [[rank_shards[w::n] for w in range(n)] for rank_shards in per_rank]
        counts = [[sum(self._sizes[s.path] for s in worker) for worker in rank] for rank in layout]
        quotas = epoch_quotas(counts, config.batch_size, self._len)[config.rank]
        taken, next_worker = round_robin_position(quotas, self.position)
        roles = [(next_worker + k) % n for k in range(n)]  # DataLoader worker k plays role roles[k]
        mine = layout[config.rank]
        return [WorkerTask(w, [s.path for s in mine[w]], quotas[w], taken[w]) for w in roles]

    def _fold_stats(self) -> None:
        for stats in self._live_stats.values():
            self._finished_stats["seen"] += stats["seen"]
            self._finished_stats["padded"] += stats["padded"]
            self._finished_stats["read_retries"] += stats["read_retries"]
            self._finished_stats["skipped"].update(stats["skipped"])
        self._live_stats = {}

    def stats(self) -> dict:
        """Samples read, padded and skipped (by reason), and transient read errors retried, on this rank since
        this loader was created."""
        finished = self._finished_stats
        skipped = Counter(finished["skipped"])
        seen, padded, retries = finished["seen"], finished["padded"], finished["read_retries"]
        for stats in self._live_stats.values():
            skipped.update(stats["skipped"])
            seen, padded, retries = seen + stats["seen"], padded + stats["padded"], retries + stats["read_retries"]
        return {"seen": seen, "padded": padded, "skipped": dict(skipped), "read_retries": retries}

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason on this rank, summed over its workers, for logging."""
        return self.stats()["skipped"]

    def state_dict(self) -> dict:
        config = self.config
        epoch, position = self.epoch, self.position
        if config.mode == "epoch" and position >= self._len:
            epoch, position = epoch + 1, 0
        return {
            "mode": config.mode,
            "epoch": epoch,
            "batches_consumed": position,
            "samples_consumed": position * config.batch_size,
            "seed": config.seed,
            "rank": config.rank,
            "world_size": config.world_size,
            "num_workers": config.num_workers,
            "batch_size": config.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        config = self.config
        if state["mode"] != config.mode:
            raise DataError(f"loader state is from mode {state['mode']!r}, not {config.mode!r}; use the same mode")
        if config.mode == "epoch":
            layout = ("seed", "world_size", "num_workers", "batch_size")
            different = [k for k in layout if state[k] != getattr(config, k)]
            if different:
                raise DataError(
                    f"exact resume needs the same {', '.join(different)} as the saved run "
                    f"({ {k: state[k] for k in different} }); keep them or start the loader fresh"
                )
        else:  # a fresh random stream, so a resumed run does not replay the samples it already saw
            self._resume_tag = f"resume{state['batches_consumed']}"
        if config.mode == "epoch" and not 0 <= state["batches_consumed"] <= self._len:
            raise DataError(
                f"loader state has {state['batches_consumed']} batches of a {self._len}-batch epoch; "
                f"it belongs to other shards"
            )
        self.epoch, self.position = state["epoch"], state["batches_consumed"]

    def load_state_dict_from_ranks(self, states: list[dict]) -> None:
        """Continue a run saved by another number of ranks (states: one per saving rank, in rank order):
        the same epoch and global sample count, rounded down to whole batches of this layout, so at most one
        batch per rank is read again. The rest of an interrupted epoch is this layout's: its shards are dealt
        to the ranks anew, so which samples it holds is not the saved run's (counts are)."""
        config = self.config
        consumed = sum(state["samples_consumed"] for state in states)
        position = consumed // (config.world_size * config.batch_size)
        layout = {key: getattr(config, key) for key in ("rank", "world_size", "num_workers", "batch_size")}
        self.load_state_dict({**states[0], **layout, "batches_consumed": position,
                              "samples_consumed": position * config.batch_size})


def check_sampling_options(crop_scale: tuple[float, float], pairs: str, randaugment: tuple[int, int] | None) -> None:
    """DataError for augmentation and pairing options the loader cannot use (preflight calls it too)."""
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise DataError(f"crop_scale {crop_scale} must satisfy 0 < low <= high <= 1; fix it")
    if pairs not in PAIR_MODES:
        raise DataError(f"pairs {pairs!r} is unknown; use one of {', '.join(PAIR_MODES)}")
    if randaugment is not None and not (randaugment[0] >= 0 and 0 <= randaugment[1] <= 10):
        raise DataError(f"randaugment (ops, magnitude) {randaugment} needs ops >= 0 and 0 <= magnitude <= 10")


def make_train_loader(
    spec,
    tokenizer,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    image_size: int,
    max_len: int,
    mode: str = "epoch",
    mlm_probability: float = 0.15,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: bool = False,  # on: a flipped image's caption has "left" and "right" swapped
    randaugment: tuple[int, int] | None = None,  # (ops, magnitude); ALBEF: (2, 7)
    pairs: str = "random_caption",
    max_words: int = MAX_WORDS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 0,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float | None = None,
    pin_memory: bool = False,
    sample_targets=None,
    swap_groups: list[list[str]] | None = None,  # NegCLIP word swaps: each batch gets swap_* fields (collate.py)
) -> TrainLoader:
    """The loader for one rank. Raises DataError for unusable specs or options before any work starts."""
    if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError(
            f"bad loader layout batch_size={batch_size} rank={rank} world_size={world_size} "
            f"num_workers={num_workers}; fix the data options"
        )
    check_sampling_options(crop_scale, pairs, randaugment)
    check_swap_groups(swap_groups or [])
    shard_set = check_shards(spec, world_size=world_size, num_workers=num_workers, mode=mode)
    config = LoaderConfig(
        batch_size,
        rank,
        world_size,
        num_workers,
        seed,
        image_size,
        max_len,
        mode,
        mlm_probability,
        tuple(crop_scale),
        hflip,
        max_words,
        max_pixels,
        max(1, shuffle_buffer),
        max_bad_fraction,
        RandAugment(*randaugment) if randaugment and randaugment[0] else None,
        pairs,
        sample_targets,
        min_side,
        tuple(tuple(group) for group in swap_groups or []),
    )
    return TrainLoader(shard_set, tokenizer, config, pin_memory)
