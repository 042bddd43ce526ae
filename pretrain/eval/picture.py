"""Evaluation pictures for TensorBoard, drawn with PIL alone (its built-in font works offline).

The retrieval picture: a few image queries with their top captions and a few caption queries with their top
images, hits in green and misses in red, so one look tells what the model retrieves; the queries are the same
at every evaluation. The classification pictures: a confusion matrix, and accuracy against shots.
"""

from __future__ import annotations

import math
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


def confusion_picture(confusion: list[list[int]], classes: list[str], title: str = "") -> torch.Tensor:
    """uint8 [3, H, W]: the confusion matrix (rows: true class, columns: predicted), each cell shaded by its
    share of the row and labelled with its count; the diagonal in green, errors in red."""
    n, cell = len(classes), 36
    font = ImageFont.load_default(size=12)
    label_width = min(TEXT_COLUMN, max(int(font.getlength(name)) for name in classes) + PAD)
    left, top = PAD + label_width, TITLE + LINE + label_width
    title = title or "confusion: rows true, columns predicted"
    width = max(left + n * cell + PAD, int(font.getlength(title)) + 2 * PAD)
    canvas = Image.new("RGB", (width, top + n * cell + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD // 2), title, fill=INK, font=font)
    for c, name in enumerate(classes):
        draw.text((PAD, top + c * cell + cell // 3), _fit(name, label_width - PAD, font), fill=INK, font=font)
        column = Image.new("RGB", (label_width, LINE), BACKGROUND)  # column labels written sideways
        ImageDraw.Draw(column).text((0, 0), _fit(name, label_width, font), fill=INK, font=font)
        canvas.paste(column.rotate(90, expand=True), (left + c * cell + (cell - LINE) // 2, TITLE + LINE))
    for row, counts in enumerate(confusion):
        total = max(1, sum(counts))
        for col, count in enumerate(counts):
            share = count / total
            tint = HIT if row == col else MISS
            fill = tuple(int(b + share * (t - b)) for b, t in zip(BACKGROUND, tint))
            box = (left + col * cell, top + row * cell, left + (col + 1) * cell, top + (row + 1) * cell)
            draw.rectangle(_inclusive(box), fill=fill, outline=(60, 60, 60))
            draw.text((box[0] + 4, box[1] + cell // 3), str(count), fill=INK, font=font)
    return to_uint8_tensor(canvas)


# one line colour per method of a learning-curve picture, none of them a hit/miss marker
CURVE_COLOURS = [(90, 160, 255), (255, 170, 60), (200, 120, 255), (80, 220, 220), (250, 110, 170), (200, 200, 90),
                 (160, 160, 160)]


def curve_picture(curves: dict[str, list[tuple[float, float, float]]], title: str, width: int = 560,
                  height: int = 320) -> torch.Tensor:
    """uint8 [3, H, W]: accuracy (0-1) against shots on a log2 axis, one line per method from (shots, mean, sd)
    points, with a +-sd bar at each point and a legend below."""
    font = ImageFont.load_default(size=12)
    shots = sorted({x for points in curves.values() for x, _, _ in points})
    plot = (2 * PAD + 32, TITLE + PAD, width - 3 * PAD, height - 2 * LINE)  # left, top, right, bottom
    legend_rows = len(curves)
    canvas = Image.new("RGB", (width, height + legend_rows * LINE + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD // 2), _fit(title, width - 2 * PAD, font), fill=INK, font=font)

    def at(x: float, y: float) -> tuple[float, float]:
        fx = math.log2(x / shots[0]) / math.log2(shots[-1] / shots[0]) if shots[-1] > shots[0] else 0.5
        return plot[0] + fx * (plot[2] - plot[0]), plot[3] - y * (plot[3] - plot[1])

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = at(shots[0], tick)
        draw.line((plot[0], y, plot[2], y), fill=(60, 60, 60))
        draw.text((PAD, y - 6), f"{tick:.2f}", fill=INK, font=font)
    for x in shots:
        px, _ = at(x, 0)
        draw.text((px - 4, plot[3] + 4), str(int(x)), fill=INK, font=font)
    draw.text((plot[2] - 40, plot[3] + 4 + LINE // 2), "shots", fill=INK, font=font)
    for n, (method, points) in enumerate(curves.items()):
        colour = CURVE_COLOURS[n % len(CURVE_COLOURS)]
        xy = [at(x, mean) for x, mean, _ in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for (x, mean, sd), (px, py) in zip(points, xy):
            draw.line((px, at(x, mean - sd)[1], px, at(x, mean + sd)[1]), fill=colour)
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        y = height + n * LINE
        draw.line((PAD, y + LINE // 2, PAD + 20, y + LINE // 2), fill=colour, width=3)
        draw.text((PAD + 28, y), method, fill=INK, font=font)
    return to_uint8_tensor(canvas)


ANSWER_TEXT = 480  # width of an example's text column


def answers_picture(examples: list[tuple[dict, torch.Tensor]]) -> torch.Tensor:
    """uint8 [3, H, W]: one row per example of a generative evaluation: the image (uint8 [3, h, w]) beside its
    instruction, the model's answer and the reference, with a bar in green when the answer is right (a VQA
    answer equal to the commonest annotator answer, a caption naming exactly the scene's shapes and colours)
    and red otherwise."""
    from pretrain.eval.answers import answer_is_right

    font = ImageFont.load_default(size=12)
    text_left = 2 * PAD + THUMB + BAR + 4
    row_height = max(THUMB, 6 * LINE) + PAD
    canvas = Image.new("RGB", (text_left + ANSWER_TEXT + PAD, TITLE + len(examples) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD // 2), "instruction, answer (green: right), reference", fill=INK, font=font)
    for n, (row, pixels) in enumerate(examples):
        top = TITLE + n * row_height
        thumb = Image.frombytes("RGB", tuple(pixels.shape[2:0:-1]), pixels.permute(1, 2, 0).contiguous().numpy()
                                .tobytes()).resize((THUMB, THUMB), Image.Resampling.BICUBIC)
        canvas.paste(thumb, (PAD, top))
        draw.rectangle(_inclusive((2 * PAD + THUMB, top, 2 * PAD + THUMB + BAR, top + THUMB)),
                       fill=HIT if answer_is_right(row) else MISS)
        reference = row["reference"] if row["task"] == "vqa" else row["references"][0]
        lines = []
        for label, text in (("instruction", row["prompt"].replace("<image>", "").strip()), ("answer", row["answer"]),
                            ("reference", reference)):
            lines += _wrap(f"{label}: {text}", ANSWER_TEXT, font, max_lines=2)
        for k, line in enumerate(lines):
            draw.text((text_left, top + k * LINE), line, fill=INK, font=font)
    return to_uint8_tensor(canvas)
