"""`python -m pretrain.finetune`: fine-tune an exported pretraining run on retrieval or VQA, fully or with LoRA,
adapters or prefixes, on the pretraining app's DeepSpeed engine and loop.

Launch like pretraining: `ENTRY=finetune bash launch/pretrain.sh --recipe vqa_synthetic [flags]`, or
`deepspeed [launcher flags] launch/pretrain.sh ...` with ENTRY=finetune in the environment.
"""

from __future__ import annotations

import argparse

from pretrain.finetune.preflight import prepare
from pretrain.finetune.recipe import FinetuneRecipe
from pretrain.train import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.parse_args(argv, FinetuneRecipe, prog="python -m pretrain.finetune",
                          description="Fine-tuning of a pretrained ALBEF on retrieval or VQA (full, LoRA, adapter, "
                                      "prefix).")


def main(argv: list[str] | None = None) -> int:
    return cli.run_app(parse_args(argv), prepare)
