"""VQA batches: answer vocabulary, soft-score targets and the evaluation set, from VQA shards
(`make_shards --source vqa`: one sample per question, the question as its text, `answers` and
`question_type` in its json).

A VQA training batch is the caption batch of the batch contract (the question in `input_ids` /
`attention_mask`) plus
  answer_scores  float [B, A]: VQA's soft score of each vocabulary answer, min(#annotators who gave it / 3, 1)
"""

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds

from data_pipeline.collate import tokenize
from data_pipeline.errors import DataError
from data_pipeline.eval_data import _rank_batches
from data_pipeline.images import DEFAULT_MAX_PIXELS, ImageRejected
from data_pipeline.samples import parse_sample, read_samples
from data_pipeline.shard_io import ShardReader
from data_pipeline.shards import resolve_shards
from data_pipeline.text import clean_caption
from data_pipeline.transforms import eval_image, normalize

AGREEING_ANNOTATORS_FOR_FULL_SCORE = 3


def soft_scores(answers: list[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """[A] VQA soft scores of the vocabulary's answers given the annotators' answers."""
    scores = torch.zeros(len(vocabulary))
    for answer, count in Counter(answers).items():
        if answer in vocabulary:
            scores[vocabulary[answer]] = min(count / AGREEING_ANNOTATORS_FOR_FULL_SCORE, 1.0)
    return scores


@dataclass(frozen=True)
class VQATargets:
    """The loader's per-sample targets (see data_pipeline.loader): `answer_scores` from the sample's json;
    None (the sample is skipped and counted) for a sample without answers."""

    answers: tuple[str, ...]
    index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {a: i for i, a in enumerate(self.answers)})

    def __call__(self, meta: dict) -> dict | None:
        answers = meta.get("answers")
        if not isinstance(answers, list) or not answers:
            return None
        return {"answer_scores": soft_scores([str(a) for a in answers], self.index)}


def shard_metadata(spec) -> Iterator[dict]:
    """The json member of every sample of `spec`, without reading an image into Python."""
    for shard in resolve_shards(spec).shards:
        with ShardReader(shard.path, Counter()) as stream:  # local or remote alike
            for member in wds.tariterators.tar_file_iterator(stream, select_files=lambda n: n.endswith(".json")):
                try:
                    yield json.loads(member["data"].decode("utf-8"))
                except ValueError:
                    continue  # the loader counts it when it reads the sample


@dataclass
class AnswerVocabulary:
    answers: tuple[str, ...]  # the most frequent training answers, most frequent first
    coverage: float  # the fraction of all training answers (annotator answers) they account for
    total: int  # annotator answers read


def answer_vocabulary(spec, size: int) -> AnswerVocabulary:
    """The `size` most frequent annotator answers in the shards (ties broken alphabetically)."""
    counts: Counter = Counter()
    for meta in shard_metadata(spec):
        counts.update(str(a) for a in meta.get("answers") or [])
    if not counts:
        raise DataError(f"no sample in {spec!r} has answers: point the VQA task at shards made with "
                        "make_shards --source vqa")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]
    total = sum(counts.values())
    return AnswerVocabulary(tuple(a for a, _ in ranked), sum(n for _, n in ranked) / total, total)


@dataclass
class VQAEvalData:
    """Every question of the evaluation shards, in shard order, split evenly across ranks (as EvalData)."""

    keys: list[str]
    images: list[bytes]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_scores: torch.Tensor  # [N, A]
    question_types: list[str]
    image_size: int
    skipped: dict[str, int]
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Batches of this rank's slice; `row` is each question's index, -1 on padding rows."""
        for rows, pad in _rank_batches(len(self), batch_size, rank, world_size):
            pixels = [eval_image(self.images[i], size=self.image_size, max_pixels=self.max_pixels) for i in rows]
            yield {"pixel_values": normalize(torch.stack(pixels)), "input_ids": self.input_ids[rows],
                   "attention_mask": self.attention_mask[rows], "answer_scores": self.answer_scores[rows],
                   "row": torch.where(pad, torch.full_like(rows, -1), rows)}


def load_vqa_eval(spec, tokenizer, targets: VQATargets, *, image_size: int, max_len: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> VQAEvalData:
    skipped: Counter = Counter()
    keys, images, questions, scores, types = [], [], [], [], []
    for raw in read_samples([shard.path for shard in resolve_shards(spec).shards], skipped):
        parsed = parse_sample(raw, skipped)
        target = targets(parsed.meta) if parsed is not None else None
        if parsed is None or target is None:
            skipped["no_answers"] += parsed is not None
            continue
        question = clean_caption(parsed.captions[0])  # as the training loader reads it
        if not question:
            skipped["no_caption"] += 1
            continue
        try:
            eval_image(parsed.image, size=image_size, max_pixels=max_pixels)
        except ImageRejected as rejected:
            skipped[rejected.reason] += 1
            continue
        keys.append(parsed.key)
        images.append(parsed.image)
        questions.append(question)
        scores.append(target["answer_scores"])
        types.append(str(parsed.meta.get("question_type", "")))
    if not keys:
        raise DataError(f"no valid VQA sample in {spec!r} (skipped: {dict(skipped)}); check the shards")
    text = tokenize(tokenizer, questions, max_len)
    return VQAEvalData(keys, images, text["input_ids"], text["attention_mask"], torch.stack(scores), types,
                       image_size, dict(skipped), max_pixels)
