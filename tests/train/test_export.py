"""An export used as users use it: AutoImageProcessor + AutoModel + AutoTokenizer give our model's features."""

import io

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from data_pipeline.collate import tokenize
from data_pipeline.text import clean_caption
from data_pipeline.transforms import eval_image
from pretrain.model import ALBEF, model_preset
from pretrain.train.export import save_export
from tests.helpers.data import CLIP_MEAN, CLIP_STD, encoded, ramp_with_marker

MAX_LEN = 32
# Raw captions as users have them: capitals and punctuation the training loader cleaned away (a "." the
# tokenizer's vocabulary never saw was [UNK] in the export before it carried the cleaning).
CAPTIONS = [
    "A small yellow square in the top left, on a gray background.",
    "Three shapes on gray: a large green circle in the bottom right; a RED diamond!",
    "There is a big red diamond -- at the bottom?",
]


@pytest.fixture(scope="module")
def export(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = ALBEF(model_preset("tiny", vocab_size=len(tokenizer), attention="eager")).eval()
    out = tmp_path_factory.mktemp("export")
    save_export(model, tokenizer, out)
    return model.double(), out


def images(size: int) -> list[bytes]:
    """A PNG, a grayscale PNG, a JPEG under twice the input size, one over four times it (real photos at the
    tiny preset's 64 px: the training loader decodes those at a DCT draft reduction, evaluation whole) and a
    CMYK JPEG (PIL converts it to RGB)."""
    ramp = ramp_with_marker(3 * size // 2, size + 7, (10, 12, 30, 20))
    photo = ramp_with_marker(5 * size, 4 * size + 3, (40, 30, 90, 70))
    return [encoded(ramp, "PNG"), encoded(ramp.convert("L"), "PNG"), encoded(ramp, "JPEG", quality=85),
            encoded(photo, "JPEG", quality=85), encoded(ramp.convert("CMYK"), "JPEG", quality=85)]


def clip_normalised(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float64 (x / 255 - mean) / std."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (pixels / 255 - mean) / std


def test_the_image_processor_resizes_and_normalises_like_our_evaluation(export):
    model, out = export
    size = model.config.image_size
    processor = AutoImageProcessor.from_pretrained(out / "image_encoder")
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    for data in images(size):
        theirs = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0].double()
        assert theirs.shape == (3, size, size)
        ours = eval_image(data, size=size)  # uint8, the pixels our evaluation feeds the model
        # back to 0..255: the same resized pixels exactly (a bilinear resize fails this)
        assert torch.equal(((theirs * std + mean) * 255).round().to(torch.uint8), ours)
        torch.testing.assert_close(theirs, clip_normalised(ours), rtol=0, atol=1e-6)  # float32 rounding


def test_the_exported_tokenizer_cleans_raw_captions_as_training_did(export, tokenizer):
    _, out = export
    for folder in ("tokenizer", "text_encoder"):
        exported = AutoTokenizer.from_pretrained(out / folder)
        theirs = exported(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
        ours = tokenize(tokenizer, [clean_caption(c) for c in CAPTIONS], MAX_LEN)
        assert torch.equal(theirs["input_ids"], ours["input_ids"]), folder
        assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
        assert exported.unk_token_id not in theirs["input_ids"]  # every word of these captions is in the vocabulary
        assert exported.model_max_length == MAX_LEN  # the tiny preset's positions


def test_auto_classes_from_the_export_give_our_features(export, tokenizer):
    model, out = export
    size = model.config.image_size
    processor = AutoImageProcessor.from_pretrained(out / "image_encoder")
    exported_tokenizer = AutoTokenizer.from_pretrained(out / "text_encoder")
    vit = AutoModel.from_pretrained(out / "image_encoder").eval().double()
    bert = AutoModel.from_pretrained(out / "text_encoder").eval().double()
    pil = [Image.open(io.BytesIO(data)) for data in images(size)]
    pixels = processor(pil, return_tensors="pt")["pixel_values"].double()
    text = exported_tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    ours_pixels = clip_normalised(torch.stack([eval_image(data, size=size) for data in images(size)]))
    ours_text = tokenize(tokenizer, [clean_caption(c) for c in CAPTIONS], MAX_LEN)
    with torch.no_grad():
        image_embeds, image_feature = model.encode_image(ours_pixels)
        text_embeds, _ = model.encode_text(ours_text["input_ids"], ours_text["attention_mask"])
        hf_image = vit(pixels).last_hidden_state
        hf_text = bert(text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
    # float64 models; what is left is the processors' float32 pixels (one rounding each)
    torch.testing.assert_close(hf_image, image_embeds, rtol=0, atol=1e-5)
    valid = text["attention_mask"].bool()
    torch.testing.assert_close(hf_text[valid], text_embeds[valid], rtol=0, atol=1e-5)
    # and the ITC feature follows from the exported [CLS] with the model's projection
    from_hf = torch.nn.functional.normalize(model.vision_proj(hf_image[:, 0]), dim=-1)
    torch.testing.assert_close(from_hf, image_feature, rtol=0, atol=1e-5)


def test_a_conv_stem_export_reloads_whole_and_writes_no_hf_image_encoder(tokenizer, tmp_path):
    from pretrain.train.export import load_exported

    torch.manual_seed(0)
    model = ALBEF(model_preset("tiny", vocab_size=len(tokenizer), patch_stem="conv")).eval()
    save_export(model, tokenizer, tmp_path)
    assert not (tmp_path / "image_encoder").exists()  # HF's ViTModel has no conv stem
    assert type(AutoModel.from_pretrained(tmp_path / "text_encoder")).__name__ == "BertModel"
    loaded = load_exported(tmp_path).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels)[1], model.encode_image(pixels)[1])
