"""The training loader: WebDataset shards -> batch dicts, the same number of batches on every rank.

Epoch mode. Every epoch the shard list is shuffled by (seed, epoch), identically on all ranks; rank r
reads shards[r::world_size] and its DataLoader workers split those again. Every rank yields exactly
len(loader) = total_samples // (world_size * batch_size) batches; each worker is given a batch quota
from its shards' manifest counts. Samples beyond a worker's quota are dropped for that epoch (at most
one partial shard's worth per rank with the writer's equal-sized shards), and a worker whose valid
samples fall short (corrupt samples, uneven shards) repeats its earliest samples, so no rank ever
runs out early (a rank that stops early deadlocks ZeRO-3).

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
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.collate import collate_train
from data_pipeline.errors import DataError
from data_pipeline.images import DEFAULT_MAX_PIXELS, ImageRejected
from data_pipeline.samples import image_id_of, parse_sample, random_caption, read_samples
from data_pipeline.shards import ShardSet, check_shards
from data_pipeline.transforms import train_image

# Workers fork after the main process may have used the fast tokenizer's thread pool; without this
# the tokenizers library warns and disables itself per fork, or can deadlock.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# below this many samples a skipped fraction says little; the bound is checked once past it
MIN_SAMPLES_FOR_BAD_FRACTION = 100
# a resampled stream never ends; this many unusable samples in a row means there is nothing to train on
MAX_CONSECUTIVE_BAD = 1000


@dataclass
class LoaderConfig:
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    image_size: int
    max_len: int
    mode: str
    mlm_probability: float
    crop_scale: tuple[float, float]
    hflip: bool
    max_words: int
    max_pixels: int
    shuffle_buffer: int
    max_bad_fraction: float | None


@dataclass
class WorkerTask:
    """What one DataLoader worker produces this iteration."""

    logical_worker: int  # the role (shards, random streams); rotated on resume
    shards: list[str]
    quota: int  # batches this worker yields in the epoch (epoch mode)
    skip: int  # batches already consumed before a resume (epoch mode)
    weights: list[float] = field(default_factory=list)  # resampled mode: one shard list per source
    sources: list[list[str]] = field(default_factory=list)
    stream_tag: str = ""


class _WorkerStream(IterableDataset):
    def __init__(self, config: LoaderConfig, tokenizer, epoch: int, tasks: list[WorkerTask]):
        self.config, self.tokenizer, self.epoch, self.tasks = config, tokenizer, epoch, tasks

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        task = self.tasks[info.id if info is not None else 0]
        yield from _WorkerRun(self.config, self.tokenizer, self.epoch, task).batches()


class _WorkerRun:
    def __init__(self, config: LoaderConfig, tokenizer, epoch: int, task: WorkerTask):
        self.config, self.tokenizer, self.epoch, self.task = config, tokenizer, epoch, task
        self.skipped: Counter = Counter()
        self.seen = 0
        self.padded = 0
        self.tag = f"{config.seed}-{epoch}-{config.rank}-{task.logical_worker}{task.stream_tag}"

    def batches(self) -> Iterator[dict]:
        config = self.config
        samples = self._processed(self._raw_samples())
        if config.mode == "epoch":
            samples = self._padded(samples, self.task.quota * config.batch_size)
        for index in range(self.task.quota if config.mode == "epoch" else 2**62):
            chunk = [next(samples) for _ in range(config.batch_size)]
            if index < self.task.skip:
                continue
            if index == self.task.skip > 0:  # counts restart with the process, not with the epoch
                self.skipped.clear()
                self.seen = self.padded = 0
            yield self._collate(chunk, index)

    def _raw_samples(self) -> Iterator[dict]:
        rng = random.Random(f"shuffle-{self.tag}")
        if self.config.mode == "epoch":
            raw = read_samples(self.task.shards, self.skipped)
        else:
            raw = self._resampled(random.Random(f"resample-{self.tag}"))
        return wds.filters.shuffle(self.config.shuffle_buffer, self.config.shuffle_buffer // 2, rng=rng)(raw)

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        """Sample-level mixing: each sample comes from a source drawn by weight, from a random shard of it."""
        streams: list[Iterator[dict] | None] = [None] * len(self.task.sources)
        empty_opens = 0
        while True:
            source = rng.choices(range(len(streams)), weights=self.task.weights)[0]
            if streams[source] is None:
                streams[source] = read_samples([rng.choice(self.task.sources[source])], self.skipped)
            sample = next(streams[source], None)
            if sample is None:
                streams[source] = None
                empty_opens += 1
                if empty_opens > 10 * sum(len(s) for s in self.task.sources) + 10:
                    raise DataError(f"shards {self.task.sources[source][:2]} yield no sample; check them")
                continue
            empty_opens = 0
            yield sample

    def _processed(self, raw: Iterator[dict]) -> Iterator[tuple[torch.Tensor, str, str]]:
        consecutive_bad = 0
        for sample in raw:
            self.seen += 1
            processed = self._process(sample)
            if processed is None:
                consecutive_bad += 1
                if consecutive_bad == MAX_CONSECUTIVE_BAD:  # an endless stream of bad samples must not hang
                    raise DataError(
                        f"{consecutive_bad} samples in a row unusable ({dict(self.skipped)}) in "
                        f"{self.task.shards[:3] or self.task.sources}; check or rebuild the shards"
                    )
            else:
                consecutive_bad = 0
                yield processed
            self._check_bad_fraction(final=False)
        self._check_bad_fraction(final=True)

    def _process(self, sample: dict) -> tuple[torch.Tensor, str, str] | None:
        """Pixels, one cleaned caption and the key; None (reason counted) for an unusable sample."""
        config = self.config
        parsed = parse_sample(sample, self.skipped)
        if parsed is None:
            return None
        # epoch mode: randomness keyed by (seed, epoch, sample), independent of reading order
        seed = f"{config.seed}-{self.epoch}-{parsed.key}" if config.mode == "epoch" else f"{self.tag}-{self.seen}"
        rng = random.Random(seed)
        caption = random_caption(parsed, rng, config.max_words)
        if not caption:
            self.skipped["no_caption"] += 1
            return None
        try:
            pixels = train_image(
                parsed.image, rng, size=config.image_size, scale=config.crop_scale, hflip=config.hflip,
                max_pixels=config.max_pixels,
            )  # fmt: skip
        except ImageRejected as rejected:
            self.skipped[rejected.reason] += 1
            return None
        return pixels, caption, parsed.key

    def _padded(self, samples: Iterator, needed: int) -> Iterator:
        """Exactly `needed` samples: the stream's first ones again if it falls short."""
        first: list = []
        produced = 0
        if needed == 0:
            return
        for sample in samples:
            if len(first) < self.config.batch_size:
                first.append(sample)
            produced += 1
            yield sample
            if produced == needed:
                return
        if produced < needed and not first:
            summary = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "no samples at all"
            raise DataError(
                f"no valid sample in shards {self.task.shards[:3]} (skipped: {summary}); check or rebuild them"
            )
        for index in range(needed - produced):
            self.padded += 1
            yield first[index % len(first)]

    def _check_bad_fraction(self, final: bool) -> None:
        bound = self.config.max_bad_fraction
        bad = sum(self.skipped.values())
        if bound is None or not self.seen or (not final and self.seen < MIN_SAMPLES_FOR_BAD_FRACTION):
            return
        if bad / self.seen > bound:
            raise DataError(
                f"{bad} of {self.seen} samples skipped ({dict(self.skipped)}) > max_bad_fraction {bound}; "
                f"rebuild the shards or raise the bound"
            )

    def _collate(self, chunk: list, index: int) -> dict:
        pixels, captions, keys = (list(column) for column in zip(*chunk))
        generator = torch.Generator().manual_seed(hash_seed(f"mlm-{self.tag}-{index}"))
        batch = collate_train(
            pixels,
            captions,
            keys,
            [image_id_of(key) for key in keys],
            tokenizer=self.tokenizer,
            max_len=self.config.max_len,
            mlm_probability=self.config.mlm_probability,
            generator=generator,
        )
        batch["_stats"] = {
            "worker": self.task.logical_worker,
            "seen": self.seen,
            "padded": self.padded,
            "skipped": dict(self.skipped),
        }
        return batch


def _worker_start_method(num_workers: int) -> str | None:
    """Fork where the platform has it, even inside a spawned rank (which would otherwise spawn its workers
    too, re-importing torch and transformers in every worker every epoch). Workers never touch CUDA."""
    if num_workers > 0 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return None


def hash_seed(text: str) -> int:
    return random.Random(text).getrandbits(63)


def epoch_quotas(counts: list[list[int]], batch_size: int, batches_per_rank: int) -> list[list[int]]:
    """Per rank, per worker batch quotas summing to `batches_per_rank`, in proportion to the samples held."""
    quotas = []
    for rank_counts in counts:
        total = sum(rank_counts) or len(rank_counts)
        shares = [batches_per_rank * (n or not sum(rank_counts)) / total for n in rank_counts]
        quota = [int(share) for share in shares]
        by_remainder = sorted(range(len(quota)), key=lambda w: quota[w] - shares[w])  # largest remainder first
        for w in by_remainder[: batches_per_rank - sum(quota)]:
            quota[w] += 1
        quotas.append(quota)
    return quotas


def round_robin_position(quotas: list[int], consumed: int) -> tuple[list[int], int]:
    """Batches taken from each worker after `consumed` in-order round-robin batches, and the next worker."""
    taken, worker = [0] * len(quotas), 0
    for _ in range(consumed):
        while taken[worker] >= quotas[worker]:
            worker = (worker + 1) % len(quotas)
        taken[worker] += 1
        worker = (worker + 1) % len(quotas)
    return taken, worker


class TrainLoader:
    """Iterable over batch dicts; one epoch per iter() in epoch mode, endless in resampled mode."""

    def __init__(self, shard_set: ShardSet, tokenizer, config: LoaderConfig, pin_memory: bool = False):
        self.shard_set, self.tokenizer, self.config, self.pin_memory = shard_set, tokenizer, config, pin_memory
        self.num_readers = max(1, config.num_workers)
        self._len = shard_set.num_samples // (config.world_size * config.batch_size)
        if self._len == 0:
            raise DataError(
                f"{shard_set.num_samples} samples make no batch of {config.batch_size} on each of "
                f"{config.world_size} ranks; lower batch_size or add data"
            )
        self.epoch = 0
        self.position = 0  # batches this rank has yielded in the current epoch (or in total, resampled)
        self._resume_tag = ""
        self._finished_stats = {"seen": 0, "padded": 0, "skipped": Counter()}
        self._live_stats: dict[int, dict] = {}

    def __len__(self) -> int:
        """Batches per epoch on every rank (in resampled mode, the nominal epoch)."""
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[dict]:
        if self.config.mode == "epoch" and self.position >= self._len:
            self.epoch, self.position = self.epoch + 1, 0
        loader = DataLoader(
            _WorkerStream(self.config, self.tokenizer, self.epoch, self._tasks()),
            batch_size=None,
            num_workers=self.config.num_workers,
            pin_memory=self.pin_memory,
            in_order=True,
            multiprocessing_context=_worker_start_method(self.config.num_workers),
        )
        try:
            for batch in loader:
                stats = batch.pop("_stats")
                self._live_stats[stats["worker"]] = stats
                self.position += 1
                yield batch
        except DataError as error:  # a worker's error arrives wrapped in its traceback; keep the one line
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
        counts = [[sum(s.num_samples for s in worker) for worker in rank] for rank in layout]
        quotas = epoch_quotas(counts, config.batch_size, self._len)[config.rank]
        taken, next_worker = round_robin_position(quotas, self.position)
        roles = [(next_worker + k) % n for k in range(n)]  # DataLoader worker k plays role roles[k]
        mine = layout[config.rank]
        return [WorkerTask(w, [s.path for s in mine[w]], quotas[w], taken[w]) for w in roles]

    def _fold_stats(self) -> None:
        for stats in self._live_stats.values():
            self._finished_stats["seen"] += stats["seen"]
            self._finished_stats["padded"] += stats["padded"]
            self._finished_stats["skipped"].update(stats["skipped"])
        self._live_stats = {}

    def stats(self) -> dict:
        """Samples read, padded and skipped (by reason) on this rank since this loader was created."""
        skipped = Counter(self._finished_stats["skipped"])
        seen, padded = self._finished_stats["seen"], self._finished_stats["padded"]
        for stats in self._live_stats.values():
            skipped.update(stats["skipped"])
            seen, padded = seen + stats["seen"], padded + stats["padded"]
        return {"seen": seen, "padded": padded, "skipped": dict(skipped)}

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
    hflip: bool = False,  # off: synthetic (and many real) captions say "left"/"right"
    max_words: int = 30,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """The loader for one rank. Raises DataError for unusable specs or options before any work starts."""
    if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise DataError(
            f"bad loader layout batch_size={batch_size} rank={rank} world_size={world_size} "
            f"num_workers={num_workers}; fix the data options"
        )
    if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise DataError(f"crop_scale {crop_scale} must satisfy 0 < low <= high <= 1; fix it")
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
    )
    return TrainLoader(shard_set, tokenizer, config, pin_memory)
