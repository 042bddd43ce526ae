"""The held-out classification sets: classes, counts, prompt files, determinism, no training image."""

import hashlib
from pathlib import Path

from data_pipeline.labelled_images import read_labelled_images
from data_pipeline.synthetic import generate as generate_coco
from data_pipeline.zeroshot_data import TASKS, generate
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
