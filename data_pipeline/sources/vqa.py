"""VQA v2 in its official layout: one sample per question, its image and its ten annotators' answers.

    ROOT/v2_OpenEnded_mscoco_{split}2014_questions.json   {"questions": [{question_id, image_id, question}]}
    ROOT/v2_mscoco_{split}2014_annotations.json            {"annotations": [{question_id, question_type,
                                                              answer_type, answers: [{answer}, ...]}]}
    ROOT/{split}2014/COCO_{split}2014_{image_id:012d}.jpg

Each record's text is the question; its `extra` (stored in the sample's json) holds `answers` (the raw
annotator answers, normalised by `normalise_answer`), `question_type` and `answer_type`. The image is stored
once per question: simple, and what the training loader reads anyway.
"""

import json
import re
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import Record, SourceSplit, _valid_caption

SPLITS = ("train", "val")
_PUNCTUATION = re.compile(r"[^\w\s']")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(answer: str) -> str:
    """Lower case, punctuation and articles removed, spaces collapsed: VQA's evaluation compares answers
    after this kind of normalisation (a reduced form of its rules; numbers stay as written)."""
    answer = _ARTICLES.sub(" ", _PUNCTUATION.sub("", answer.lower()))
    return " ".join(answer.split())


def question_file(root: Path, split: str) -> Path:
    return root / f"v2_OpenEnded_mscoco_{split}2014_questions.json"


def annotation_file(root: Path, split: str) -> Path:
    return root / f"v2_mscoco_{split}2014_annotations.json"


def image_path(root: Path, split: str, image_id: int) -> Path:
    return root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(f"{path} not found; point --root at a VQA v2 directory with the {what} JSON")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-download it") from exc


def read_vqa(root: str | Path, split: str) -> SourceSplit:
    """Every question of `split` that has an annotation with at least one answer."""
    if split not in SPLITS:
        raise DataError(f"VQA v2 has splits {SPLITS}, not {split!r}; use --splits train,val")
    root = Path(root)
    questions = _load(question_file(root, split), "questions").get("questions", [])
    annotated = _load(annotation_file(root, split), "annotations").get("annotations", [])
    annotations = {a["question_id"]: a for a in annotated}
    out = SourceSplit(records=[])
    seen: set = set()
    for q in questions:
        qid = q.get("question_id")
        if qid in seen:
            out.skipped["duplicate_id"] += 1
            continue
        seen.add(qid)
        annotation = annotations.get(qid)
        answers = [normalise_answer(a.get("answer", "")) for a in (annotation or {}).get("answers", [])]
        answers = [a for a in answers if a]
        text = _valid_caption(q.get("question", ""), out.skipped)
        if text is None:
            continue
        if not answers:
            out.skipped["no_answer"] += 1
            continue
        extra = {"answers": answers, "question_type": annotation.get("question_type", ""),
                 "answer_type": annotation.get("answer_type", ""), "image_id": q["image_id"]}
        out.records.append(Record(str(qid), str(image_path(root, split, q["image_id"])), (text,), extra))
    return out
