"""What runs inside one DataLoader worker: read its shards, decode, augment, batch, tokenize, mask.

Randomness comes only from (seed, epoch, rank, worker role, sample key), never from the process, so
the same task always produces the same batches (the basis of exact resume).
"""

import multiprocessing
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.collate import collate_train
from data_pipeline.errors import DataError
from data_pipeline.images import ImageRejected
from data_pipeline.samples import caption_pairs, image_id_of, parse_sample, random_caption, read_samples
from data_pipeline.text import mirror_caption, swap_word
from data_pipeline.transforms import RandAugment, train_image

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
    randaugment: RandAugment | None = None
    pairs: str = "random_caption"  # or every_caption: each (image, caption) pair once per epoch
    # a task's per-sample targets from the sample's json (e.g. data_pipeline.vqa.VQATargets): a dict of
    # tensors stacked into batch keys of their own, or None to skip the sample (counted as no_targets)
    sample_targets: Callable[[dict], dict | None] | None = None
    min_side: int = 0  # shorter side under this: skipped as image_too_small (shards from other writers)
    # groups of interchangeable words: each caption also gets a copy with one swapped (hard negative); () off
    swap_groups: tuple[tuple[str, ...], ...] = ()


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


class WorkerStream(IterableDataset):
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
        self.retries: Counter = Counter()  # transient read errors retried (shard_io.py): not skipped samples
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
                self.retries.clear()
                self.seen = self.padded = 0
            yield self._collate(chunk, index)

    def _raw_samples(self) -> Iterator[dict]:
        rng = random.Random(f"shuffle-{self.tag}")
        if self.config.mode == "epoch":
            raw = read_samples(self.task.shards, self.skipped, self.retries)
        else:
            raw = self._resampled(random.Random(f"resample-{self.tag}"))
        if self.config.pairs == "every_caption":  # before the shuffle, so one image's pairs spread over batches
            raw = caption_pairs(raw, self.config.max_words)
        return wds.filters.shuffle(self.config.shuffle_buffer, self.config.shuffle_buffer // 2, rng=rng)(raw)

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        """Sample-level mixing: each sample comes from a source drawn by weight, from a random shard of it."""
        streams: list[Iterator[dict] | None] = [None] * len(self.task.sources)
        empty_opens = 0
        while True:
            source = rng.choices(range(len(streams)), weights=self.task.weights)[0]
            if streams[source] is None:
                streams[source] = read_samples([rng.choice(self.task.sources[source])], self.skipped, self.retries)
            sample = next(streams[source], None)
            if sample is None:
                streams[source] = None
                empty_opens += 1
                if empty_opens > 10 * sum(len(s) for s in self.task.sources) + 10:
                    raise DataError(f"shards {self.task.sources[source][:2]} yield no sample; check them")
                continue
            empty_opens = 0
            yield sample

    def _processed(self, raw: Iterator[dict]) -> Iterator[tuple[torch.Tensor, str, str, dict]]:
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

    def _process(self, sample: dict) -> tuple[torch.Tensor, str, str | None, str, dict] | None:
        """Pixels, one cleaned caption, its word-swapped copy (None: off, or no group word), the key and the
        task's targets; None (reason counted) for an unusable sample.

        A flipped image gets the mirrored caption ("left" and "right" swapped): pixels and words stay true."""
        config = self.config
        parsed = parse_sample(sample, self.skipped)
        if parsed is None:
            return None
        targets = config.sample_targets(parsed.meta) if config.sample_targets else {}
        if targets is None:
            self.skipped["no_targets"] += 1
            return None
        pair = sample.get("__pair__")  # every_caption mode: (index, cleaned caption) of this pair
        # epoch mode: randomness keyed by (seed, epoch, sample[, caption]), independent of reading order
        seed = f"{config.seed}-{self.epoch}-{parsed.key}" if config.mode == "epoch" else f"{self.tag}-{self.seen}"
        rng = random.Random(seed if pair is None else f"{seed}-{pair[0]}")
        caption = random_caption(parsed, rng, config.max_words) if pair is None else pair[1]
        if not caption:
            self.skipped["no_caption"] += 1
            return None
        flip = config.hflip and rng.random() < 0.5
        try:
            pixels = train_image(
                parsed.image, rng, size=config.image_size, scale=config.crop_scale, flip=flip,
                augment=config.randaugment, max_pixels=config.max_pixels, min_side=config.min_side,
            )  # fmt: skip
        except ImageRejected as rejected:
            self.skipped[rejected.reason] += 1
            return None
        caption = mirror_caption(caption) if flip else caption
        swapped = swap_word(caption, config.swap_groups, rng) if config.swap_groups else None
        return pixels, caption, swapped, parsed.key, targets

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
        pixels, captions, swapped, keys, targets = (list(column) for column in zip(*chunk))
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
            swapped=swapped if self.config.swap_groups else None,
        )
        batch.update({name: torch.stack([t[name] for t in targets]) for name in targets[0]})
        batch["_stats"] = {
            "worker": self.task.logical_worker,
            "seen": self.seen,
            "padded": self.padded,
            "skipped": dict(self.skipped),
            "read_retries": self.retries["read_retries"],
        }
        return batch


def hash_seed(text: str) -> int:
    return random.Random(text).getrandbits(63)


def survive_scheduler_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM/SIGUSR1 from anyone but the rank must not end the worker.

    On preemption SLURM signals every process of the job, workers included. The rank owns shutdown: it
    finishes its step, checkpoints and exits, and needs its workers until then. torch's worker handler
    dies on any SIGTERM, and the rank's SIGCHLD handler then raises "DataLoader worker exited
    unexpectedly" mid-checkpoint. A plain SIG_IGN is not enough either: at interpreter exit
    multiprocessing ends a still-open iterator's workers with SIGTERM from the rank and joins them, so the
    rank would hang. Hence torch's own rule, minus the dying: SIGTERM from the parent exits, others are
    dropped. A worker whose rank died notices by itself (torch's watchdog polls the parent pid).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the rank never sends it; its default action kills
    if not hasattr(signal, "sigwaitinfo"):  # no siginfo (macOS): torch's handlers stay, SIGTERM ends workers
        return
    # blocked in this (so far the only) thread and inherited by all later ones: only the waiter receives it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    rank = multiprocessing.parent_process()  # the rank, also under forkserver (where getppid is the server)
    threading.Thread(target=_exit_on_sigterm_from, args=(rank.pid if rank else os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)
