"""Caption shards and VQA shards -> instruction conversations, written as WebDataset shards with a manifest.

    python -m data_pipeline.make_instructions --captions data/shards/synthetic --vqa data/shards/synthetic_vqa \
        --out data/shards/synthetic_instruct

Every sample is KEY.jpg (the caption shard's image bytes, unchanged) + KEY.txt (its first caption) + KEY.json:
`conversations` (chat messages, data_pipeline.instructions), `task`, `template`, `held_out` and `captions`
(every reference caption). The train split draws its instructions from the training templates
(`--train-templates 1`: the first one only, the single-template baseline of the T0/FLAN comparison). The
val split asks half its images with the training templates (`held_out` false: captioning of unseen images)
and half with the held-out templates, which no training set ever sees (`held_out` true: unseen phrasings).
With --vqa (shards of the VQA v2 layout, `make vqa-shards`: one sample per question), each question becomes
a conversation of its own after the captions: the question itself is the instruction and the commonest
annotator answer the assistant's turn; its json keeps `question`, `answers` and `question_type` for
evaluation. Conversations stay LM-agnostic: the LM's tokenizer renders them when a run loads them. Shards
are written as NAME.tmp and renamed when whole; the manifest is written last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.instructions import CAPTION_TEMPLATES, sample_caption_conversation, vqa_conversation
from data_pipeline.make_shards import DEFAULT_MIN_SHARDS, DEFAULT_SHARD_SAMPLES, samples_per_shard
from data_pipeline.manifest import MANIFEST, file_sha256, write_json_atomic
from data_pipeline.samples import parse_sample, read_samples
from data_pipeline.shards import resolve_shards

FORMAT = "instructions-1"


def phrasings(split: str, train_templates: int, rng: random.Random) -> tuple[tuple[str, ...], bool]:
    """The templates one image's instruction is drawn from, and whether they are the held-out ones. The train
    split takes no draw here, so its conversations do not depend on val's design."""
    if split == "train" or rng.random() < 0.5:
        return CAPTION_TEMPLATES["train"][: train_templates or None], False
    return CAPTION_TEMPLATES["held_out"], True


def instruction_samples(split_dir: Path, split: str, args: argparse.Namespace, skipped: Counter):
    rng = random.Random(f"{args.seed}-{split}")
    paths = [shard.path for shard in resolve_shards(str(split_dir)).shards]
    for raw in read_samples(paths, skipped):
        parsed = parse_sample(raw, skipped)
        if parsed is None:
            continue
        image_ext = next(ext for ext in ("jpg", "jpeg", "png", "webp") if ext in raw)
        templates, held_out = phrasings(split, args.train_templates, rng)
        messages, template = sample_caption_conversation(parsed.captions, templates, rng, args.multi_turn)
        meta = {"task": "caption", "template": template, "held_out": held_out, "conversations": messages,
                "captions": parsed.captions}
        yield {"__key__": parsed.key, image_ext: parsed.image, "txt": parsed.captions[0], "json": json.dumps(meta)}


def vqa_samples(split_dir: Path, skipped: Counter):
    """One conversation per VQA question (its sample's text), answered by the commonest annotator answer."""
    paths = [shard.path for shard in resolve_shards(str(split_dir)).shards]
    for raw in read_samples(paths, skipped):
        parsed = parse_sample(raw, skipped)
        if parsed is None:
            continue
        answers = [str(a) for a in parsed.meta.get("answers") or []]
        if not answers:
            skipped["no_answer"] += 1
            continue
        image_ext = next(ext for ext in ("jpg", "jpeg", "png", "webp") if ext in raw)
        question = parsed.captions[0]
        messages, answer = vqa_conversation(question, answers)
        meta = {"task": "vqa", "template": "question", "held_out": False, "conversations": messages,
                "question": question, "answer": answer, "answers": answers,
                "question_type": parsed.meta.get("question_type", "")}
        yield {"__key__": f"vqa_{parsed.key}", image_ext: parsed.image, "txt": question, "json": json.dumps(meta)}


def write_split(split: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / split
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a directory without its manifest never looks complete
    skipped, shards, writer = Counter(), [], None

    def close() -> None:
        writer.close()
        os.replace(out / (entry["name"] + ".tmp"), out / entry["name"])
        entry.update(bytes=(out / entry["name"]).stat().st_size, sha256=file_sha256(out / entry["name"]))
        shards.append(entry)

    source = Path(args.captions) / split
    total = resolve_shards(str(source)).num_samples
    samples = instruction_samples(source, split, args, skipped)
    if args.vqa:
        total += resolve_shards(str(Path(args.vqa) / split)).num_samples
        samples = itertools.chain(samples, vqa_samples(Path(args.vqa) / split, skipped))
    per_shard = samples_per_shard(total, args.shard_samples, args.min_shards)
    tasks = Counter()
    for sample in tqdm(samples, desc=f"{split} instructions", disable=args.quiet):
        tasks["vqa" if sample["__key__"].startswith("vqa_") else "caption"] += 1
        if writer is None:
            entry = {"name": f"{split}-{len(shards):06d}.tar", "num_samples": 0, "skipped": {}}
            writer = wds.TarWriter(str(out / (entry["name"] + ".tmp")), mtime=0)
        writer.write(sample)
        entry["num_samples"] += 1
        if entry["num_samples"] >= per_shard:
            close()
            writer = None
    if writer is not None:
        close()
    if not shards:
        raise DataError(f"{Path(args.captions) / split} gave no usable sample (skipped: {dict(skipped)}); "
                        "rebuild the caption shards with make shards")
    manifest = {
        "options": {"format": FORMAT, "source": str(args.captions), "vqa": args.vqa, "split": split, "seed": args.seed,
                    "templates": list(CAPTION_TEMPLATES["train"][: args.train_templates or None]),
                    "held_out_templates": list(CAPTION_TEMPLATES["held_out"]) if split != "train" else [],
                    "multi_turn": args.multi_turn,
                    "shard_samples": args.shard_samples, "min_shards": args.min_shards},
        "shards": shards, "num_shards": len(shards), "num_samples": sum(s["num_samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards), "tasks": dict(sorted(tasks.items())),
        "skipped": dict(sorted(skipped.items())),
    }  # fmt: skip
    for stale in out.glob(f"{split}-*.tar"):
        if stale.name not in {s["name"] for s in shards}:
            stale.unlink()
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.make_instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", default="data/shards/synthetic",
                        help="caption shard set: a directory with one sub-directory per split (make shards output)")
    parser.add_argument("--vqa", default=None,
                        help="VQA shard set (make vqa-shards: data/shards/synthetic_vqa) whose questions become "
                             "conversations too (default: none)")
    parser.add_argument("--out", default="data/shards/synthetic_instruct", help="output directory (one per split)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert (default: train val)")
    parser.add_argument("--train-templates", type=int, default=0,
                        help=f"use the first N of the {len(CAPTION_TEMPLATES['train'])} training templates "
                             "(0: all; 1: the single-template baseline)")
    parser.add_argument("--multi-turn", type=float, default=0.25,
                        help="fraction of conversations with a second turn answered by another caption (0.25)")
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES,
                        help=f"samples per shard ({DEFAULT_SHARD_SAMPLES})")
    parser.add_argument("--min-shards", type=int, default=DEFAULT_MIN_SHARDS,
                        help=f"fewer samples per shard when a split would fill fewer shards ({DEFAULT_MIN_SHARDS}), "
                             "as make shards does")
    parser.add_argument("--seed", type=int, default=0, help="seed of template, caption and turn draws (0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0 <= args.train_templates <= len(CAPTION_TEMPLATES["train"]):
        parser.error(f"--train-templates must be 0..{len(CAPTION_TEMPLATES['train'])}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for split in args.splits:
            manifest = write_split(split, args)
            print(f"{split}: {manifest['num_samples']} conversations ({manifest['tasks']}) in {manifest['num_shards']} "
                  f"shards -> "
                  f"{Path(args.out) / split}; skipped: {manifest['skipped'] or 'nothing'}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
