"""Train a lowercase WordPiece tokenizer on the training captions of a shard directory.

    python -m data_pipeline.train_tokenizer --shards data/shards/synthetic/train --out data/tokenizer

The result loads with AutoTokenizer.from_pretrained(OUT): [PAD]=0, [UNK], [CLS], [SEP], [MASK];
it adds [CLS] ... [SEP] around every text. Captions are cleaned exactly as the loader cleans them.
"""

import argparse
import json
import sys
from collections.abc import Iterable, Iterator

from data_pipeline.errors import DataError
from data_pipeline.shards import resolve_shards
from data_pipeline.text import clean_caption

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def shard_captions(spec: str) -> Iterator[str]:
    """Every caption of every sample (read from the .json members only)."""
    import webdataset as wds

    urls = [shard.path for source in resolve_shards(spec).sources for shard in source.shards]
    for sample in wds.tariterators.tarfile_samples(
        [{"url": url} for url in urls], select_files=lambda name: name.endswith(".json")
    ):
        for caption in json.loads(sample["json"]).get("captions", []):
            yield clean_caption(caption)


def continuation_tokens(tokenizer, captions: list[str], prefix: str = "##") -> list[str]:
    """Every character that follows another inside a word, with the WordPiece prefix, in code-point order."""
    chars = {char for caption in captions
             for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(caption))
             for char in word[1:]}
    return [prefix + char for char in sorted(chars)]


def train_tokenizer(captions: Iterable[str], out: str, vocab_size: int = 8000, min_frequency: int = 2) -> None:
    """Train and save; the same captions give the same bytes, in any order.

    The `tokenizers` trainer numbers the "##c" continuation tokens in the hash order of the words it counted, and
    breaks ties between equally frequent merges by token id, so two trainings on the same captions can differ in
    ids and in tokens (huggingface/tokenizers#1794). We number those tokens ourselves: the trainer gets them as
    extra special tokens, in code-point order, right after the real special tokens, so every id it compares is
    fixed; the saved tokenizer is rebuilt from the trained vocabulary with only the real special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    def empty(model) -> Tokenizer:
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer

    captions = list(captions)
    trained = empty(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=SPECIAL_TOKENS + continuation_tokens(trained, captions),
    )  # fmt: skip
    trained.train_from_iterator(captions, trainer=trainer)
    tokenizer = empty(models.WordPiece(trained.get_vocab(with_added_tokens=False), unk_token="[UNK]"))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    BertTokenizerFast(
        tokenizer_object=tokenizer,
        do_lower_case=True,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/shards/synthetic/train", help="training shards (spec or dir)")
    parser.add_argument("--out", default="data/tokenizer", help="output directory")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size at most")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged token")
    args = parser.parse_args(argv)
    try:
        train_tokenizer(shard_captions(args.shards), args.out, args.vocab_size, args.min_frequency)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"tokenizer saved to {args.out}")


if __name__ == "__main__":
    main()
