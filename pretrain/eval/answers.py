"""Free-text VQA answers of a generative model, scored by exact match per question type against the
majority-answer baseline: the one answer per type that is most often right on the evaluated questions (a
prior read off the evaluated set itself, so at least as strong as one learned from training answers)."""

from __future__ import annotations

from collections import Counter, defaultdict

from data_pipeline.sources.vqa import normalise_answer


def vqa_exact_match(rows: list[dict]) -> dict:
    """rows: {"question_type", "answer" (generated), "reference" (the commonest annotator answer)}.

    Returns accuracy and majority baseline over all questions and per type; a generated answer is normalised
    as VQA's evaluation does (lower case, punctuation and articles removed) before it is compared."""
    if not rows:
        raise ValueError("no VQA answer to score")
    pairs = defaultdict(list)
    for row in rows:
        pairs[row["question_type"] or "unknown"].append((normalise_answer(row["answer"]), row["reference"]))
    per_type = {}
    for kind, answered in sorted(pairs.items()):
        majority, majority_hits = Counter(ref for _, ref in answered).most_common(1)[0]
        per_type[kind] = {"questions": len(answered),
                          "accuracy": sum(pred == ref for pred, ref in answered) / len(answered),
                          "majority_answer": majority, "majority_baseline": majority_hits / len(answered)}
    total = len(rows)
    return {"questions": total,
            "accuracy": sum(t["accuracy"] * t["questions"] for t in per_type.values()) / total,
            "majority_baseline": sum(t["majority_baseline"] * t["questions"] for t in per_type.values()) / total,
            "per_type": per_type}


def answer_is_right(row: dict) -> bool:
    """A VQA row's answer equals its reference; a caption row names exactly its scene's shapes and colours."""
    if row["task"] == "vqa":
        return normalise_answer(row["answer"]) == row["reference"]
    from pretrain.eval.captioning import scene_words

    return scene_words(row["answer"]) == scene_words(row["references"][0])
