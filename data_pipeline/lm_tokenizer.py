"""A byte-level BPE tokenizer for a causal LM, trained on caption text (the embedded default LM's).

Byte-level, so any text round-trips (captions keep their case and punctuation, as the references do);
specials <s>, </s>, <pad>, <unk> and the image placeholder <image>; no chat template (the plain format of
data_pipeline.instructions applies).
"""

from __future__ import annotations

from collections.abc import Iterable

from data_pipeline.instructions import IMAGE_TOKEN

LM_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]


def train_lm_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A `PreTrainedTokenizerFast` (save it with save_pretrained) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LM_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", additional_special_tokens=[IMAGE_TOKEN])
