"""benchmarks.bench_image_use: the answer loss with the right images against rolled ones. A model whose
image tokens carry nothing about the image (the projector's output zeroed) has a gap of exactly 0; one that
reads distinct images has a gap, and its right-image loss is the model's own training loss."""

import torch

from benchmarks.bench_image_use import image_use
from data_pipeline.instructions import tokenize_conversation
from pretrain.model.multimodal_lm import MultimodalLM
from tests.helpers.multimodal import write_export, write_lm


def batch(model: MultimodalLM) -> tuple:
    conversations = [[{"role": "user", "content": "<image>\nWhat is in this picture?"},
                      {"role": "assistant", "content": answer}] for answer in
                     ("A large red circle in the top left.", "Two small blue squares.", "A purple diamond.")]
    rows = [tokenize_conversation(c, model.tokenizer, model.image_tokens, 64) for c in conversations]
    pixels = torch.randn(len(rows), 3, model.encoder_config.image_size, model.encoder_config.image_size,
                         generator=torch.Generator().manual_seed(0))
    return pixels, *(torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels"))


def test_the_gap_is_zero_exactly_when_the_image_tokens_ignore_the_image(tmp_path):
    torch.manual_seed(0)
    model = MultimodalLM.build(write_export(tmp_path / "export"), str(write_lm(tmp_path / "lm")), image_tokens=4)
    model.eval()
    pixels, ids, mask, labels = batch(model)
    reading = image_use(model, pixels, ids, mask, labels)
    assert reading["right_loss"] == model(pixels, ids, mask, labels).loss.item()
    assert abs(reading["gap"]) > 1e-4
    assert reading["answer_tokens"] == int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        model.projector.fc2.weight.zero_()
        model.projector.fc2.bias.zero_()
    blind = image_use(model, pixels, ids, mask, labels)
    assert blind["gap"] == 0.0 and blind["image_token_norm"] == 0.0
    assert blind["text_token_norm"] == reading["text_token_norm"] > 0
