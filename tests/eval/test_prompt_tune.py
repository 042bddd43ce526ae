"""Learned prompts: context vectors in the text encoder, their training on a frozen model, the prompt_tune CLI."""

import dataclasses
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.collate import tokenize
from data_pipeline.zeroshot_data import generate
from pretrain.eval.few_shot import ContextClassifier, train_context
from pretrain.model import ALBEF, KeyPadding
from pretrain.model.prompting import LearnedContext
from pretrain.prompt_tune import main as prompt_tune_main
from pretrain.zeroshot import main as zeroshot_main
from tests.helpers.model import tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops, as prompt_tune runs them: one thread (several fight over a busy machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer, seed: int = 0) -> ALBEF:
    torch.manual_seed(seed)  # ALBEF's init draws from the global generator
    return ALBEF(dataclasses.replace(tiny_config(image_size=32), vocab_size=len(tokenizer))).eval()


def digest(model: ALBEF) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return sha.hexdigest()


def test_inputs_embeds_equal_to_the_word_embeddings_change_nothing(tokenizer):
    model = tiny_model(tokenizer)
    text = tokenize(tokenizer, ["a small red circle on the left", "a square"], 16)
    padding = KeyPadding(text["attention_mask"].bool())
    words = model.text_encoder.embeddings.word_embeddings(text["input_ids"])
    assert torch.equal(model.text_encoder(text["input_ids"], padding, inputs_embeds=words),
                       model.text_encoder(text["input_ids"], padding))


def test_context_from_a_phrase_gives_the_hand_prompt(tokenizer):
    """Context vectors equal to the word embeddings of 'a large red' before 'circle' are that prompt."""
    model = tiny_model(tokenizer)
    phrase = tokenizer("a large red", add_special_tokens=False)["input_ids"]
    context = LearnedContext(model.text_encoder.embeddings.word_embeddings.weight[phrase], num_classes=2)
    classifier = ContextClassifier(model, tokenizer, context, {"c": ["circle"], "s": ["square"]}, ["c", "s"], 16)
    text = tokenize(tokenizer, ["a large red circle", "a large red square"], 16)
    with torch.no_grad():
        hand = model.encode_text(text["input_ids"], text["attention_mask"])[1]
        assert torch.allclose(classifier.class_embeddings(), hand, atol=1e-6)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_learned_context_lowers_the_loss_and_changes_no_encoder_weight(tokenizer, num_classes):
    model = tiny_model(tokenizer).requires_grad_(False)
    before = digest(model)
    g = torch.Generator().manual_seed(0)
    feats, labels = F.normalize(torch.randn(12, model.config.embed_dim, generator=g), dim=-1), torch.arange(3).repeat(4)
    context = LearnedContext(0.1 * torch.randn(4, model.config.text_hidden, generator=g), num_classes)
    start = context.vectors.detach().clone()
    verbalizer = {"one": ["one shape"], "two": ["two shapes"], "three": ["three shapes", "3 shapes"]}
    classifier = ContextClassifier(model, tokenizer, context, verbalizer, list(verbalizer), 32)
    # with the session tokenizer (deterministic since train_tokenizer numbers continuation tokens itself) 30 steps
    # leave the shared context at 0.54 of its starting loss, 100 steps at 0.24
    losses = train_context(classifier, feats, labels, scale=20.0, steps=100, lr=2e-2)
    assert losses[-1] < 0.5 * losses[0]
    assert digest(model) == before
    assert not torch.allclose(context.vectors, start)
    assert all(p.grad is None for p in model.parameters())


def test_the_anchor_adds_its_weighted_distance_and_holds_the_context_near_the_hand_prompts(tokenizer):
    """KgCoOp: the first loss is the cross-entropy plus weight x the class embeddings' mean squared distance
    from the anchor (computed here by hand), and a heavy anchor ends nearer the anchor than none."""
    model = tiny_model(tokenizer).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    feats, labels = F.normalize(torch.randn(12, model.config.embed_dim, generator=g), dim=-1), torch.arange(3).repeat(4)
    init = 0.1 * torch.randn(4, model.config.text_hidden, generator=g)
    verbalizer = {"one": ["one shape"], "two": ["two shapes"], "three": ["three shapes"]}
    with torch.no_grad():  # an anchor the context can reach: the embeddings of another context
        other = LearnedContext(0.1 * torch.randn(4, model.config.text_hidden, generator=g), 3)
        anchor = ContextClassifier(model, tokenizer, other, verbalizer, list(verbalizer), 32).class_embeddings()
    distances = {}
    for weight in (0.0, 50.0):
        classifier = ContextClassifier(model, tokenizer, LearnedContext(init, 3), verbalizer, list(verbalizer), 32)
        with torch.no_grad():
            start = classifier.class_embeddings().double()
        losses = train_context(classifier, feats, labels, 20.0, 60, 2e-2, anchor, weight)
        hand = F.cross_entropy(20.0 * feats.double() @ start.T, labels) + weight * sum(
            float((start[c] - anchor[c].double()) @ (start[c] - anchor[c].double())) for c in range(3)) / 3
        assert losses[0] == pytest.approx(float(hand), rel=1e-5)
        with torch.no_grad():
            distances[weight] = (classifier.class_embeddings() - anchor).square().sum(-1).mean().item()
    assert distances[50.0] < 0.2 * distances[0.0]


@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer):
    """The count task at 2 train + 2 test images per class and a toy export."""
    from pretrain.train.export import save_export

    root = tmp_path_factory.mktemp("prompting")
    generate(root / "data", train_per_class=2, test_per_class=2, size=32, tasks=("count",))
    save_export(tiny_model(tokenizer), tokenizer, root / "export")
    return root


def test_prompt_tune_end_to_end_and_zeroshot_reuses_its_context(task, tmp_path, capsys):
    data = task / "data" / "count"
    prompt_files = ["--templates", str(data / "templates.txt"), "--verbalizer", str(data / "verbalizer.yaml")]
    assert prompt_tune_main(["--checkpoint", str(task / "export"), "--train", str(data / "train"), "--test",
                             str(data / "test"), *prompt_files, "--shots", "1,2", "--seeds", "0,1", "--steps", "5",
                             "--out", str(tmp_path / "pt")]) == 0
    results = json.loads((tmp_path / "pt" / "prompt_tune.json").read_text())
    assert set(results["methods"]) == {"hand_single", "hand_ensemble", "context_shared", "context_class",
                                       "label_embeddings", "linear_probe"}
    for per_k in results["methods"].values():
        assert set(per_k) == {"1", "2"} and all(len(s["runs"]) == 2 for s in per_k.values())
        for stats in per_k.values():
            assert stats["mean"] == pytest.approx(sum(stats["runs"]) / 2)
    assert (tmp_path / "pt" / "learning_curve.png").is_file()
    assert list((tmp_path / "pt").glob("events.out.tfevents.*"))
    capsys.readouterr()
    for method in ("context_shared", "context_class"):
        prompt = tmp_path / "pt" / f"{method}.safetensors"
        assert zeroshot_main(["--checkpoint", str(task / "export"), "--data", str(data / "test"), "--prompt",
                              str(prompt), "--out", str(tmp_path / method)]) == 0
        zeroshot = json.loads((tmp_path / method / "zeroshot.json").read_text())
        # the saved context is the one of k=2, seed 0: zero-shot with it scores what prompt_tune measured
        assert zeroshot["top1"] == pytest.approx(results["methods"][method]["2"]["runs"][0])
        assert zeroshot["label_words"] == results["label_words"]


def test_fewer_images_than_shots_is_one_error(task, tmp_path, capsys):
    data = task / "data" / "count"
    assert prompt_tune_main(["--checkpoint", str(task / "export"), "--train", str(data / "train"), "--test",
                             str(data / "test"), "--shots", "1,3", "--out", str(tmp_path / "pt")]) == 2
    assert capsys.readouterr().err.strip() == ("error: class 'one' has 2 training images, fewer than the 3 shots asked "
                                               "for; add images or lower --shots to at most 2")


def test_class_specific_context_for_other_classes_is_one_error(task, tmp_path, capsys):
    prompt = tmp_path / "p.safetensors"
    LearnedContext(torch.zeros(2, 4, 128)).save(prompt, {"classes": ["a", "b"], "label_words": {"a": ["a"]}})
    data = task / "data" / "count" / "test"
    assert zeroshot_main(["--checkpoint", str(task / "export"), "--data", str(data), "--prompt", str(prompt),
                          "--out", str(tmp_path / "z")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: prompt file {prompt} has class-specific context for classes ['a', 'b'], the data has "
        "['one', 'three', 'two']; use a shared-context prompt file or the data it was trained for")
