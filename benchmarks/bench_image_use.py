"""Does a saved multimodal LM use its image? The next-token loss on held-out conversations' answers with each
sample's own image, against the same conversations with every image swapped for the next sample's (the batch
rolled by one). A model that ignores the image scores the same on both (gap 0); the gap is what the image is
worth in nats per answer token. Also the norm of the projected image tokens beside the LM's text embeddings.
Prints one JSON object, per task (captioning, VQA).

    python -m benchmarks.bench_image_use --checkpoint RUN/export --data data/shards/synthetic_instruct/val
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

import torch

from data_pipeline.instructions import first_instruction, tokenize_conversation
from data_pipeline.transforms import normalize
from pretrain.generate import shard_requests
from pretrain.model.multimodal_lm import MultimodalLM


@torch.no_grad()
def image_use(model: MultimodalLM, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor, question: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Answer loss with the right images and with the batch's images rolled by one (the instructions stay);
    image/text token norms."""
    right = model(pixels, input_ids, attention_mask, labels, question=question)
    rolled = model(pixels.roll(1, dims=0), input_ids, attention_mask, labels, question=question)
    is_text = attention_mask.bool() & (input_ids != model.image_token_id)
    text = model.lm.get_input_embeddings()(input_ids[is_text])
    return {"right_loss": right.loss.item(), "rolled_loss": rolled.loss.item(),
            "gap": rolled.loss.item() - right.loss.item(), "answer_tokens": int(right.labelled_tokens.item()),
            "image_token_norm": model.encode_images(pixels, question).norm(dim=-1).mean().item(),
            "text_token_norm": text.norm(dim=-1).mean().item()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a saved multimodal LM (a run's export/)")
    parser.add_argument("--data", required=True, help="held-out instruction shards")
    parser.add_argument("--limit", type=int, default=128, help="samples per task (one batch each)")
    parser.add_argument("--max-len", type=int, default=256)
    args = parser.parse_args(argv)
    model = MultimodalLM.from_pretrained(args.checkpoint).eval()
    tasks: dict[str, list] = defaultdict(list)
    requests = shard_requests(args.data, "", model.encoder_config.image_size, Counter(), args.limit)
    for request in requests:
        turns = request.meta.get("conversations")
        targets = turns and tokenize_conversation(turns, model.tokenizer, model.image_tokens, args.max_len)
        if targets:
            tasks[request.meta["task"]].append((request.pixels, targets, first_instruction(turns)))
    out = {}
    for task, rows in sorted(tasks.items()):
        batch = {k: torch.stack([t[k] for _, t, _ in rows]) for k in ("input_ids", "attention_mask", "labels")}
        if model.question_fusion is not None:
            batch["question"] = model.question_inputs([q for _, _, q in rows])
        pixels = normalize(torch.stack([p for p, _, _ in rows]))
        out[task] = {"samples": len(rows), **image_use(model, pixels, **batch)}
    print(json.dumps({"checkpoint": args.checkpoint, "image_use": out}, indent=1))


if __name__ == "__main__":
    main()
