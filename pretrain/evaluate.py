"""`python -m pretrain.evaluate`: zero-shot image-text retrieval of a trained model, written to eval.json.

--checkpoint takes a run's export directory (model.safetensors + model_config.json), or a DeepSpeed
checkpoint directory (the run's checkpoints/, consolidated to fp32 on the fly; the model config is read
from the run directory beside it). What is not given on the command line comes from the run directory's
recipe.yaml, as the run evaluated: validation shards, tokenizer (an export's or the run's own first),
caption length, ITM re-ranking and batch size. eval.json goes into the run directory (the current one
when the checkpoint has no run beside it), never into the exported model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_pipeline import DataError, load_eval_data, load_tokenizer
from pretrain.eval.retrieval import evaluate_retrieval, format_table, non_finite_warning, save_eval_json
from pretrain.model import ALBEF, ModelConfig
from pretrain.train.export import CONFIG_FILE, WEIGHTS_FILE, load_exported, model_from_zero_checkpoint
from pretrain.train.recipe import Recipe, RecipeError, load_recipe

RUN_RECIPE = "recipe.yaml"


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


def run_recipe(checkpoint: Path) -> Recipe | None:
    """The recipe of the run that `checkpoint` (its export/ or checkpoints/) belongs to, if it has one."""
    path = checkpoint.parent / RUN_RECIPE
    return load_recipe(str(path)) if path.is_file() else None


def run_origin(checkpoint: Path, recipe: Recipe) -> Path | None:
    """The directory the run started in, which the recipe's relative paths are relative to."""
    run_path, run_dir = checkpoint.resolve().parent, recipe.run_path
    if run_dir.is_absolute() or len(run_path.parents) <= len(run_dir.parts) - 1:
        return None
    return run_path.parents[len(run_dir.parts) - 1]


def from_run(value: str, origin: Path | None) -> str:
    """A relative path of the run's recipe: as given where it exists from here, else from where the run started."""
    if origin is None or Path(value).is_absolute() or Path(value).exists() or not (origin / value).exists():
        return value
    return str(origin / value)


def run_tokenizer(checkpoint: Path, given: str | None, recipe: Recipe | None):
    """--tokenizer, else the export's own, else the run's copy, else the one the run's recipe names (runs
    written before the run directory kept a copy; its folder may have been remade since)."""
    if given:
        return load_tokenizer(given)
    for own in (checkpoint / "tokenizer", checkpoint.parent / "tokenizer"):
        if own.is_dir():
            return load_tokenizer(str(own))
    if recipe is None:
        raise DataError(f"{checkpoint} has no tokenizer/ and no {RUN_RECIPE} beside it: pass --tokenizer with the "
                        "name or directory the model was trained with")
    try:
        return load_tokenizer(from_run(recipe.data.tokenizer, run_origin(checkpoint, recipe)))
    except DataError as err:
        reason = type(err.__cause__).__name__ if err.__cause__ else err
        raise DataError(f"the tokenizer {recipe.data.tokenizer!r} that {checkpoint.parent / RUN_RECIPE} names does "
                        f"not load ({reason}) from here or from where the run started: pass --tokenizer") from err


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="run export/ or checkpoints/ directory")
    parser.add_argument("--data", default=None, help="validation shards (directory with manifest.json or pattern; "
                        "default: data.val of the run's recipe.yaml)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: the export's "
                        "tokenizer/, else the run's tokenizer/, else data.tokenizer of the run's recipe.yaml)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="caption length in tokens (default: data.max_len of the run's recipe.yaml, else 32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: eval.batch_size of the run's recipe.yaml, else 64")
    parser.add_argument("--itm-rerank-k", type=int, default=None,
                        help="re-rank the top k by the ITM head (ALBEF: 256 for COCO 5k, 128 for Flickr30k 1k; "
                        "default: eval.itm_rerank_k of the run's recipe.yaml, else 0)")
    parser.add_argument("--out", type=Path, default=None, help="eval.json's path, or a directory to write it in "
                        "(default: the run directory the checkpoint is in, else the current directory)")
    return parser.parse_args(argv)


def run_defaults(recipe: Recipe | None, origin: Path | None) -> dict:
    """The evaluation settings of the run (or the built-in defaults when there is no run)."""
    if recipe is None:
        return {"data": None, "max_len": 32, "batch_size": 64, "itm_rerank_k": 0}
    return {"data": recipe.data.val and from_run(recipe.data.val, origin), "max_len": recipe.data.max_len,
            "batch_size": recipe.eval.batch_size, "itm_rerank_k": recipe.eval.itm_rerank_k}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = run_recipe(args.checkpoint)
        origin = run_origin(args.checkpoint, recipe) if recipe is not None else None
        for name, value in run_defaults(recipe, origin).items():  # evaluate as the run did, unless told otherwise
            if getattr(args, name) is None:
                setattr(args, name, value)
        if not args.data:
            raise DataError(f"no validation data: {args.checkpoint} has no {RUN_RECIPE} with data.val beside it; "
                            "pass --data")
        model = load_model(args.checkpoint)
        tokenizer = run_tokenizer(args.checkpoint, args.tokenizer, recipe)
        if len(tokenizer) != model.config.vocab_size:
            raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                            f"{model.config.vocab_size}: pass --tokenizer with the one the model was trained with")
        data = load_eval_data(args.data, tokenizer, image_size=model.config.image_size, max_len=args.max_len)
    except (FileNotFoundError, DataError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics, _ = evaluate_retrieval(model.to(device), data, args.batch_size, args.itm_rerank_k, device)
    out = args.out or (args.checkpoint.parent if recipe is not None else Path.cwd())
    out = out / "eval.json" if out.is_dir() else out
    save_eval_json(out, metrics)
    print(format_table(metrics))
    warning = non_finite_warning(metrics)
    if warning:
        print(warning, file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
