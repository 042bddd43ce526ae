"""`python -m pretrain.generate`: answers of a saved multimodal LM, for one image or a shard set.

    python -m pretrain.generate --checkpoint RUN/export --image photo.jpg --prompt "Describe the image briefly."
    python -m pretrain.generate --checkpoint RUN/export --data data/shards/synthetic_instruct/val --out answers.jsonl

With --data, each sample's first user turn is the prompt (instruction shards; --prompt for caption shards),
one JSON line per sample (key, task, prompt, answer, references) is written, and instruct_eval.json beside
the JSONL holds the captions' BLEU-4, CIDEr and scene-word match (`captioning`: asked with training phrasings;
`captioning_held_out_phrasings`: with phrasings training never saw; `captioning_by_phrasing`: grounding per
instruction) and the VQA questions' exact-match
accuracy per question type against the majority-answer baseline (--limit: at most N samples of each task).
Decoding is the LM's generate(): greedy by default, --num-beams N, or --do-sample with --temperature/--top-p.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from data_pipeline import DataError, resolve_shards
from data_pipeline.images import ImageRejected
from data_pipeline.instructions import IMAGE_TOKEN, first_instruction, tokenize_prompt
from data_pipeline.samples import parse_sample, read_samples
from data_pipeline.sources.vqa import normalise_answer
from data_pipeline.transforms import eval_image, normalize
from pretrain.eval.answers import vqa_exact_match
from pretrain.eval.captioning import caption_scores, grounding
from pretrain.model.multimodal_lm import MultimodalLM, MultimodalLMError
from pretrain.train.reliability.files import replace_text

EXAMPLES = 4  # rows of each task kept with their pixels for the example page
DEFAULT_PROMPT = "Describe the image briefly."  # the instruction for caption shards, which carry none
SCORES = ("captioning", "captioning_held_out_phrasings", "vqa")  # instruct_eval.json's blocks of scores


def user_turn(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt}"}]


def answer_batch(model: MultimodalLM, images: list[torch.Tensor], prompts: list[list[dict]],
                 options: dict) -> list[str]:
    """Prompts left-padded (generation continues every row from its last token)."""
    ids = [tokenize_prompt(p, model.tokenizer, model.image_tokens) for p in prompts]
    width = max(map(len, ids))
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    weight = next(model.parameters())  # where the model is, in its precision (a ZeRO-3 partition says it too)
    pixels = normalize(torch.stack(images)).to(weight.device, weight.dtype)
    question = None
    if model.question_fusion is not None:
        question = tuple(t.to(weight.device) for t in model.question_inputs([first_instruction(p) for p in prompts]))
    out = model.generate(pixels, input_ids.to(weight.device), mask.to(weight.device), question, **options)
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.cpu()]


class Request(NamedTuple):
    key: str
    pixels: torch.Tensor
    prompt: list[dict]  # the messages up to the first answer
    meta: dict  # the sample's json: task, references (captions or VQA answers), question_type


def shard_requests(spec: str, default_prompt: str, image_size: int, skipped: Counter, limit: int):
    """A Request per usable sample, at most `limit` per task (0: all); images decoded only for those taken."""
    taken: Counter = Counter()
    for raw in read_samples([s.path for s in resolve_shards(spec).shards], skipped):
        parsed = parse_sample(raw, skipped)
        if parsed is None:
            continue
        meta = {"task": "caption", "captions": parsed.captions, **parsed.meta}
        if limit and taken[meta["task"]] >= limit:
            continue
        try:
            pixels = eval_image(parsed.image, size=image_size)
        except ImageRejected as rejected:
            skipped[rejected.reason] += 1
            continue
        taken[meta["task"]] += 1
        turns = meta.get("conversations")
        yield Request(parsed.key, pixels, turns[:1] if turns else user_turn(default_prompt), meta)


def answer_row(request: Request, answer: str) -> dict:
    meta = request.meta
    row = {"key": request.key, "task": meta["task"], "prompt": request.prompt[-1]["content"], "answer": answer}
    if meta["task"] == "vqa":
        return {**row, "question_type": meta.get("question_type", ""), "reference": meta.get("answer", "")}
    return {**row, "references": meta.get("captions", []), "held_out": bool(meta.get("held_out", False))}


def answer_shards(model: MultimodalLM, spec: str, prompt: str, limit: int, batch_size: int, options: dict,
                  rank: int = 0, world: int = 1) -> tuple[list[dict], Counter, dict[str, torch.Tensor]]:
    """One row (key, task, prompt, answer, references) per usable sample, at most `limit` per task (0: all);
    skip counts; the pixels of the first EXAMPLES samples of each task, by key (the example page).

    With `world` > 1 (the ranks of a ZeRO-3 engine, `options` with synced_gpus) every rank reads the same
    stream and answers batches rank, rank + world, ...: each round every rank calls generate() once (an
    idle rank repeats the round's first batch and drops the answers), as ZeRO-3 needs every rank in every
    forward. The rows are this rank's."""
    skipped, rows, first, per_task = Counter(), [], {}, Counter()
    requests = shard_requests(spec, prompt, model.encoder_config.image_size, skipped, limit)
    while (batches := [list(itertools.islice(requests, batch_size)) for _ in range(world)])[0]:
        for request in itertools.chain(*batches):
            per_task[request.meta["task"]] += 1
            if per_task[request.meta["task"]] <= EXAMPLES:
                first[request.key] = request.pixels
        mine = batches[rank] or batches[0]
        answers = answer_batch(model, [c.pixels for c in mine], [c.prompt for c in mine], options)
        if batches[rank]:
            rows.extend(answer_row(request, answer) for request, answer in zip(mine, answers))
    return rows, skipped, first


def examples_of(rows: list[dict], first: dict[str, torch.Tensor]) -> list[tuple[dict, torch.Tensor]]:
    """The example page's rows with their pixels, in stream order."""
    by_key = {row["key"]: row for row in rows}
    return [(by_key[key], pixels) for key, pixels in first.items() if key in by_key]


def shard_metrics(rows: list[dict], skipped: Counter) -> dict:
    """Captioning metrics of the caption rows with references, apart for training and held-out phrasings; VQA
    exact match of the VQA rows."""
    metrics = {"samples": len(rows), "skipped": dict(skipped)}
    scored = [r for r in rows if r["task"] == "caption" and r["references"]]
    for name, held_out in (("captioning", False), ("captioning_held_out_phrasings", True)):
        captions = [r for r in scored if r["held_out"] == held_out]
        if captions:
            metrics[name] = caption_scores({r["key"]: r["answer"] for r in captions},
                                           {r["key"]: r["references"] for r in captions})
    if scored:
        metrics["captioning_by_phrasing"] = phrasing_grounding(scored)
    questions = [r for r in rows if r["task"] == "vqa"]
    if questions:
        metrics["vqa"] = vqa_exact_match(questions)
    return metrics


def phrasing_grounding(captions: list[dict]) -> dict[str, dict]:
    """Per instruction: whether it is held out, its caption count, the grounding parts, and how many answers
    were a bare yes/no (an instruction the model took for a question), so one misread phrasing shows."""
    groups: dict[str, list[dict]] = {}
    for row in captions:
        groups.setdefault(row["prompt"].replace(IMAGE_TOKEN, "").strip(), []).append(row)
    return {phrasing: {"held_out": group[0]["held_out"], "captions": len(group),
                       "yes_no": sum(normalise_answer(r["answer"]) in ("yes", "no") for r in group),
                       **grounding({r["key"]: r["answer"] for r in group}, {r["key"]: r["references"] for r in group})}
            for phrasing, group in sorted(groups.items())}


def instruct_metrics(rows: list[dict], skipped: Counter,
                     first: dict[str, torch.Tensor]) -> tuple[dict, list[tuple[dict, torch.Tensor]]]:
    """The held-out metrics of answered rows (shard_metrics plus the example rows); and the examples with
    their pixels."""
    examples = examples_of(rows, first)
    return {**shard_metrics(rows, skipped), "examples": [row for row, _ in examples]}, examples


def run_shards(model: MultimodalLM, args, options: dict) -> dict:
    rows, skipped, _ = answer_shards(model, args.data, args.prompt, args.limit, args.batch_size, options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    metrics = shard_metrics(rows, skipped)
    replace_text(Path(args.out).with_name("instruct_eval.json"), json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a saved multimodal LM (a run's export/)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="one image file")
    source.add_argument("--data", help="a shard set (instruction or caption shards)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="the instruction (with --image, and for caption shards)")
    parser.add_argument("--out", type=Path, default=Path("answers.jsonl"), help="JSONL of answers (with --data)")
    parser.add_argument("--limit", type=int, default=0, help="answer at most this many samples of each task (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (1: greedy)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling")
    args = parser.parse_args(argv)
    options = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.do_sample}
    if args.do_sample:
        options.update(temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    try:
        model = MultimodalLM.from_pretrained(args.checkpoint).eval()
        if args.data:
            metrics = run_shards(model, args, options)
            print(json.dumps({k: metrics[k] for k in SCORES if k in metrics} or metrics))
            print(f"wrote {args.out} ({metrics['samples']} answers; skipped: {metrics['skipped'] or 'nothing'})")
            return 0
        try:
            pixels = eval_image(args.image.read_bytes(), size=model.encoder_config.image_size)
        except (OSError, ImageRejected) as error:
            raise DataError(f"cannot decode image {args.image} ({getattr(error, 'reason', error)}): "
                            "give a JPEG, PNG or WebP file") from None
        print(answer_batch(model, [pixels], [user_turn(args.prompt)], options)[0])
    except (MultimodalLMError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
