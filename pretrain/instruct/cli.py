"""`python -m pretrain.instruct --recipe instruct_stage1_synthetic`: the two instruction-tuning stages of a
multimodal LM on the pretraining app's DeepSpeed engine, loop, checkpoints and launcher."""

from __future__ import annotations

import argparse

from pretrain.instruct.preflight import prepare
from pretrain.instruct.recipe import InstructRecipe
from pretrain.train import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.parse_args(argv, InstructRecipe, prog="python -m pretrain.instruct",
                          description="Instruction tuning of a multimodal LM: stage align (projector only) or "
                                      "instruct (projector + LM, full or LoRA).")


def main(argv: list[str] | None = None) -> int:
    return cli.run_app(parse_args(argv), prepare)
