"""`python -m pretrain.evaluate`: zero-shot image-text retrieval of a trained model, written to eval.json.

--checkpoint takes a run's export directory (model.safetensors + model_config.json), or a DeepSpeed
checkpoint directory (the run's checkpoints/, consolidated to fp32 on the fly; the model config is read
from the run directory beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from data_pipeline import DataError, load_eval_data, load_tokenizer
from pretrain.eval.retrieval import evaluate_retrieval, format_table, non_finite_warning, save_eval_json
from pretrain.model import ALBEF, ModelConfig
from pretrain.train.export import CONFIG_FILE, WEIGHTS_FILE, load_exported, model_from_zero_checkpoint


def load_model(checkpoint: Path) -> ALBEF:
    if (checkpoint / WEIGHTS_FILE).is_file():
        return load_exported(checkpoint)
    if (checkpoint / "latest").is_file():
        config_file = checkpoint.parent / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} is missing: evaluate the run's export/ directory instead")
        config = ModelConfig(**json.loads(config_file.read_text()))
        return model_from_zero_checkpoint(checkpoint, config)
    raise FileNotFoundError(f"{checkpoint} holds neither {WEIGHTS_FILE} nor a DeepSpeed 'latest' file: pass a "
                            "run's export/ or checkpoints/ directory")


def run_max_len(checkpoint: Path) -> int:
    """The text length the run trained with (data.max_len of its recipe.yaml beside the checkpoint), else 32."""
    recipe_file = checkpoint.parent / "recipe.yaml"
    return yaml.safe_load(recipe_file.read_text())["data"]["max_len"] if recipe_file.is_file() else 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="run export/ or checkpoints/ directory")
    parser.add_argument("--data", required=True, help="validation shards (directory with manifest.json or pattern)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer name or directory (default: the export's tokenizer/)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="caption length in tokens (default: data.max_len of the run's recipe.yaml, else 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--itm-rerank-k", type=int, default=0,
                        help="re-rank the top k by the ITM head (ALBEF: 256 for COCO 5k, 128 for Flickr30k 1k)")
    parser.add_argument("--out", type=Path, default=None, help="where to write eval.json (default: beside checkpoint)")
    args = parser.parse_args(argv)
    if args.max_len is None:
        args.max_len = run_max_len(args.checkpoint)
    try:
        model = load_model(args.checkpoint)
        tokenizer = load_tokenizer(args.tokenizer or str(args.checkpoint / "tokenizer"))
        data = load_eval_data(args.data, tokenizer, image_size=model.config.image_size, max_len=args.max_len)
    except (FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics, _ = evaluate_retrieval(model.to(device), data, args.batch_size, args.itm_rerank_k, device)
    out = args.out or args.checkpoint / "eval.json"
    save_eval_json(out, metrics)
    print(format_table(metrics))
    warning = non_finite_warning(metrics)
    if warning:
        print(warning, file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
