"""Synthetic COCO-layout data: simple shape scenes with paraphrased captions, deterministic by seed.

Captions name everything that distinguishes one image from another (shape kinds, colors, sizes, rough
positions, background), so a tiny model can learn retrieval from them. The output is the official COCO
layout and goes through the same reader as real COCO.

    python -m data_pipeline.synthetic --out data/synthetic_coco --train 10000 --val 1000
"""

import argparse
import json
import os
import random
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 0.13, "large": 0.22}  # radius as a fraction of the image side
# 3x3 grid cell -> (name, phrase); the phrase reads naturally after the shape
CELLS = {
    (0, 0): ("top left", "in the top left"),
    (1, 0): ("top", "at the top"),
    (2, 0): ("top right", "in the top right"),
    (0, 1): ("left", "on the left"),
    (1, 1): ("center", "in the center"),
    (2, 1): ("right", "on the right"),
    (0, 2): ("bottom left", "in the bottom left"),
    (1, 2): ("bottom", "at the bottom"),
    (2, 2): ("bottom right", "in the bottom right"),
}
COUNT_WORDS = {1: "one shape", 2: "two shapes", 3: "three shapes"}
SPLIT_ID_BASE = {"train": 0, "val": 10_000_000}


def sample_scene(rng: random.Random) -> dict:
    cells = rng.sample(sorted(CELLS), rng.randint(1, 3))
    shapes = [
        {"kind": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)), "size": rng.choice(sorted(SIZES)), "cell": c}
        for c in cells
    ]
    return {"background": rng.choice(sorted(BACKGROUNDS)), "shapes": shapes}


def draw_scene(scene: dict, size: int, rng: random.Random) -> Image.Image:
    def jitter(rgb):  # light color jitter so equal captions do not mean identical pixels
        return tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in rgb)

    image = Image.new("RGB", (size, size), jitter(BACKGROUNDS[scene["background"]]))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for shape in scene["shapes"]:
        cx = (shape["cell"][0] + 0.5) * cell + rng.uniform(-0.08, 0.08) * size
        cy = (shape["cell"][1] + 0.5) * cell + rng.uniform(-0.08, 0.08) * size
        r = SIZES[shape["size"]] * size * rng.uniform(0.9, 1.1)
        fill = jitter(COLORS[shape["color"]])
        if shape["kind"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape["kind"] == "square":
            s = r * 0.85
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif shape["kind"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def listing(shapes: list[dict], big: str = "large") -> str:
    """The shapes as the captions name them: "a large red circle in the center, ... and a small ..."; `big` is
    the word for a large shape (the captions say "large" or "big")."""
    parts = [f"a {big if s['size'] == 'large' else 'small'} {s['color']} {s['kind']} {CELLS[s['cell']][1]}"
             for s in shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(scene: dict, rng: random.Random) -> list[str]:
    """Five paraphrases, like COCO's five captions per image."""
    shapes, bg = scene["shapes"], scene["background"]
    shuffled = rng.sample(shapes, len(shapes))
    return [
        f"{listing(shapes).capitalize()} on a {bg} background.",
        f"A {bg} background with {listing(shuffled, 'big')}.",
        f"{COUNT_WORDS[len(shapes)].capitalize()} on {bg}: {listing(shapes)}.",
        f"There is {listing(shuffled)} against a {bg} backdrop.",
        f"{bg.capitalize()} picture showing {listing(list(reversed(shapes)), 'big')}",
    ]


def _make_image(index: int, *, split: str, seed: int, size: int, image_dir: Path) -> dict:
    rng = random.Random(f"{seed}-{split}-{index}")
    scene = sample_scene(rng)
    image_id = SPLIT_ID_BASE[split] + index + 1
    file_name = f"{image_id:012d}.jpg"
    draw_scene(scene, size, rng).save(image_dir / file_name, quality=90)
    return {"id": image_id, "file_name": file_name, "width": size, "height": size, "captions": captions_for(scene, rng)}


def generate(out: str | Path, *, train: int, val: int, seed: int = 0, size: int = 96, workers: int = 1) -> None:
    """Write out/{train,val}2017/*.jpg and out/annotations/captions_{train,val}2017.json."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        image_dir = out / f"{split}2017"
        image_dir.mkdir(exist_ok=True)
        make = partial(_make_image, split=split, seed=seed, size=size, image_dir=image_dir)
        with Pool(max(1, workers)) as pool:
            images = pool.map(make, range(count), chunksize=256)
        annotations = [
            {"id": len(images) * k + i, "image_id": image["id"], "caption": caption}
            for i, image in enumerate(images)
            for k, caption in enumerate(image.pop("captions"))
        ]
        annotation_file = out / "annotations" / f"captions_{split}2017.json"
        temporary = annotation_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({"images": images, "annotations": annotations}))
        os.replace(temporary, annotation_file)  # the annotation file marks the split complete


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic_coco", help="output directory (COCO layout)")
    parser.add_argument("--train", type=int, default=10_000, help="number of train images")
    parser.add_argument("--val", type=int, default=1_000, help="number of val images")
    parser.add_argument("--image-size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    args = parser.parse_args(argv)
    if min(args.train, args.val) < 0 or args.image_size < 16:
        parser.error("--train/--val must be >= 0 and --image-size >= 16")
    generate(args.out, train=args.train, val=args.val, seed=args.seed, size=args.image_size, workers=args.workers)
    print(f"wrote {args.train} train + {args.val} val images to {args.out}")


if __name__ == "__main__":
    main()
