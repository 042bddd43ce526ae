"""Synthetic VQA in the VQA v2 layout: questions about generated shape scenes, answered from each scene's own
metadata, so every answer is known. The scenes come from the synthetic caption generator under other seeds
(split names `vqa-train` / `vqa-val`), so no picture repeats a pretraining image.

Five question types, one question of each per image (`question_type` in the annotations):
  color       what color is the <shape>?          (a shape kind the scene has exactly once)
  shape       what shape is <position>?            (top left, at the top, ...)
  count       how many shapes are there?           1 | 2 | 3
  background  what color is the background?        white | black | gray
  presence    is there a <color> <shape>?          yes | no (half the time a combination the scene lacks)

With --presence N every image gets N presence questions whose answers alternate from a random first one: 2
gives each question its complementary one (a combination the scene has if the first lacks it, and the other
way round), as VQA v2 balances its yes/no questions with complementary pairs, so that the image, not the
prior, decides the answer.

    python -m data_pipeline.synthetic_vqa --out data/synthetic_vqa --train 2000 --val 400 [--presence 2]
    python -m data_pipeline.make_shards --source vqa --root data/synthetic_vqa --name synthetic_vqa
"""

import argparse
import json
import os
import random
from pathlib import Path

from data_pipeline.sources.vqa import annotation_file, image_path, question_file
from data_pipeline.synthetic import CELLS, COLORS, SHAPES, draw_scene, sample_scene

QUESTION_TYPES = ("color", "shape", "count", "background", "presence")
ANNOTATORS = 10  # VQA v2 collects ten answers per question
# image ids far from the caption set's (train from 0, val from 10,000,000): the sets never share an id
SPLIT_ID_BASE = {"train": 20_000_000, "val": 30_000_000}


def scene_questions(scene: dict, rng: random.Random, presence: int = 1) -> list[tuple[str, str, str]]:
    """(question type, question, answer) for each type the scene can answer, with `presence` presence
    questions whose answers alternate."""
    shapes = scene["shapes"]
    kinds = [s["kind"] for s in shapes]
    out = []
    unique = [s for s in shapes if kinds.count(s["kind"]) == 1]
    if unique:
        shape = rng.choice(unique)
        out.append(("color", f"what color is the {shape['kind']}?", shape["color"]))
    shape = rng.choice(shapes)
    out.append(("shape", f"what shape is {CELLS[shape['cell']][1]}?", shape["kind"]))
    out.append(("count", "how many shapes are there?", str(len(shapes))))
    out.append(("background", "what color is the background?", scene["background"]))
    present = sorted({(s["color"], s["kind"]) for s in shapes})
    absent = [(c, k) for c in sorted(COLORS) for k in SHAPES if (c, k) not in present]
    first = 0 if rng.random() < 0.5 else 1
    for answer in (("yes", "no")[(first + i) % 2] for i in range(presence)):
        color, kind = rng.choice(present if answer == "yes" else absent)
        out.append(("presence", f"is there a {color} {kind}?", answer))
    return out


def generate(out: str | Path, *, train: int, val: int, seed: int = 0, size: int = 96,
             presence: int = 1) -> None:
    """Write the VQA v2 files and images of both splits under `out`; the annotations file is written last."""
    out = Path(out)
    for split, count in (("train", train), ("val", val)):
        (out / f"{split}2014").mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for index in range(count):
            rng = random.Random(f"{seed}-vqa-{split}-{index}")
            scene = sample_scene(rng)
            image_id = SPLIT_ID_BASE[split] + index + 1
            draw_scene(scene, size, rng).save(image_path(out, split, image_id), quality=90)
            for number, (kind, question, answer) in enumerate(scene_questions(scene, rng, presence)):
                question_id = image_id * 10 + number
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotations.append({
                    "question_id": question_id, "image_id": image_id, "question_type": kind,
                    "answer_type": "yes/no" if kind == "presence" else "number" if kind == "count" else "other",
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                                for i in range(ANNOTATORS)],
                })  # fmt: skip
        question_file(out, split).write_text(json.dumps({"questions": questions}))
        target = annotation_file(out, split)
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps({"annotations": annotations}))
        os.replace(temporary, target)  # the annotations file marks the split complete


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic_vqa", help="output directory (VQA v2 layout)")
    parser.add_argument("--train", type=int, default=2000, help="number of train images (about 5 questions each)")
    parser.add_argument("--val", type=int, default=400, help="number of val images")
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presence", type=int, default=1,
                        help="presence questions per image, answers alternating (2: complementary pairs)")
    args = parser.parse_args(argv)
    # question ids are image_id * 10 + the question's number: four other types plus at most five presence
    if min(args.train, args.val) < 0 or args.image_size < 16 or not 1 <= args.presence <= 5:
        parser.error("--train/--val must be >= 0, --image-size >= 16 and --presence 1 to 5")
    generate(args.out, train=args.train, val=args.val, seed=args.seed, size=args.image_size,
             presence=args.presence)
    print(f"wrote {args.train} train + {args.val} val VQA images to {args.out}")


if __name__ == "__main__":
    main()
