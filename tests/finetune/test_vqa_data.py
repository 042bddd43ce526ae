"""The VQA data: the synthetic set's answers are its scenes', the VQA v2 reader makes one sample per question,
the loader adds soft-score targets, and VQA accuracy is the soft score of the predicted answer."""

import json
import random
from collections import Counter

import pytest
import torch

from data_pipeline import DataError, make_train_loader
from data_pipeline.samples import parse_sample, read_samples
from data_pipeline.sources.vqa import normalise_answer, read_vqa
from data_pipeline.synthetic import SPLIT_ID_BASE as CAPTION_ID_BASE
from data_pipeline.synthetic_vqa import QUESTION_TYPES, scene_questions
from data_pipeline.vqa import VQATargets, answer_vocabulary, load_vqa_eval, soft_scores
from pretrain.eval.vqa import accuracy_by_type
from pretrain.model.vqa import predicted_scores
from pretrain.train.export import cleaning_tokenizer


def test_soft_scores_and_accuracy_on_a_toy_case_with_known_answers():
    vocabulary = {"yes": 0, "no": 1, "2": 2, "red": 3}
    # 10 annotators each: 2 agree on "2" (score 2/3), 7 on "yes" (1), 1 on "no" (1/3), "blue" is not in the vocabulary
    answers = [["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"], ["yes"] * 7 + ["no"] + ["blue"] * 2]
    scores = torch.stack([soft_scores(a, vocabulary) for a in answers])
    torch.testing.assert_close(scores, torch.tensor([[0, 0, 2 / 3, 0], [1, 1 / 3, 0, 0]]))
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0],    # "2": 2/3
                           [0.0, 5.0, 0.0, 0.0],    # "no": 1/3
                           [9.0, 0.0, 0.0, 0.0]])   # "yes" on the first question again: 0
    per_question = predicted_scores(logits, torch.cat([scores, scores[:1]]))
    torch.testing.assert_close(per_question, torch.tensor([2 / 3, 1 / 3, 0.0]))
    metrics = accuracy_by_type(per_question, ["count", "presence", "count"])
    assert metrics["overall"] == pytest.approx(1 / 3)
    assert metrics["per_type"] == pytest.approx({"count": 1 / 3, "presence": 1 / 3})


def test_synthetic_questions_are_answered_by_their_scene():
    scene = {"background": "gray", "shapes": [
        {"kind": "circle", "color": "red", "size": "small", "cell": (0, 0)},
        {"kind": "square", "color": "blue", "size": "large", "cell": (2, 2)}]}
    asked = {kind: (q, a) for kind, q, a in scene_questions(scene, random.Random(3))}
    assert set(asked) == set(QUESTION_TYPES)
    assert asked["count"] == ("how many shapes are there?", "2")
    assert asked["background"] == ("what color is the background?", "gray")
    assert asked["color"][1] == {"circle": "red", "square": "blue"}[asked["color"][0].split()[-1].rstrip("?")]
    cell = {"in the top left": "circle", "in the bottom right": "square"}
    assert asked["shape"][1] == cell[asked["shape"][0].removeprefix("what shape is ").rstrip("?")]
    color, kind = asked["presence"][0].removeprefix("is there a ").rstrip("?").split()
    assert asked["presence"][1] == ("yes" if (color, kind) in {("red", "circle"), ("blue", "square")} else "no")


def test_presence_questions_alternate_their_answers_and_the_scene_answers_each():
    scene = {"background": "white", "shapes": [{"kind": "triangle", "color": "green", "size": "small", "cell": (1, 1)}]}
    for seed in range(20):
        single = scene_questions(scene, random.Random(seed))
        several = scene_questions(scene, random.Random(seed), presence=5)
        assert several[: len(single)] == single  # the one-question set is a subset, question for question
        asked = [(q, a) for kind, q, a in several if kind == "presence"]
        assert len(asked) == 5 and all(a != b for (_, a), (_, b) in zip(asked, asked[1:]))
        assert all(a == ("yes" if q == "is there a green triangle?" else "no") for q, a in asked)


def test_the_reader_gives_one_sample_per_question_with_its_answers(synthetic_vqa):
    split = read_vqa(synthetic_vqa, "train")
    questions = json.loads((synthetic_vqa / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    assert len(split.records) == len(questions) and not split.skipped
    record = split.records[0]
    assert record.captions == (questions[0]["question"],) and len(record.extra["answers"]) == 10
    assert record.extra["question_type"] in QUESTION_TYPES
    # held out from the caption set: image ids in a range of their own
    assert min(r.extra["image_id"] for r in split.records) > max(CAPTION_ID_BASE.values()) + 10_000_000 - 1
    assert normalise_answer("The Red!") == "red"


def test_the_loader_adds_soft_score_targets_from_each_sample(vqa_shards, synthetic_shards, tokenizer):
    vocabulary = answer_vocabulary(vqa_shards["train"], 100)
    answers_by_key = {}
    paths = [str(p) for p in sorted(vqa_shards["train"].glob("*.tar"))]
    for raw in read_samples(paths, Counter()):
        parsed = parse_sample(raw, Counter())
        answers_by_key[parsed.key] = parsed.meta["answers"]
    assert vocabulary.coverage == 1.0 and vocabulary.total == 10 * len(answers_by_key)
    targets = VQATargets(vocabulary.answers)
    loader = make_train_loader(vqa_shards["train"], tokenizer, batch_size=4, rank=0, world_size=1, num_workers=0,
                               seed=0, image_size=64, max_len=16, crop_scale=(1.0, 1.0), sample_targets=targets)
    batch = next(iter(loader))
    assert batch["answer_scores"].shape == (4, len(vocabulary.answers))
    for row, key in enumerate(batch["keys"]):
        (answer,) = set(answers_by_key[key])  # the ten synthetic annotators agree: full score there, 0 elsewhere
        expected = torch.zeros(len(vocabulary.answers))
        expected[vocabulary.answers.index(answer)] = 1.0
        assert torch.equal(batch["answer_scores"][row], expected)
    with pytest.raises(DataError) as err:  # caption shards have no answers
        answer_vocabulary(synthetic_shards["train"], 10)
    assert str(err.value) == (f"no sample in {synthetic_shards['train']!r} has answers: point the VQA task at shards "
                              "made with make_shards --source vqa")


def test_evaluation_reads_each_question_as_training_does_with_the_runs_and_the_exports_tokenizer(vqa_shards,
                                                                                                  tokenizer):
    """Questions are cleaned as training cleans them (lowercase, no punctuation) before tokenising: uncleaned, every
    synthetic question's '?' was an [UNK] training never showed, but only with the run's tokenizer (the export's
    cleans in its normalizer), so a saved adapter evaluated with it lost the run's own evaluation's accuracy."""
    paths = [str(p) for p in sorted(vqa_shards["val"].glob("*.tar"))]
    questions = [parse_sample(raw, Counter()).captions[0] for raw in read_samples(paths, Counter())]
    assert all(question.endswith("?") for question in questions)
    targets = VQATargets(answer_vocabulary(vqa_shards["val"], 100).answers)
    data = load_vqa_eval(vqa_shards["val"], tokenizer, targets, image_size=64, max_len=16)
    exported = load_vqa_eval(vqa_shards["val"], cleaning_tokenizer(tokenizer, 32), targets, image_size=64, max_len=16)
    assert len(data) == len(questions) and tokenizer.unk_token_id not in data.input_ids
    assert torch.equal(data.input_ids, exported.input_ids) and torch.equal(data.attention_mask, exported.attention_mask)
    loader = make_train_loader(vqa_shards["val"], tokenizer, batch_size=8, rank=0, world_size=1, num_workers=0,
                               seed=0, image_size=64, max_len=16, crop_scale=(1.0, 1.0), sample_targets=targets)
    batch = next(iter(loader))
    rows = [data.keys.index(key) for key in batch["keys"]]
    assert torch.equal(batch["input_ids"], data.input_ids[rows])
