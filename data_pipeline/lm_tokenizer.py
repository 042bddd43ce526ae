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


def shard_texts(spec: str) -> list[str]:
    """Every caption of the shard set, as written (case and punctuation kept)."""
    from collections import Counter

    from data_pipeline.errors import DataError
    from data_pipeline.samples import parse_sample, read_samples
    from data_pipeline.shards import resolve_shards

    skipped, texts = Counter(), []
    for raw in read_samples([s.path for s in resolve_shards(spec).shards], skipped):
        parsed = parse_sample(raw, skipped)
        texts += parsed.captions if parsed else []
    if not texts:
        raise DataError(f"{spec} holds no caption (skipped: {dict(skipped)}); build it with make shards")
    return texts


def main(argv: list[str] | None = None) -> int:
    """`python -m data_pipeline.lm_tokenizer --shards data/shards/synthetic/train --out data/caption-lm-tokenizer`:
    the tokenizer `python -m pretrain.caption_lm` builds its LM for (trained once, before any rank starts)."""
    import argparse
    import sys

    from data_pipeline.errors import DataError

    parser = argparse.ArgumentParser(prog="python -m data_pipeline.lm_tokenizer", description=main.__doc__)
    parser.add_argument("--shards", default="data/shards/synthetic/train", help="caption shards (train split)")
    parser.add_argument("--out", default="data/caption-lm-tokenizer", help="output directory")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary size at most (1000)")
    args = parser.parse_args(argv)
    try:
        texts = shard_texts(args.shards)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    tokenizer = train_lm_tokenizer(texts, args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"LM tokenizer: {len(tokenizer)} tokens from {len(texts)} captions -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
