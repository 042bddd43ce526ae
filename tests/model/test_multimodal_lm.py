"""The multimodal LM: image embeddings at the placeholders, generation through the LM's generate(), saving,
and the LM / tokenizer mismatches that are one clear error."""

import pytest
import torch

from pretrain.model.multimodal_lm import IMAGE_TOKEN, MultimodalLM, MultimodalLMError
from tests.helpers.model import _images, tiny_config
from tests.helpers.multimodal import write_export, write_lm


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("multimodal")
    return {"export": write_export(root / "export"), "lm": write_lm(root / "lm"),
            "narrow_lm": write_lm(root / "narrow", hidden=32), "grown": write_lm(root / "grown", extra_tokens=40)}


def build(parts, **kwargs) -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM.build(parts["export"], str(parts["lm"]), **kwargs).eval()


def prompt(model: MultimodalLM, before: str, after: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    tok = model.tokenizer
    ids = tok(before, add_special_tokens=False)["input_ids"] + [model.image_token_id] * model.image_tokens + \
        tok(after, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids] * batch)
    return ids, torch.ones_like(ids)


def pixels(n: int = 2, seed: int = 0) -> torch.Tensor:
    return _images(n, tiny_config().image_size, torch.Generator().manual_seed(seed))


def test_image_embeddings_land_exactly_at_the_placeholder_positions(parts):
    model = build(parts, image_tokens=4)
    tok = model.tokenizer
    first = tok("USER:", add_special_tokens=False)["input_ids"]
    # row 0: the image after 'USER:'; row 1: the image 3 tokens later (other text first)
    rows = [first + [model.image_token_id] * 4 + first * 2, first * 2 + [model.image_token_id] * 4 + first]
    input_ids, images = torch.tensor(rows), pixels()
    with torch.no_grad():
        embeds, image = model.embed(input_ids, images), model.encode_images(images)
        text = model.lm.get_input_embeddings()(input_ids.masked_fill(input_ids == model.image_token_id, 0))
    start = [len(first), 2 * len(first)]
    for b in range(2):
        is_image = torch.zeros(input_ids.shape[1], dtype=torch.bool)
        is_image[start[b]:start[b] + 4] = True
        assert torch.equal(embeds[b, is_image], image[b])  # image b's tokens, in order, at row b's placeholders
        assert torch.equal(embeds[b, ~is_image], text[b, ~is_image])
    assert not torch.equal(image[0], image[1])
    with pytest.raises(MultimodalLMError, match=f"exactly 4 {IMAGE_TOKEN} tokens"):
        model.embed(input_ids[:, :-3].clone().fill_(model.image_token_id), images)


@pytest.mark.parametrize("image_tokens, projector", [(0, "mlp"), (4, "mlp"), (3, "resampler")])
def test_every_projector_gives_its_number_of_lm_width_tokens(parts, image_tokens, projector):
    model = build(parts, image_tokens=image_tokens, projector=projector)
    expected = image_tokens or tiny_config().num_patches + 1
    assert model.image_tokens == expected
    assert model.encode_images(pixels()).shape == (2, expected, 64)


def test_loss_only_on_labelled_tokens_and_gradients_reach_the_projector(parts):
    model = build(parts, image_tokens=4)
    input_ids, mask = prompt(model, "USER:", "ASSISTANT: A red circle.")
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    out = model(pixels(), input_ids, mask, labels)
    logits = model.lm(inputs_embeds=model.embed(input_ids, pixels()), attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(logits[:, -4:-1].flatten(0, 1).double(), input_ids[:, -3:].flatten())
    assert out.labelled_tokens.item() == 6
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.projector.fc1.weight.grad.abs().sum() > 0


def test_per_conversation_loss_weighs_each_conversation_alike(parts):
    model = build(parts, image_tokens=4)
    input_ids, mask = prompt(model, "USER:", "ASSISTANT: A red circle.", batch=3)
    labels = torch.full_like(input_ids, -100)
    labels[0, -3:], labels[1, -1:] = input_ids[0, -3:], input_ids[1, -1:]  # row 2 has no answer: left out
    with torch.no_grad():
        out = model(pixels(3), input_ids, mask, labels, per_conversation=True)
        tokens = model(pixels(3), input_ids, mask, labels)
        logits = model.lm(inputs_embeds=model.embed(input_ids, pixels(3)), attention_mask=mask).logits.double()
    row0 = torch.nn.functional.cross_entropy(logits[0, -4:-1], input_ids[0, -3:], reduction="none")
    row1 = torch.nn.functional.cross_entropy(logits[1, -2:-1], input_ids[1, -1:], reduction="none")
    torch.testing.assert_close(out.loss.double(), (row0.mean() + row1.mean()) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.loss.double(), torch.cat([row0, row1]).mean(), rtol=1e-5, atol=1e-6)
    assert abs(out.loss.item() - tokens.loss.item()) > 1e-4  # the two weightings differ on unequal answers


def test_greedy_generation_is_deterministic_and_is_the_argmax_of_the_forward(parts):
    model = build(parts, image_tokens=4)
    input_ids, mask = prompt(model, "USER:", "ASSISTANT:")
    images = pixels()
    first = model.generate(images, input_ids, mask, max_new_tokens=6, do_sample=False)
    again = model.generate(images, input_ids, mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(first, again) and first.shape[1] >= 1
    with torch.no_grad():
        logits = model.lm(inputs_embeds=model.embed(input_ids, images), attention_mask=mask).logits
    assert torch.equal(first[:, 0], logits[:, -1].argmax(-1))
    beams = model.generate(images, input_ids, mask, max_new_tokens=6, num_beams=3, do_sample=False)
    torch.manual_seed(1)
    sampled = model.generate(images, input_ids, mask, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.5)
    assert beams.shape[0] == sampled.shape[0] == 2


def test_a_prompt_longer_than_the_context_is_one_error(parts):
    model = build(parts, image_tokens=0)  # 65 image tokens of a 256-token context
    input_ids, mask = prompt(model, "USER: " * 80, "ASSISTANT:")
    with pytest.raises(MultimodalLMError, match="the LM's context is 256"):
        model.generate(pixels(), input_ids, mask, max_new_tokens=2)


def test_save_and_load_give_the_same_model(parts, tmp_path):
    model = build(parts, image_tokens=3, projector="resampler")
    model.save_pretrained(tmp_path / "saved")
    loaded = MultimodalLM.from_pretrained(tmp_path / "saved").eval()
    input_ids, mask = prompt(model, "USER:", "ASSISTANT:")
    labels = input_ids.clone()
    assert torch.equal(model(pixels(), input_ids, mask, labels).loss, loaded(pixels(), input_ids, mask, labels).loss)


def test_an_lm_whose_hidden_size_does_not_fit_the_projector_is_one_error(parts, tmp_path):
    build(parts, image_tokens=4).save_pretrained(tmp_path / "saved")
    expected = r"^the LM's hidden size is 32 but the projector maps to 64: use the LM"
    with pytest.raises(MultimodalLMError, match=expected):
        MultimodalLM.from_pretrained(tmp_path / "saved", lm_name_or_dir=str(parts["narrow_lm"]))


def test_a_tokenizer_that_does_not_fit_the_lm_is_one_error(parts):
    with pytest.raises(MultimodalLMError, match=r"the tokenizer has ids up to \d+ but the LM embeds only \d+ tokens: "
                                                r"use the tokenizer saved with this LM"):
        MultimodalLM.build(parts["export"], str(parts["grown"]))


def test_a_directory_that_is_not_an_export_is_one_error(parts, tmp_path):
    with pytest.raises(MultimodalLMError, match="is not a pretraining export"):
        MultimodalLM.build(tmp_path, str(parts["lm"]))


def digests(model: MultimodalLM) -> dict[str, str]:
    import hashlib

    return {n: hashlib.sha256(p.detach().double().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage, lm_training, trained", [
    ("align", "full", ("projector.",)),
    ("instruct", "lora", ("projector.", "lm.base_model.model.model.layers.")),
    ("instruct", "full", ("projector.", "lm.")),
])  # fmt: skip
def test_a_training_stage_changes_exactly_its_weights(parts, stage, lm_training, trained):
    model = build(parts, image_tokens=4)
    model.train()
    model.set_training_stage(stage, lm_training)
    input_ids, mask = prompt(model, "USER:", "ASSISTANT: A red circle.")
    labels = input_ids.masked_fill(input_ids == model.image_token_id, -100)
    before = digests(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(pixels(), input_ids, mask, labels).loss.backward()
    optimizer.step()
    changed = {n for n, d in digests(model).items() if d != before[n]}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == expected and all(n.startswith(trained) for n in changed)
    assert any(n.startswith("projector.") for n in changed) and not any(n.startswith("image_encoder.") for n in changed)
    if lm_training == "lora":
        assert changed - {n for n in changed if n.startswith("projector.")} == {n for n in changed if "lora_" in n}
        assert any("lora_B" in n for n in changed)


def test_the_model_built_from_configs_has_the_loaded_models_shape(parts, tmp_path):
    from pretrain.model.multimodal_lm import load_configs

    for base, lm in ((parts["export"], str(parts["lm"])), (tmp_path / "saved", None)):
        loaded = build(parts, image_tokens=4)
        loaded.save_pretrained(tmp_path / "saved")
        skeleton = MultimodalLM.from_configs(*load_configs(base, lm, image_tokens=4))
        shapes = {n: p.shape for n, p in skeleton.named_parameters()}
        assert shapes == {n: p.shape for n, p in loaded.named_parameters()}
        assert skeleton.lm.lm_head.weight is skeleton.lm.get_input_embeddings().weight  # tied, as the loaded LM


def question(model: MultimodalLM, *texts: str) -> tuple[torch.Tensor, torch.Tensor]:
    return model.question_inputs(list(texts))


def test_the_fused_instruction_is_one_more_image_token_read_from_the_question_and_the_image(parts):
    plain, fused = build(parts, image_tokens=4), build(parts, image_tokens=4, fuse_question=True)
    assert (plain.image_tokens, fused.image_tokens) == (4, 5)
    from safetensors.torch import load_model

    from pretrain.model import ALBEF

    export = ALBEF(tiny_config())
    load_model(export, str(parts["export"] / "model.safetensors"))
    exported = dict(export.named_parameters())
    for name, param in fused.question_fusion.named_parameters():
        if not name.startswith("projection."):  # the text and fusion encoders are the export's
            assert torch.equal(param, exported[name]), name
    images, asked = pixels(), question(fused, "is there a red circle", "is there a red circle")
    with torch.no_grad():
        tokens = fused.encode_images(images, asked)
        assert torch.equal(tokens[:, :4], plain.encode_images(images))  # the projector's tokens come first
        other_question = fused.encode_images(images, question(fused, "what color is the background", "is it blue"))
        padded = fused.question_inputs(["is there a red circle", "is there a red circle and a big blue square"])
        longer = fused.encode_images(images, (padded[0][:1].expand(2, -1), padded[1][:1].expand(2, -1)))
    assert not torch.allclose(tokens[0, 4], tokens[1, 4])  # same question, other image
    assert not torch.allclose(tokens[:, 4], other_question[:, 4])  # same image, other question
    torch.testing.assert_close(longer, tokens, rtol=1e-5, atol=1e-5)  # padding is not read
    with pytest.raises(MultimodalLMError, match="fuses the instruction with the image"):
        fused.encode_images(images)


@pytest.mark.parametrize("stage, train_encoder, trained", [
    ("align", False, ("projector.", "question_fusion.projection.")),
    ("instruct", False, ("projector.", "question_fusion.projection.", "lm.")),
    ("instruct", True, ("projector.", "question_fusion.", "lm.", "image_encoder.")),
])  # fmt: skip
def test_a_fused_model_trains_its_encoders_only_with_the_image_encoder(parts, stage, train_encoder, trained):
    model = build(parts, image_tokens=4, fuse_question=True)
    model.train()
    model.set_training_stage(stage, train_encoder=train_encoder)
    input_ids, mask = prompt(model, "USER:", "ASSISTANT: A red circle.")
    labels = input_ids.masked_fill(input_ids == model.image_token_id, -100)
    before = digests(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    asked = question(model, "describe it", "is there a square")
    model(pixels(), input_ids, mask, labels, question=asked).loss.backward()
    optimizer.step()
    changed = {n for n, d in digests(model).items() if d != before[n]}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(trained) for n in changed) and {n.split(".")[0] for n in changed} == {
        t.split(".")[0] for t in trained}
    encoders = {n for n in changed if n.startswith(("question_fusion.text_encoder.", "question_fusion.fusion_"))}
    assert bool(encoders) == train_encoder


def test_the_encoders_take_their_fraction_of_the_learning_rate(parts):
    from pretrain.train.optim import build_optimizer, build_scheduler
    from pretrain.train.recipe import OptimSection, ScheduleSection

    model = build(parts, image_tokens=4, fuse_question=True)
    model.train()
    model.set_training_stage("instruct", train_encoder=True, encoder_lr_scale=0.1)
    optimizer = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.0), offload_to_cpu=False)
    build_scheduler(optimizer, ScheduleSection(max_steps=10, warmup_steps=0), OptimSection())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    input_ids, mask = prompt(model, "USER:", "ASSISTANT: A red circle.")
    labels = input_ids.masked_fill(input_ids == model.image_token_id, -100)
    model(pixels(), input_ids, mask, labels, question=question(model, "describe it", "describe it")).loss.backward()
    optimizer.step()
    # Adam's first step moves each weight by its group's rate (times |g| / (|g| + eps), 1 for a real gradient)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    encoders = [moved[n] for n in moved if n.startswith(("image_encoder.", "question_fusion.text_encoder."))]
    rest = [moved[n] for n in moved if n.startswith(("projector.", "lm."))]
    assert max(encoders) == pytest.approx(1e-3, rel=1e-3) and max(rest) == pytest.approx(1e-2, rel=1e-3)
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == [1e-3, 1e-2]


def test_a_saved_fused_model_loads_with_its_fusion_and_tokenizer(parts, tmp_path):
    from pretrain.model.multimodal_lm import load_configs

    model = build(parts, image_tokens=4, fuse_question=True)
    model.save_pretrained(tmp_path / "saved")
    loaded = MultimodalLM.from_pretrained(tmp_path / "saved").eval()
    input_ids, mask = prompt(model, "USER:", "ASSISTANT:")
    asked = question(loaded, "is there a red circle", "caption this image")
    assert all(map(torch.equal, asked, question(model, "is there a red circle", "caption this image")))
    labels = input_ids.clone()
    assert torch.equal(model(pixels(), input_ids, mask, labels, question=asked).loss,
                       loaded(pixels(), input_ids, mask, labels, question=asked).loss)
    options = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(model.eval().generate(pixels(), input_ids, mask, asked, **options),
                       loaded.generate(pixels(), input_ids, mask, asked, **options))
    skeleton = MultimodalLM.from_configs(*load_configs(tmp_path / "saved"))
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in loaded.named_parameters()}
    assert skeleton.question_tokenizer is not None and skeleton.image_tokens == 5


def test_training_and_generation_fuse_the_same_instruction(parts):
    from data_pipeline.instructions import first_instruction, vqa_conversation
    from pretrain.instruct.task import conversation_targets

    model = build(parts, image_tokens=4, fuse_question=True).eval()
    messages, _ = vqa_conversation("Is there a red circle?", ["yes"])
    trained = conversation_targets({"conversations": messages}, tokenizer=model.tokenizer,
                                   image_tokens=model.image_tokens, max_len=96,
                                   question=(model.question_tokenizer, model.encoder_config.max_position))
    ids, mask = trained["question_ids"][None], trained["question_mask"][None]  # padded to max_position
    asked = model.question_inputs([first_instruction(messages)])  # generation: padded to the longest
    assert ids.shape[1] > asked[0].shape[1] and torch.equal(ids[mask.bool()], asked[0][asked[1].bool()])
    with torch.no_grad():
        fused = [model.encode_images(pixels(1), q)[:, -1] for q in ((ids, mask), asked)]
    torch.testing.assert_close(fused[0], fused[1])  # float32 tolerances: the padding is never read


def test_a_fused_model_needs_the_exports_tokenizer(parts, tmp_path):
    import shutil

    shutil.copytree(parts["export"], tmp_path / "export", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(MultimodalLMError, match="has no tokenizer/: fuse_question reads the instruction"):
        MultimodalLM.build(tmp_path / "export", str(parts["lm"]), fuse_question=True)
