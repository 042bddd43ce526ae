"""The retrieval picture for TensorBoard: a few image queries with their top captions and a few caption
queries with their top images, hits in green and misses in red, so one look tells what the model retrieves.

Drawn with PIL alone (its built-in font works offline); the queries are the same at every evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.eval_data import EvalData
from data_pipeline.transforms import eval_image, to_uint8_tensor
from pretrain.eval.retrieval import Examples

# Saturated colours that the grey anti-aliased text never produces, so the markers are unmistakable.
HIT, MISS = (0, 200, 0), (220, 0, 0)
BACKGROUND, INK = (24, 24, 24), (230, 230, 230)
THUMB = 96  # thumbnail side, pixels
FRAME = 4  # the hit/miss frame around a retrieved image
PAD = 8
LINE = 16  # text line height
BAR = 6  # width of the hit/miss bar before a retrieved caption
TITLE = 24  # height of a section heading
TEXT_COLUMN = 224  # width of a caption query's text
ROW = THUMB + 2 * FRAME + PAD  # one query's row, either section
CELL = THUMB + 2 * FRAME + PAD  # one retrieved image with its frame and the gap after it

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom excluded)


@dataclass(frozen=True)
class Layout:
    """Where everything goes: image queries first (one row each), then caption queries."""

    image_queries: int
    text_queries: int
    top: int

    @property
    def width(self) -> int:
        return 2 * PAD + TEXT_COLUMN + self.top * CELL

    @property
    def height(self) -> int:
        return self.text_row(self.text_queries)

    def image_row(self, query: int) -> int:
        return TITLE + query * ROW

    def text_row(self, query: int) -> int:
        return self.image_row(self.image_queries) + TITLE + query * ROW

    def query_thumb(self, query: int) -> tuple[int, int]:
        return PAD, self.image_row(query) + FRAME

    def caption_line(self, query: int, rank: int) -> int:
        return self.image_row(query) + FRAME + rank * LINE

    def caption_bar(self, query: int, rank: int) -> Box:
        left, top = 2 * PAD + THUMB, self.caption_line(query, rank) + 2
        return left, top, left + BAR, top + LINE - 4

    def image_frame(self, query: int, rank: int) -> Box:
        left, top = 2 * PAD + TEXT_COLUMN + rank * CELL, self.text_row(query)
        return left, top, left + THUMB + 2 * FRAME, top + THUMB + 2 * FRAME


def retrieval_picture(examples: Examples, data: EvalData) -> torch.Tensor:
    """uint8 [3, H, W]: each image query beside its top captions (a green bar marks a caption of that image,
    red one of another), then each caption query beside its top images (its own image framed green, others
    red); a query with no hit in view names the rank of its first hit."""
    layout = Layout(len(examples.image_queries), len(examples.text_queries), examples.texts_of_images.shape[1])
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    # At its default 10 px the built-in font's hinting swallows the space after some letters ("lefta")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    image_ids, text_image_ids = data.image_ids.tolist(), data.text_image_ids.tolist()

    draw.text((PAD, PAD // 2), f"image -> text: top {layout.top} captions (green: a caption of this image)",
              fill=INK, font=font)
    text_left = 2 * PAD + THUMB + BAR + 4
    for q, image in enumerate(examples.image_queries.tolist()):
        canvas.paste(_thumbnail(data.images[image]), layout.query_thumb(q))
        for rank, text in enumerate(examples.texts_of_images[q].tolist()):
            hit = text_image_ids[text] == image_ids[image]
            draw.rectangle(_inclusive(layout.caption_bar(q, rank)), fill=HIT if hit else MISS)
            line = _fit(f"{rank + 1}. {data.texts[text]}", layout.width - PAD - text_left, font)
            draw.text((text_left, layout.caption_line(q, rank)), line, fill=INK, font=font)
        first_hit = int(examples.image_first_hit[q])
        if first_hit >= layout.top:
            draw.text((text_left, layout.caption_line(q, layout.top)), f"first caption of this image at rank "
                      f"{first_hit + 1}", fill=INK, font=font)

    draw.text((PAD, layout.text_row(0) - TITLE + PAD // 2),
              f"text -> image: top {layout.top} images (green frame: the caption's image)", fill=INK, font=font)
    for q, text in enumerate(examples.text_queries.tolist()):
        top = layout.text_row(q)
        lines = _wrap(data.texts[text], TEXT_COLUMN, font, max_lines=ROW // LINE - 2)
        first_hit = int(examples.text_first_hit[q])
        if first_hit >= layout.top:
            lines.append(f"(its image at rank {first_hit + 1})")
        for n, line in enumerate(lines):
            draw.text((PAD, top + FRAME + n * LINE), line, fill=INK, font=font)
        for rank, image in enumerate(examples.images_of_texts[q].tolist()):
            box = layout.image_frame(q, rank)
            draw.rectangle(_inclusive(box), fill=HIT if text_image_ids[text] == image_ids[image] else MISS)
            canvas.paste(_thumbnail(data.images[image]), (box[0] + FRAME, box[1] + FRAME))
    return to_uint8_tensor(canvas)


def _thumbnail(data: bytes) -> Image.Image:
    """The picture as the model sees it (the eval transform), at thumbnail size."""
    pixels = eval_image(data, size=THUMB)
    return Image.frombytes("RGB", (THUMB, THUMB), pixels.permute(1, 2, 0).contiguous().numpy().tobytes())


def _inclusive(box: Box) -> Box:
    """PIL's rectangle includes its right and bottom edges."""
    return box[0], box[1], box[2] - 1, box[3] - 1


def _fit(text: str, width: int, font) -> str:
    """`text` cut with '...' to at most `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _wrap(text: str, width: int, font, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; what does not fit in `max_lines` ends in '...'."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(word, width, font))
    if len(lines) > max_lines:  # the rest did not fit on the last line, so _fit cuts it and adds the '...'
        lines = lines[: max_lines - 1] + [_fit(" ".join(lines[max_lines - 1 :]), width, font)]
    return lines
