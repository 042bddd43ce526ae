"""The training application: recipe and preflight, the DeepSpeed engine, the loop, checkpoints, metrics,
export; fault handling in `reliability/`. `python -m pretrain.train` runs `cli.main`."""
