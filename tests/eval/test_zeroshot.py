"""Zero-shot classification: class embeddings, metrics, the two readers, the bad-input errors, the CLI."""

import dataclasses
import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline import DataError, clean_caption
from data_pipeline.collate import tokenize
from data_pipeline.labelled_images import few_shot_rows, read_labelled_images
from pretrain.eval.classification import (
    class_scores,
    classification_metrics,
    encode_images,
    itm_rerank,
    word_scores,
)
from pretrain.eval.prompts import load_templates, load_verbalizer
from pretrain.model import ALBEF
from pretrain.model.prompting import class_embeddings
from pretrain.zeroshot import hand_prompts
from pretrain.zeroshot import main as zeroshot_main
from tests.helpers.model import tiny_config

CPU = torch.device("cpu")
# six solid-colour images per class folder; classes sort as written
FOLDER = {"blue_thing": [(40, 70, 220), (60, 90, 200)], "green": [(30, 170, 60), (50, 150, 80)],
          "red": [(220, 30, 30), (200, 60, 40)]}


def tiny_model(tokenizer, seed: int = 0, **config) -> ALBEF:
    torch.manual_seed(seed)  # ALBEF's init draws from the global generator
    return ALBEF(dataclasses.replace(tiny_config(image_size=32, **config), vocab_size=len(tokenizer))).eval()


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    for name, colours in FOLDER.items():
        (tmp_path / "set" / name).mkdir(parents=True)
        for n, colour in enumerate(colours):
            (tmp_path / "set" / name / f"{n}.png").write_bytes(png(colour))
    return tmp_path / "set"


def test_class_embeddings_average_normalised_features_then_normalise():
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    out = class_embeddings(features, torch.tensor([0, 0, 1]), 2)
    mean = (torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 1.0])) / 2  # each feature normalised first
    assert torch.allclose(out[0].double(), mean.double() / mean.norm(), atol=1e-7)
    assert torch.allclose(out[1].double(), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_class_embeddings_on_a_toy_model_equal_a_hand_computation(tokenizer):
    model = tiny_model(tokenizer)
    templates = ["a {}.", "there is a {} on the left"]
    verbalizer = {"circle": ["circle", "round shape"], "square": ["square"]}
    prompts = hand_prompts(model, tokenizer, templates, verbalizer, ["circle", "square"], 32, CPU)
    got = class_embeddings(prompts.feats, prompts.owner, 2)
    for label, name in enumerate(["circle", "square"]):
        feats = []
        for word in verbalizer[name]:  # one prompt at a time, every template with every label word
            for template in templates:
                text = tokenize(tokenizer, [clean_caption(template.format(word))], 32)
                with torch.no_grad():
                    feats.append(model.encode_text(text["input_ids"], text["attention_mask"])[1][0].double())
        assert len(feats) == 2 * len(verbalizer[name])
        mean = torch.stack([F.normalize(f, dim=0) for f in feats]).mean(0)
        assert torch.allclose(got[label].double(), mean / mean.norm(), atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_word_scores_average_the_heads_log_probabilities_over_tokens_then_label_words(image_folder, tokenizer):
    model = tiny_model(tokenizer, weight_words=1.0)
    images = encode_images(model, read_labelled_images(str(image_folder)), 4, CPU)
    verbalizer = {"circle": ["circle", "round shape"], "square": ["square"]}
    got = word_scores(model, tokenizer, images, verbalizer, ["circle", "square"], CPU)
    with torch.no_grad():
        log_probs = model.words_head(images.words_input).double().log_softmax(dim=1)
    ids = {word: tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("circle", "round shape", "square")}
    assert len(ids["round shape"]) >= 2  # a label word of several tokens: their mean
    circle = (log_probs[:, ids["circle"]].mean(1) + log_probs[:, ids["round shape"]].mean(1)) / 2
    assert torch.allclose(got[:, 0].double(), circle, atol=1e-5)
    assert torch.allclose(got[:, 1].double(), log_probs[:, ids["square"][0]], atol=1e-5)


def test_word_scores_need_the_word_head_and_words_the_tokenizer_knows(image_folder, tokenizer):
    images = encode_images(tiny_model(tokenizer), read_labelled_images(str(image_folder)), 4, CPU)
    with pytest.raises(DataError, match="without the caption-word objective.*--scorer itc"):
        word_scores(tiny_model(tokenizer), tokenizer, images, {"red": ["red"]}, ["red"], CPU)
    with pytest.raises(DataError, match="label word '€€' of class 'red' is not in the tokenizer's vocabulary"):
        word_scores(tiny_model(tokenizer, weight_words=1.0), tokenizer, images, {"red": ["€€"]}, ["red"], CPU)


def test_accuracy_on_known_answers():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([[0.9, 0.1, 0.0],  # right
                           [0.1, 0.2, 0.9],  # wrong: 2, then 1, then 0 (the true class is third)
                           [0.0, 0.8, 0.1],  # right
                           [0.7, 0.6, 0.1],  # wrong: 0, true class second
                           [0.0, 0.1, 0.5],  # right
                           [float("nan"), 0.1, 0.2]])  # right: NaN ranks last
    metrics = classification_metrics(scores, labels, ["a", "b", "c"])
    assert metrics["top1"] == pytest.approx(4 / 6)
    assert metrics["top5"] == 1.0  # 3 classes: the top "5" is all of them
    assert metrics["per_class"] == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert metrics["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert (metrics["num_images"], metrics["num_classes"]) == (6, 3)


def save_as_datasets(folder, out):
    import datasets

    classes = sorted(FOLDER)
    rows = {"img": [], "category": []}
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            rows["img"].append({"bytes": path.read_bytes(), "path": None})
            rows["category"].append(label)
    features = datasets.Features({"img": datasets.Image(), "category": datasets.ClassLabel(names=classes)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(out))


def test_image_folder_and_datasets_readers_agree(image_folder, tmp_path, tokenizer):
    save_as_datasets(image_folder, tmp_path / "hf")
    folder = read_labelled_images(str(image_folder))
    hf = read_labelled_images(str(tmp_path / "hf"), image_column="img", label_column="category")
    assert folder.classes == hf.classes == ["blue_thing", "green", "red"]
    assert folder.labels.tolist() == hf.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert folder.images == hf.images
    model = tiny_model(tokenizer)
    assert torch.equal(encode_images(model, folder, 4, CPU).feats, encode_images(model, hf, 4, CPU).feats)


def test_the_cli_gives_the_same_result_on_both_readers(image_folder, tmp_path, tokenizer, capsys):
    from pretrain.train.export import save_export

    save_export(tiny_model(tokenizer), tokenizer, tmp_path / "export")
    save_as_datasets(image_folder, tmp_path / "hf")
    outputs = []
    for name, data in (("folder", [str(image_folder)]),
                       ("hf", [str(tmp_path / "hf"), "--image-column", "img", "--label-column", "category"])):
        assert zeroshot_main(["--checkpoint", str(tmp_path / "export"), "--data", *data, "--templates", "photo",
                              "--itm-rerank-k", "2", "--out", str(tmp_path / name),
                              "--run-dir", str(tmp_path / "tb")]) == 0
        outputs.append(json.loads((tmp_path / name / "zeroshot.json").read_text()))
        assert (tmp_path / name / "confusion.png").is_file()
    assert outputs[0] == outputs[1]
    metrics = outputs[0]
    assert metrics["num_images"] == 6 and metrics["itm_rerank_k"] == 2
    assert metrics["label_words"] == {"blue_thing": ["blue thing"], "green": ["green"], "red": ["red"]}
    assert len(metrics["single_template_top1"]) == len(load_templates("photo"))
    assert sum(map(sum, metrics["confusion"])) == 6
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_the_cli_scores_by_the_word_head_and_refuses_a_learned_context_with_it(image_folder, tmp_path, tokenizer,
                                                                             capsys):
    from pretrain.train.export import save_export

    model = tiny_model(tokenizer, weight_words=1.0)
    save_export(model, tokenizer, tmp_path / "export")
    base = ["--checkpoint", str(tmp_path / "export"), "--data", str(image_folder), "--scorer", "words"]
    assert zeroshot_main([*base, "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    data = read_labelled_images(str(image_folder))
    expected = word_scores(model, tokenizer, encode_images(model, data, 4, CPU),
                           load_verbalizer(None, data.classes), data.classes, CPU).argmax(1)
    assert metrics["scorer"] == "words" and "single_template_top1" not in metrics
    assert metrics["top1"] == pytest.approx((expected == data.labels).double().mean().item())
    # ITM re-ranks the word head's top 2 with the hand prompts, which only re-ranking encodes
    assert zeroshot_main([*base, "--templates", "photo", "--itm-rerank-k", "2", "--out", str(tmp_path / "rr")]) == 0
    images = encode_images(model, data, 4, CPU, keep_tokens=True)
    verbalizer = load_verbalizer(None, data.classes)
    prompts = hand_prompts(model, tokenizer, load_templates("photo"), verbalizer, data.classes, 32, CPU)
    reranked = itm_rerank(model, images, prompts, word_scores(model, tokenizer, images, verbalizer, data.classes, CPU),
                          2, 4, CPU).argmax(1)
    metrics = json.loads((tmp_path / "rr" / "zeroshot.json").read_text())
    assert metrics["top1"] == pytest.approx((reranked == data.labels).double().mean().item())
    capsys.readouterr()  # the runs' progress bars
    assert "--prompt holds learned context for ITC" in error_of([*base, "--prompt", "x", "--out", "y"], capsys)


def error_of(argv, capsys) -> str:
    assert zeroshot_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_an_empty_class_folder_is_one_error(image_folder, tmp_path, capsys):
    (image_folder / "purple").mkdir()
    message = error_of(["--checkpoint", str(tmp_path), "--data", str(image_folder), "--out", str(tmp_path / "o")],
                       capsys)
    assert message == (f"error: class folder {image_folder / 'purple'} holds no image (.jpg, .jpeg, .png, .webp, "
                       ".gif, .bmp, .tif, .tiff); add images or remove the folder")


def test_a_template_without_a_slot_is_one_error(image_folder, tmp_path, capsys):
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n# a comment\na photo of something.\n")
    message = error_of(["--checkpoint", str(tmp_path), "--data", str(image_folder), "--templates",
                        str(tmp_path / "templates.txt"), "--out", str(tmp_path / "o")], capsys)
    assert message == (f"error: {tmp_path / 'templates.txt'}:3: template 'a photo of something.' needs exactly one "
                       "'{}' where the label word goes; add it, e.g. 'a photo of a {}.'")


@pytest.mark.parametrize("mapping, problem", [
    ({"blue_thing": "blue", "green": ["green"]}, "misses classes ['red']"),
    ({"blue_thing": "blue", "green": ["green"], "red": "red", "pink": "pink"}, "names unknown classes ['pink']"),
])  # fmt: skip
def test_a_verbalizer_that_misses_or_invents_a_class_is_one_error(image_folder, tmp_path, capsys, mapping, problem):
    (tmp_path / "verbalizer.json").write_text(json.dumps(mapping))
    message = error_of(["--checkpoint", str(tmp_path), "--data", str(image_folder), "--verbalizer",
                        str(tmp_path / "verbalizer.json"), "--out", str(tmp_path / "o")], capsys)
    assert message == (f"error: verbalizer {tmp_path / 'verbalizer.json'} {problem}; give label words for exactly "
                       "the classes ['blue_thing', 'green', 'red']")


def test_a_verbalizer_in_yaml_with_several_words(tmp_path):
    (tmp_path / "v.yaml").write_text("red: [red, crimson]\ngreen: green\n")
    assert load_verbalizer(tmp_path / "v.yaml", ["green", "red"]) == {"green": ["green"], "red": ["red", "crimson"]}


def test_a_dataset_without_a_label_column_is_one_error(image_folder, tmp_path, capsys):
    save_as_datasets(image_folder, tmp_path / "hf")
    capsys.readouterr()  # the save's progress bar
    message = error_of(["--checkpoint", str(tmp_path), "--data", str(tmp_path / "hf"), "--image-column", "img",
                        "--out", str(tmp_path / "o")], capsys)
    assert message == (f"error: {tmp_path / 'hf'} has no ClassLabel column 'label' (columns: ['img', 'category']); "
                       "pass --label-column category")


def test_fewer_images_than_shots_is_one_error(image_folder):
    data = read_labelled_images(str(image_folder))
    assert sorted(data.labels[few_shot_rows(data.labels, data.classes, 2, seed=0)].tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError) as err:
        few_shot_rows(data.labels, data.classes, 3, seed=0)
    assert str(err.value) == ("class 'blue_thing' has 2 training images, fewer than the 3 shots asked for; add images "
                              "or lower --shots to at most 2")


def test_itm_rerank_orders_the_top_k_by_the_mean_margin_of_each_class_prompts(image_folder, tokenizer):
    model = tiny_model(tokenizer)
    data = read_labelled_images(str(image_folder))
    images = encode_images(model, data, 4, CPU, keep_tokens=True)
    verbalizer = {"blue_thing": ["blue thing", "blue"], "green": ["green"], "red": ["red"]}
    prompts = hand_prompts(model, tokenizer, ["a {}.", "a photo of a {}"], verbalizer, data.classes, 16, CPU)
    scores = class_scores(images, prompts, 3)
    reranked = itm_rerank(model, images, prompts, scores, 3, 3, CPU)
    swapped = 0
    for row in range(len(data)):
        margins = []
        for label in range(3):  # by hand: every prompt of the class against this image, one at a time
            mine = (prompts.owner == label).nonzero().flatten().tolist()
            with torch.no_grad():
                logits = torch.cat([model.itm_logits(images.embeds[row : row + 1], prompts.embeds[p : p + 1],
                                                     prompts.mask[p : p + 1]) for p in mine])
            margins.append((logits[:, 1] - logits[:, 0]).double().mean())
        order = torch.stack(margins).argsort(descending=True).tolist()
        assert reranked[row].argsort(descending=True).tolist() == order
        swapped += order != scores[row].argsort(descending=True).tolist()
    assert swapped > 0  # the ITM head re-orders some images' classes: the check above could fail
    # k=1 keeps the ITC top class first and leaves the other classes' scores as they were
    top1 = itm_rerank(model, images, prompts, scores, 1, 3, CPU)
    assert torch.equal(top1.argmax(dim=1), scores.argmax(dim=1))
    others = scores.argsort(dim=1, descending=True)[:, 1:]
    assert torch.equal(top1.gather(1, others), scores.double().gather(1, others))
