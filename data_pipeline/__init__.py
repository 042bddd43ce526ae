"""Everything before a batch exists: sources, shard writing, the streaming loader, text and masking."""

from data_pipeline.errors import DataError
from data_pipeline.eval_data import EvalData, load_eval_data
from data_pipeline.loader import TrainLoader, make_train_loader
from data_pipeline.shards import Shard, ShardSet, ShardSource, check_shards, resolve_shards
from data_pipeline.text import clean_caption
from data_pipeline.tokenizer import load_tokenizer

__all__ = [
    "DataError",
    "EvalData",
    "Shard",
    "ShardSet",
    "ShardSource",
    "TrainLoader",
    "check_shards",
    "clean_caption",
    "load_eval_data",
    "load_tokenizer",
    "make_train_loader",
    "resolve_shards",
]
