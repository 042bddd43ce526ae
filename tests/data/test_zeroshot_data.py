"""The held-out classification sets: classes, counts, prompt files, determinism, no training image."""

import hashlib
import random
from pathlib import Path

from data_pipeline import clean_caption
from data_pipeline.labelled_images import read_labelled_images
from data_pipeline.synthetic import captions_for, sample_scene
from data_pipeline.synthetic import generate as generate_coco
from data_pipeline.zeroshot_data import CAPTION_FORMS, TASKS, _fill, _scene, generate
from pretrain.eval.prompts import load_templates, load_verbalizer

CLASSES = {"shape": ["circle", "diamond", "square", "triangle"],
           "color": ["blue", "green", "orange", "purple", "red", "yellow"],
           "count": ["one", "three", "two"], "background": ["black", "gray", "white"]}


def digests(root: Path) -> set[str]:
    return {hashlib.sha256(path.read_bytes()).hexdigest() for path in root.rglob("*.jpg")}


def test_every_task_is_an_image_folder_with_its_prompt_files(tmp_path):
    generate(tmp_path, train_per_class=2, test_per_class=3, size=32)
    assert sorted(TASKS) == sorted(CLASSES)
    for task, classes in CLASSES.items():
        for split, per_class in (("train", 2), ("test", 3)):
            data = read_labelled_images(str(tmp_path / task / split))
            assert data.classes == classes
            assert data.labels.bincount().tolist() == [per_class] * len(classes)
        assert len(load_templates(str(tmp_path / task / "templates.txt"))) == len(TASKS[task].templates)
        assert sorted(load_verbalizer(tmp_path / task / "verbalizer.yaml", classes)) == classes


def test_the_sets_are_deterministic_and_hold_no_image_of_the_captioned_set(tmp_path):
    generate(tmp_path / "a", train_per_class=2, test_per_class=2, size=32)
    generate(tmp_path / "b", train_per_class=2, test_per_class=2, size=32)
    held_out = digests(tmp_path / "a")
    assert held_out == digests(tmp_path / "b")
    assert len(held_out) == (2 + 2) * (4 + 6 + 3 + 3)  # no two images alike
    generate_coco(tmp_path / "coco", train=200, val=20, size=32)
    assert not held_out & digests(tmp_path / "coco")


def test_the_caption_forms_are_the_training_captions_and_every_prompt_uses_their_words():
    rng = random.Random(0)
    for _ in range(20):  # with one shape the listing order of a form does not matter
        scene = _scene(rng, 1)
        expected = [clean_caption(caption) for caption in captions_for(scene, rng)]
        assert [clean_caption(_fill(form, scene["shapes"], scene["background"])) for form in CAPTION_FORMS] == expected
    caption_words = {word for _ in range(300) for caption in captions_for(sample_scene(rng), rng)
                     for word in clean_caption(caption).split()}
    for task in TASKS.values():
        prompts = [template.replace("{}", word) for template in task.templates for words in task.verbalizer.values()
                   for word in words]
        assert {word for prompt in prompts for word in clean_caption(prompt).split()} <= caption_words
        assert len(set(task.templates)) == len(task.templates)  # every drawn template differs
