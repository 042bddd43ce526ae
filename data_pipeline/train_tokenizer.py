"""Train a lowercase WordPiece tokenizer on the training captions of a shard directory.

    python -m data_pipeline.train_tokenizer --shards data/shards/synthetic/train --out data/tokenizer

The result loads with AutoTokenizer.from_pretrained(OUT): [PAD]=0, [UNK], [CLS], [SEP], [MASK];
it adds [CLS] ... [SEP] around every text. Captions are cleaned exactly as the loader cleans them.
"""

import argparse
import json
import sys
from collections.abc import Iterator

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


def train_tokenizer(captions: Iterator[str], out: str, vocab_size: int = 8000, min_frequency: int = 2) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
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
