"""The retrieval picture read back by pixel values, for score matrices built here."""

import io

import torch
from PIL import Image

from data_pipeline.eval_data import EvalData
from pretrain.eval.picture import BACKGROUND, FRAME, HIT, MISS, THUMB, Layout, retrieval_picture
from pretrain.eval.retrieval import retrieval_examples

# six images of one colour each (none of them a marker colour), two captions per image: caption t shows image t // 2
COLOURS = [(50, 100, 200), (200, 200, 50), (120, 60, 160), (60, 160, 160), (250, 150, 100), (90, 90, 240)]
IMAGE_IDS = torch.tensor([10, 11, 12, 13, 14, 15])
TEXT_IMAGE_IDS = IMAGE_IDS.repeat_interleave(2)


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def eval_data() -> EvalData:
    texts = [f"a picture number {t // 2} with some words, caption {t % 2} of two" for t in range(12)]
    tokens = torch.ones(12, 4, dtype=torch.long)
    return EvalData([f"k{i}" for i in range(6)], IMAGE_IDS, [png(c) for c in COLOURS], texts, TEXT_IMAGE_IDS,
                    tokens, tokens, image_size=32, skipped={})


def scores() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    i2t, t2i = torch.rand(6, 12, generator=g), torch.rand(12, 6, generator=g)
    i2t[0, [0, 1]] = torch.tensor([-1.0, -2.0])  # image 0's captions rank last: no hit in its top 5
    i2t[2, 4] = 2.0  # image 2's first caption ranks first
    t2i[4, 2] = -1.0  # caption 4's image ranks last
    return i2t, t2i


def region(picture: torch.Tensor, box) -> torch.Tensor:
    left, top, right, bottom = box
    return picture[:, top:bottom, left:right]


def is_colour(pixels: torch.Tensor, colour) -> bool:
    return bool((pixels == torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)).all())


def test_hits_are_green_and_misses_red_where_the_scores_put_them():
    i2t, t2i = scores()
    examples = retrieval_examples(i2t, t2i, IMAGE_IDS, TEXT_IMAGE_IDS, queries=4, top=5)
    picture = retrieval_picture(examples, eval_data())
    layout = Layout(4, 4, 5)
    assert picture.dtype == torch.uint8 and picture.shape == (3, layout.height, layout.width)
    image_queries, text_queries = [0, 2, 3, 5], [1, 4, 7, 10]  # spread evenly over 6 images and 12 captions
    assert examples.image_queries.tolist() == image_queries and examples.text_queries.tolist() == text_queries

    hit_bars = hit_frames = 0
    for q, image in enumerate(image_queries):
        left, top = layout.query_thumb(q)
        assert is_colour(region(picture, (left, top, left + THUMB, top + THUMB)), COLOURS[image])
        ranked = sorted(range(12), key=lambda t: -i2t[image, t].item())  # no ties: drawn from rand
        for rank, text in enumerate(ranked[:5]):
            hit = text // 2 == image
            hit_bars += hit
            assert is_colour(region(picture, layout.caption_bar(q, rank)), HIT if hit else MISS), (image, rank)
    for q, text in enumerate(text_queries):
        ranked = sorted(range(6), key=lambda i: -t2i[text, i].item())
        for rank, image in enumerate(ranked[:5]):
            hit = image == text // 2
            hit_frames += hit
            left, top, right, bottom = layout.image_frame(q, rank)
            assert is_colour(picture[:, top:top + FRAME, left:right], HIT if hit else MISS), (text, rank)
            assert is_colour(picture[:, bottom - FRAME:bottom, left:right], HIT if hit else MISS)
            inner = (left + FRAME, top + FRAME, right - FRAME, bottom - FRAME)
            assert is_colour(region(picture, inner), COLOURS[image]), (text, rank)  # the retrieved image, in order

    # nothing else in the picture is a marker colour: every green pixel is one of the hits counted above
    bar_area = (lambda b: (b[2] - b[0]) * (b[3] - b[1]))(layout.caption_bar(0, 0))
    ring_area = (THUMB + 2 * FRAME) ** 2 - THUMB**2
    green = (picture == torch.tensor(HIT, dtype=torch.uint8).view(3, 1, 1)).all(dim=0).sum().item()
    assert hit_bars > 0 and hit_frames > 0
    assert green == hit_bars * bar_area + hit_frames * ring_area


def test_a_query_without_a_hit_in_view_names_the_rank_of_its_first_hit():
    i2t, t2i = scores()
    examples = retrieval_examples(i2t, t2i, IMAGE_IDS, TEXT_IMAGE_IDS, queries=4, top=5)
    assert examples.image_first_hit.tolist()[:2] == [10, 0]  # image 0: captions 0, 1 last of 12; image 2: first
    assert examples.text_first_hit.tolist()[1] == 5  # caption 4: its image last of 6
    picture = retrieval_picture(examples, eval_data())
    layout = Layout(4, 4, 5)
    left = layout.caption_bar(0, 0)[0]  # the caption column, right of the query image
    below_the_captions = [
        region(picture, (left, layout.caption_line(q, 5), layout.width, layout.caption_line(q, 6))) for q in (0, 1)
    ]
    background = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1)
    assert (below_the_captions[0] != background).any()  # the note for image 0
    assert (below_the_captions[1] == background).all()  # image 2 has a hit in view: no note


def test_the_training_log_writes_the_picture_under_its_tag(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.train.metrics import TrainLog

    i2t, t2i = scores()
    picture = retrieval_picture(retrieval_examples(i2t, t2i, IMAGE_IDS, TEXT_IMAGE_IDS), eval_data())
    recall = {"r1": 0.5, "r5": 1.0, "r10": 1.0}
    log = TrainLog(tmp_path, enabled=True)
    log.retrieval(7, {"i2t": recall, "t2i": recall}, picture)
    log.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    (written,) = events.Images("eval/retrieval_examples")
    decoded = Image.open(io.BytesIO(written.encoded_image_string)).convert("RGB")
    assert written.step == 7
    assert torch.equal(torch.frombuffer(bytearray(decoded.tobytes()), dtype=torch.uint8)
                       .view(decoded.height, decoded.width, 3).permute(2, 0, 1), picture)
