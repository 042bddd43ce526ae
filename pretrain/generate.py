"""`python -m pretrain.generate`: answers of a saved multimodal LM, for one image or a shard set.

    python -m pretrain.generate --checkpoint RUN/export --image photo.jpg --prompt "Describe the image briefly."
    python -m pretrain.generate --checkpoint RUN/export --data data/shards/synthetic_instruct/val --out answers.jsonl

With --data, each sample's first user turn is the prompt (instruction shards; --prompt for caption shards),
one JSON line per sample (key, prompt, answer, references) is written, and when the samples carry
reference captions their BLEU-4, CIDEr and scene-word match go to instruct_eval.json beside the JSONL.
Decoding is the LM's generate(): greedy by default, --num-beams N, or --do-sample with --temperature/--top-p.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from data_pipeline import DataError, resolve_shards
from data_pipeline.images import ImageRejected
from data_pipeline.instructions import IMAGE_TOKEN, tokenize_prompt
from data_pipeline.samples import parse_sample, read_samples
from data_pipeline.transforms import eval_image, normalize
from pretrain.eval.captioning import caption_scores
from pretrain.model.multimodal_lm import MultimodalLM, MultimodalLMError
from pretrain.train.reliability.files import replace_text


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
    out = model.generate(normalize(torch.stack(images)), input_ids, mask, **options)
    return [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def shard_requests(spec: str, default_prompt: str, image_size: int, skipped: Counter):
    """(key, pixels, prompt messages, reference captions) per usable sample."""
    for raw in read_samples([s.path for s in resolve_shards(spec).shards], skipped):
        parsed = parse_sample(raw, skipped)
        if parsed is None:
            continue
        try:
            pixels = eval_image(parsed.image, size=image_size)
        except ImageRejected as rejected:
            skipped[rejected.reason] += 1
            continue
        turns = json.loads(raw["json"]).get("conversations") if "json" in raw else None
        prompt = turns[:1] if turns else user_turn(default_prompt)
        yield parsed.key, pixels, prompt, parsed.captions


def answer_shards(model: MultimodalLM, spec: str, prompt: str, limit: int, batch_size: int,
                  options: dict) -> tuple[list[dict], Counter]:
    """One row (key, prompt, answer, references) per usable sample, at most `limit` (0: all); skip counts."""
    skipped, rows = Counter(), []
    requests = shard_requests(spec, prompt, model.encoder_config.image_size, skipped)
    while len(rows) < limit or not limit:
        chunk = [r for _, r in zip(range(batch_size if not limit else min(batch_size, limit - len(rows))), requests)]
        if not chunk:
            break
        answers = answer_batch(model, [c[1] for c in chunk], [c[2] for c in chunk], options)
        rows += [{"key": k, "prompt": p[-1]["content"], "answer": a, "references": refs}
                 for (k, _, p, refs), a in zip(chunk, answers)]
    return rows, skipped


def shard_metrics(rows: list[dict], skipped: Counter) -> dict:
    metrics = {"samples": len(rows), "skipped": dict(skipped)}
    if rows and all(r["references"] for r in rows):
        metrics["captioning"] = caption_scores({r["key"]: r["answer"] for r in rows},
                                               {r["key"]: r["references"] for r in rows})
    return metrics


def caption_metrics(model: MultimodalLM, spec: str, limit: int, batch_size: int, max_new_tokens: int) -> dict:
    """Greedy answers to a held-out instruction set, scored against its reference captions."""
    rows, skipped = answer_shards(model, spec, "Describe the image briefly.", limit, batch_size,
                                  {"max_new_tokens": max_new_tokens, "do_sample": False})
    return {**shard_metrics(rows, skipped), "examples": rows[:8]}


def run_shards(model: MultimodalLM, args, options: dict) -> dict:
    rows, skipped = answer_shards(model, args.data, args.prompt, args.limit, args.batch_size, options)
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
    parser.add_argument("--prompt", default="Describe the image briefly.",
                        help="the instruction (with --image, and for caption shards)")
    parser.add_argument("--out", type=Path, default=Path("answers.jsonl"), help="JSONL of answers (with --data)")
    parser.add_argument("--limit", type=int, default=0, help="answer at most this many samples (0: all)")
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
            print(json.dumps(metrics.get("captioning", metrics)))
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
