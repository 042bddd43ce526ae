"""Run by the DeepSpeed launcher from tests/train/test_e2e.py: build the engine as training does (zero.Init,
initialisation, pretrained HF weights copied into partitioned parameters), then gather every pretrained
parameter and report how far it is from the Hugging Face value, and each rank's training seed. Prints one
JSON line on rank 0."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from pretrain.model import pretrained_state_dict
from pretrain.train.cli import parse_args
from pretrain.train.engine import build_engine, start_distributed
from pretrain.train.preflight import prepare


def main() -> None:
    setup = prepare(parse_args(sys.argv[1:]))
    start_distributed(setup.recipe.dist)
    try:
        engine = build_engine(setup)
        expected = pretrained_state_dict(setup.model_config, vit=setup.recipe.model.vit, bert=setup.recipe.model.bert)
        params = dict(engine.module.named_parameters())
        worst, partitioned = 0.0, 0
        for name, value in expected.items():
            param = params[name]
            partitioned += int(param.ds_tensor.numel() < param.ds_numel)
            with deepspeed.zero.GatheredParameters([param]):
                worst = max(worst, (param.detach().float() - value.float()).abs().max().item())
        seeds = [None] * dist.get_world_size()
        dist.all_gather_object(seeds, torch.initial_seed())
        if dist.get_rank() == 0:
            print(json.dumps({"loaded": len(expected), "partitioned": partitioned, "max_abs_diff": worst,
                              "names": sorted(expected), "rank_seeds": seeds}))
    finally:
        dist.destroy_process_group()  # as pretrain.train.loop: gloo's threads must stop before teardown


if __name__ == "__main__":
    main()
