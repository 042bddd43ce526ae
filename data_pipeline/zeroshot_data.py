"""Held-out image-classification sets from the synthetic generator, as ImageFolder directories.

    python -m data_pipeline.zeroshot_data --out data/zeroshot

Four tasks, each under out/<task>/ with train/<class>/*.jpg (the few-shot pool), test/<class>/*.jpg, and the
task's hand prompts: templates.txt (one template per line, `{}` for the label word) and verbalizer.yaml
(class -> label words), worded like the training captions:
- shape: the kind of a single shape (4 classes);
- color: the color of a single shape (6 classes);
- count: the number of shapes (3 classes);
- background: the background of a 1-3 shape scene (3 classes).
Every image is drawn from a random stream keyed by task, split, class and index, which the captioned
generator never uses (it keys by seed, split and index alone), so no image is one of the training shards'.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import yaml

from data_pipeline.synthetic import BACKGROUNDS, CELLS, COLORS, SHAPES, SIZES, draw_scene


def _shape(rng: random.Random, **fixed) -> dict:
    shape = {"kind": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)), "size": rng.choice(sorted(SIZES)),
             "cell": rng.choice(sorted(CELLS))}
    return {**shape, **fixed}


def _scene(rng: random.Random, count: int, background: str | None = None, **fixed) -> dict:
    cells = rng.sample(sorted(CELLS), count)
    return {"background": background or rng.choice(sorted(BACKGROUNDS)),
            "shapes": [_shape(rng, cell=cell, **fixed) for cell in cells]}


@dataclass(frozen=True)
class Task:
    classes: tuple[str, ...]
    scene: Callable[[random.Random, str], dict]  # (rng, class) -> a scene of that class
    templates: tuple[str, ...]
    verbalizer: dict[str, list[str]]


COUNT_CLASSES = {"one": 1, "two": 2, "three": 3}
TASKS = {
    "shape": Task(
        SHAPES, lambda rng, label: _scene(rng, 1, kind=label),
        ("a {}.", "a large {}.", "a small {}.", "there is a {}.", "one shape: a {}."),
        {kind: [kind] for kind in SHAPES},
    ),
    "color": Task(
        tuple(sorted(COLORS)), lambda rng, label: _scene(rng, 1, color=label),
        tuple(f"a {{}} {kind}." for kind in SHAPES),
        {color: [color] for color in COLORS},
    ),
    "count": Task(
        tuple(COUNT_CLASSES), lambda rng, label: _scene(rng, COUNT_CLASSES[label]),
        ("{}.", "{} on white.", "{} on black.", "{} on gray."),
        {"one": ["one shape"], "two": ["two shapes"], "three": ["three shapes"]},
    ),
    "background": Task(
        tuple(sorted(BACKGROUNDS)), lambda rng, label: _scene(rng, rng.randint(1, 3), background=label),
        ("a shape on a {} background.", "a {} background with a shape.", "{} picture showing a shape.",
         "there is a shape against a {} backdrop."),
        {background: [background] for background in BACKGROUNDS},
    ),
}  # fmt: skip


def _write_image(job: tuple[str, str, str, int], *, out: Path, seed: int, size: int) -> None:
    task, split, label, index = job
    rng = random.Random(f"{seed}-zeroshot-{task}-{split}-{label}-{index}")
    draw_scene(TASKS[task].scene(rng, label), size, rng).save(out / task / split / label / f"{index:05d}.jpg",
                                                                quality=90)


def generate(out: str | Path, *, train_per_class: int = 32, test_per_class: int = 100, seed: int = 0,
             size: int = 96, workers: int = 1, tasks: tuple[str, ...] = tuple(TASKS)) -> None:
    """Write out/<task>/{train,test}/<class>/NNNNN.jpg, out/<task>/templates.txt and verbalizer.yaml."""
    out = Path(out)
    jobs = []
    for task in tasks:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            for label in TASKS[task].classes:
                (out / task / split / label).mkdir(parents=True, exist_ok=True)
                jobs += [(task, split, label, index) for index in range(per_class)]
        (out / task / "templates.txt").write_text("\n".join(TASKS[task].templates) + "\n")
        (out / task / "verbalizer.yaml").write_text(yaml.safe_dump(TASKS[task].verbalizer, sort_keys=False))
    with Pool(max(1, workers)) as pool:
        pool.map(partial(_write_image, out=out, seed=seed, size=size), jobs, chunksize=64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/zeroshot", help="output directory (one folder per task)")
    parser.add_argument("--train-per-class", type=int, default=32, help="few-shot pool images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels (as the training set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    args = parser.parse_args(argv)
    if min(args.train_per_class, args.test_per_class) < 1 or args.image_size < 16:
        parser.error("--train-per-class/--test-per-class must be >= 1 and --image-size >= 16")
    generate(args.out, train_per_class=args.train_per_class, test_per_class=args.test_per_class, seed=args.seed,
             size=args.image_size, workers=args.workers)
    print(f"wrote {', '.join(TASKS)} to {args.out}: {args.train_per_class} train + {args.test_per_class} test "
          "images per class")


if __name__ == "__main__":
    main()
