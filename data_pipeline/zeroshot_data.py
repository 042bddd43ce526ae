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

from data_pipeline.synthetic import BACKGROUNDS, CELLS, COLORS, COUNT_WORDS, SHAPES, SIZES, draw_scene, listing


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


# The five forms of the training captions (data_pipeline.synthetic.captions_for), lowercase (prompts are cleaned as
# the captions were), each with the word its listing uses for a large shape: {shapes} is the listing ("a large red
# circle in the center and a small blue square on the left"), {background} the background, {count} the count words.
CAPTION_FORMS = (("{shapes} on a {background} background", "large"), ("a {background} background with {shapes}", "big"),
                 ("{count} on {background}: {shapes}", "large"),
                 ("there is {shapes} against a {background} backdrop", "large"),
                 ("{background} picture showing {shapes}", "big"))  # fmt: skip
BACKGROUND_NAMES = tuple(sorted(BACKGROUNDS))
COUNT_CLASSES = {"one": 1, "two": 2, "three": 3}
DRAWS = 2  # scenes drawn per caption form and background for a task's templates
COUNT_WORDS_PER_CLASS = 8  # listings drawn per count class


def _fill(form: tuple[str, str], shapes: list[dict], background: str) -> str:
    return form[0].format(shapes=listing(shapes, form[1]), background=background, count=COUNT_WORDS[len(shapes)])


def _prompts(task: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """A task's hand prompts, worded as the training captions: every caption form, with `{}` where the class goes
    and the rest of the caption (sizes, colors, kinds, places, the background unless it is the class) drawn as the
    generator draws scenes, so that the ensemble averages over what the class does not fix (as CLIP's templates
    average over photo styles). Drawn from a stream keyed by the task alone: nothing is picked by accuracy."""
    rng = random.Random(f"zeroshot-prompts-{task}")
    if task == "count":  # captions state a count by listing the shapes: the label words are listings
        forms = [form for form in CAPTION_FORMS if "{count}" not in form[0]]  # count words and listing: two slots
        words = {name: [listing(_scene(rng, count)["shapes"]) for _ in range(COUNT_WORDS_PER_CLASS)]
                 for name, count in COUNT_CLASSES.items()}
        return tuple(form[0].format(shapes="{}", background=bg) for bg in BACKGROUND_NAMES for form in forms), words
    if task == "background":
        return (tuple(_fill(form, _scene(rng, rng.randint(1, 3))["shapes"], "{}")
                      for _ in range(DRAWS * len(BACKGROUNDS)) for form in CAPTION_FORMS),
                {background: [background] for background in BACKGROUND_NAMES})
    slot = {"shape": "kind", "color": "color"}[task]
    return (tuple(_fill(form, _scene(rng, 1, **{slot: "{}"})["shapes"], bg)
                  for bg in BACKGROUND_NAMES for _ in range(DRAWS) for form in CAPTION_FORMS),
            {name: [name] for name in (SHAPES if task == "shape" else sorted(COLORS))})


_SCENES = {
    "shape": lambda rng, label: _scene(rng, 1, kind=label),
    "color": lambda rng, label: _scene(rng, 1, color=label),
    "count": lambda rng, label: _scene(rng, COUNT_CLASSES[label]),
    "background": lambda rng, label: _scene(rng, rng.randint(1, 3), background=label),
}
_CLASSES = {"shape": SHAPES, "color": tuple(sorted(COLORS)), "count": tuple(COUNT_CLASSES),
            "background": BACKGROUND_NAMES}
TASKS = {task: Task(_CLASSES[task], scene, *_prompts(task)) for task, scene in _SCENES.items()}


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
