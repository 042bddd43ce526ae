"""VQA accuracy: the soft score of each question's predicted answer, min(#annotators agreeing / 3, 1), as a
mean overall and per question type. Runs on one process or across ranks (each rank its slice of the
questions, the scores gathered), every rank the same number of forward passes."""

from __future__ import annotations

from collections import defaultdict

import torch

from pretrain import distributed
from pretrain.batch import to_device
from pretrain.distributed import gather_no_grad
from pretrain.model.vqa import predicted_scores


def accuracy_by_type(scores: torch.Tensor, question_types: list[str]) -> dict:
    """{"overall": mean, "per_type": {type: mean}} of per-question scores [N]."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for score, kind in zip(scores.tolist(), question_types):
        by_type[kind].append(score)
    return {"overall": scores.float().mean().item(),
            "per_type": {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())}, "questions": len(scores)}


@torch.no_grad()
def evaluate_vqa(model, data, batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """VQA accuracy of `model` (an ALBEFForVQA) on `data` (data_pipeline.vqa.VQAEvalData)."""
    was_training = model.training
    model.eval()
    rows, scores = [], []
    for batch in data.batches(batch_size, rank=distributed.rank(), world_size=distributed.world_size()):
        batch = to_device(batch, device, dtype)
        logits = model.answer_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        scores.append(predicted_scores(logits, batch["answer_scores"]))
        rows.append(batch["row"])
    model.train(was_training)
    rows, scores = gather_no_grad(torch.cat(rows)), gather_no_grad(torch.cat(scores))
    real = rows >= 0
    order = rows[real].argsort()
    return accuracy_by_type(scores[real][order].cpu(), data.question_types)


def format_vqa(metrics: dict) -> str:
    per_type = "  ".join(f"{kind} {100 * acc:.1f}" for kind, acc in metrics["per_type"].items())
    return f"VQA accuracy {100 * metrics['overall']:.2f} on {metrics['questions']} questions | {per_type}"
