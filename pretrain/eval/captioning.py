"""Captioning metrics: BLEU-4 and CIDEr from pycocoevalcap (the COCO caption evaluation code), and, for the
synthetic scenes, grounding: the fraction of captions that name exactly the scene's shapes and colors
(`scene_match`), and each part alone: its shape kinds, its shape colors, its background, its number of shapes.

Captions are cleaned as the project cleans every caption (lowercase, punctuation to spaces) instead of
with pycocoevalcap's PTBTokenizer, which needs Java; CIDEr's document frequencies come from the
references of the evaluated set, as in the COCO evaluation.
"""

from __future__ import annotations

import contextlib
import io

from data_pipeline.synthetic import BACKGROUNDS, COLORS, SHAPES
from data_pipeline.text import clean_caption

SCENE_WORDS = frozenset((*SHAPES, *COLORS))


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """{"bleu4", "cider", "scene_match", "captions"} of predicted captions against reference captions per id."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions or set(predictions) - set(references):
        raise ValueError("every predicted caption needs its reference captions (same ids), and there must be one")
    res = {k: [clean_caption(v) or "<empty>"] for k, v in predictions.items()}
    gts = {k: [clean_caption(r) for r in references[k]] for k in predictions}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "scene_match": scene_match(predictions, references),
            **grounding(predictions, references), "captions": len(predictions)}


def scene_words(caption: str) -> set[str]:
    return set(clean_caption(caption).split()) & SCENE_WORDS


def scene_match(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """Fraction of predictions whose shape and color words are exactly those of the scene's first reference
    (every reference of a synthetic scene names the same shapes and colors)."""
    hits = sum(scene_words(p) == scene_words(references[k][0]) for k, p in predictions.items())
    return hits / len(predictions)


def scene_parts(caption: str) -> dict:
    """What a synthetic caption says of its scene: shape kinds, shape colors, background, number of shapes
    (shape nouns named; every caption names each shape once)."""
    words = clean_caption(caption).split()
    return {"shape": set(words) & set(SHAPES), "color": set(words) & set(COLORS),
            "background": set(words) & set(BACKGROUNDS), "count": sum(w in SHAPES for w in words)}


def grounding(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """{"shape_match", "color_match", "background_match", "count_match"}: the fraction of predictions whose part
    equals that of the scene's first reference."""
    hits = dict.fromkeys(("shape", "color", "background", "count"), 0)
    for key, prediction in predictions.items():
        said, truth = scene_parts(prediction), scene_parts(references[key][0])
        for part in hits:
            hits[part] += said[part] == truth[part]
    return {f"{part}_match": n / len(predictions) for part, n in hits.items()}
