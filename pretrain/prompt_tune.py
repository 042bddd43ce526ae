"""`python -m pretrain.prompt_tune`: few-shot prompt learning on a frozen model, each method against the others.

For k shots per class (--shots) and each seed (--seeds), on the held-out --test set: hand prompts (the first
template alone, and all templates ensembled: the zero-shot baseline), learned context before the label words
(CoOp; shared by all classes, and one per class; held near the hand ensemble by --context-anchor, KgCoOp's
regulariser), learned label embeddings (initialised from the hand ensemble) and a linear probe on the image
features. Writes prompt_tune.json (mean and sd over seeds),
learning_curve.png, TensorBoard scalars and picture, and the learned contexts of the largest k and the first
seed (context_shared.safetensors, context_class.safetensors) for `python -m pretrain.zeroshot --prompt`.

    python -m pretrain.prompt_tune --checkpoint runs/tiny-synthetic/export --train data/zeroshot/shape/train \\
        --test data/zeroshot/shape/test --templates data/zeroshot/shape/templates.txt \\
        --verbalizer data/zeroshot/shape/verbalizer.yaml --out runs/prompting/shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from data_pipeline import DataError, clean_caption
from data_pipeline.labelled_images import few_shot_rows, read_labelled_images
from pretrain.eval.classification import ImageFeatures, encode_images
from pretrain.eval.few_shot import (
    ContextClassifier,
    linear_probe,
    logit_scale,
    top1,
    train_context,
    train_label_embeddings,
)
from pretrain.eval.picture import curve_picture
from pretrain.eval.prompts import BUILTIN_TEMPLATES, load_templates, load_verbalizer
from pretrain.model import ALBEF
from pretrain.model.prompting import LearnedContext, class_embeddings
from pretrain.train.recipe import RecipeError
from pretrain.train.reliability.files import replace_text
from pretrain.zeroshot import hand_prompts, load_run

METHODS = {
    "hand_single": "hand prompt (first template)",
    "hand_ensemble": "hand prompts (ensemble)",
    "context_shared": "learned context, shared",
    "context_class": "learned context, per class",
    "label_embeddings": "learned label embeddings",
    "linear_probe": "linear probe",
}


def context_init(model: ALBEF, tokenizer, phrase: str, length: int, seed: int) -> torch.Tensor:
    """[length, D]: the word embeddings of the phrase's last `length` tokens, right-aligned next to the label
    words; slots the phrase does not fill drawn from N(0, the embedding table's sd)."""
    table = model.text_encoder.embeddings.word_embeddings.weight.detach()
    ids = tokenizer(clean_caption(phrase), add_special_tokens=False)["input_ids"][-length:] if phrase.strip() else []
    random = torch.randn(length - len(ids), table.shape[1], generator=torch.Generator().manual_seed(seed))
    return torch.cat([random * table.std(), table[ids]])


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of non-negative integers")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.prompt_tune", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="run export/ or checkpoints/ directory")
    parser.add_argument("--train", required=True, help="the labelled pool the shots are drawn from (as --test)")
    parser.add_argument("--test", required=True,
                        help="held-out images: ImageFolder directory, or a `datasets` save_to_disk folder or hub name")
    parser.add_argument("--train-split", default="train", help="split of a `datasets` --train")
    parser.add_argument("--test-split", default="test", help="split of a `datasets` --test")
    parser.add_argument("--image-column", default="image", help="image column of a `datasets` set")
    parser.add_argument("--label-column", default="label", help="ClassLabel column of a `datasets` set")
    parser.add_argument("--templates", default="photo",
                        help=f"template file or built-in set ({', '.join(BUILTIN_TEMPLATES)})")
    parser.add_argument("--verbalizer", type=Path, default=None, help="YAML/JSON mapping class -> label word(s)")
    parser.add_argument("--shots", type=parse_ints, default=[1, 2, 4, 8, 16], help="shots per class, e.g. 1,2,4")
    parser.add_argument("--seeds", type=parse_ints, default=[0, 1, 2], help="seeds: shot draws and context init")
    parser.add_argument("--context-length", type=int, default=4, help="M learned context vectors")
    parser.add_argument("--context-init", default=None,
                        help="phrase the context starts from (default: the first template's words before '{}')")
    parser.add_argument("--context-anchor", type=float, default=8.0,
                        help="weight of the learned class embeddings' squared distance from the hand ensemble's "
                             "(KgCoOp; its paper's 8; 0: plain CoOp)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per learned prompt")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the learned prompts")
    parser.add_argument("--probe-l2", type=float, default=1e-3, help="L2 penalty of the linear probe's weights")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: as pretrain.evaluate finds it)")
    parser.add_argument("--max-len", type=int, default=None, help="prompt length in tokens (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per encoder batch")
    parser.add_argument("--out", required=True, type=Path, help="directory for prompt_tune.json, the plot, prompts")
    parser.add_argument("--run-dir", type=Path, default=None, help="TensorBoard directory (default: --out)")
    args = parser.parse_args(argv)
    try:
        columns = {"image_column": args.image_column, "label_column": args.label_column}
        pool = read_labelled_images(args.train, split=args.train_split, **columns)
        test = read_labelled_images(args.test, split=args.test_split, **columns)
        if pool.classes != test.classes:
            raise DataError(f"--train has classes {pool.classes}, --test {test.classes}; give sets of the same classes")
        for shots in args.shots:
            few_shot_rows(pool.labels, pool.classes, shots, seed=0)  # too few images for some k: say so before any work
        templates, verbalizer = load_templates(args.templates), load_verbalizer(args.verbalizer, pool.classes)
        model, tokenizer, max_len = load_run(args.checkpoint, args.tokenizer, args.max_len)
        model.requires_grad_(False)
    except (FileNotFoundError, DataError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    phrase = args.context_init if args.context_init is not None else templates[0].split("{}")[0]
    device = torch.device("cpu")
    bench = FewShot(args, model, tokenizer, pool.classes, verbalizer, max_len, phrase, logit_scale(model),
                    encode_images(model, pool, args.batch_size, device, desc="train images"),
                    encode_images(model, test, args.batch_size, device, desc="test images"))
    with single_thread():
        results = bench.run(templates)
    write_outputs(args, results)
    return 0


@contextmanager
def single_thread():
    """Many tiny ops: one thread skips the threads' hand-off (a step ran 10x faster so, measured on a loaded
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class FewShot:
    """One task's few-shot comparison on cached image features: the pool's (shots are rows of it) and the test set's."""

    args: argparse.Namespace
    model: ALBEF
    tokenizer: object
    classes: list[str]
    verbalizer: dict[str, list[str]]
    max_len: int
    phrase: str
    scale: float
    pool: ImageFeatures
    test: ImageFeatures

    def accuracy(self, classes: torch.Tensor) -> float:
        """Test top-1 of class embeddings [C, E]."""
        return top1(self.test.feats @ classes.T, self.test.labels)

    def hand(self, templates: list[str]) -> torch.Tensor:
        prompts = hand_prompts(self.model, self.tokenizer, templates, self.verbalizer, self.classes, self.max_len,
                               torch.device("cpu"))
        return class_embeddings(prompts.feats, prompts.owner, len(self.classes))

    def context(self, per_class: int | None, rows: list[int], seed: int,
                anchor: torch.Tensor) -> tuple[LearnedContext, float, list[float]]:
        """Learned context trained on the pool's `rows`: (the context, test top-1, training losses)."""
        torch.manual_seed(seed)
        init = context_init(self.model, self.tokenizer, self.phrase, self.args.context_length, seed)
        context = LearnedContext(init, per_class)
        classifier = ContextClassifier(self.model, self.tokenizer, context, self.verbalizer, self.classes,
                                       self.max_len)
        losses = train_context(classifier, self.pool.feats[rows], self.pool.labels[rows], self.scale,
                               self.args.steps, self.args.lr, anchor, self.args.context_anchor)
        with torch.no_grad():
            return context, self.accuracy(classifier.class_embeddings()), losses

    def run(self, templates: list[str]) -> dict:
        args, ensemble = self.args, self.hand(templates)
        zero_shot = {"hand_single": self.accuracy(self.hand(templates[:1])), "hand_ensemble": self.accuracy(ensemble)}
        runs: dict[str, dict[int, list[float]]] = {method: {k: [] for k in args.shots} for method in METHODS}
        losses: dict[str, dict[int, list[list[float]]]] = {m: {k: [] for k in args.shots} for m in METHODS}
        saved = {}
        for k in args.shots:
            for seed in args.seeds:
                rows = few_shot_rows(self.pool.labels, self.classes, k, seed)
                feats, labels = self.pool.feats[rows], self.pool.labels[rows]
                for method, accuracy in zero_shot.items():
                    runs[method][k].append(accuracy)
                for method, per_class in (("context_shared", None), ("context_class", len(self.classes))):
                    context, accuracy, loss = self.context(per_class, rows, seed, ensemble)
                    runs[method][k].append(accuracy)
                    losses[method][k].append(loss)
                    if k == max(args.shots) and seed == args.seeds[0]:
                        saved[method] = (context, accuracy)
                tuned, loss = train_label_embeddings(ensemble, feats, labels, self.scale, args.steps, args.lr)
                runs["label_embeddings"][k].append(self.accuracy(tuned))
                losses["label_embeddings"][k].append(loss)
                probe = linear_probe(feats, labels, len(self.classes), args.probe_l2)
                runs["linear_probe"][k].append(top1(probe(self.test.feats), self.test.labels))
                print(f"k={k} seed={seed}: " + "  ".join(f"{m} {runs[m][k][-1]:.3f}" for m in METHODS), flush=True)
        return {"classes": self.classes, "label_words": self.verbalizer, "templates": templates,
                "context_init": self.phrase, "num_train_pool": len(self.pool.labels),
                "num_test": len(self.test.labels), "shots": args.shots, "seeds": args.seeds,
                "settings": {"context_length": args.context_length,
                             "context_anchor": args.context_anchor, "steps": args.steps, "lr": args.lr,
                             "probe_l2": args.probe_l2, "logit_scale": self.scale},
                "chance": 1 / len(self.classes),
                "methods": {m: {str(k): summary(v) for k, v in per_k.items()} for m, per_k in runs.items()},
                "final_train_loss": {m: {str(k): statistics.fmean(run[-1] for run in v) for k, v in per_k.items()}
                                     for m, per_k in losses.items() if any(per_k.values())},
                "_saved": saved}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def write_outputs(args: argparse.Namespace, results: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    saved = results.pop("_saved")
    results["prompt_files"] = {}
    for method, (context, accuracy) in saved.items():
        path = args.out / f"{method}.safetensors"
        context.save(path, {"classes": results["classes"], "label_words": results["label_words"],
                            "method": method, "shots": max(args.shots), "seed": args.seeds[0],
                            "checkpoint": str(args.checkpoint), "test_top1": accuracy})
        results["prompt_files"][method] = str(path)
    replace_text(args.out / "prompt_tune.json", json.dumps(results, indent=2))
    curves = {METHODS[m]: [(int(k), s["mean"], s["sd"]) for k, s in per_k.items()]
              for m, per_k in results["methods"].items()}
    picture = curve_picture(curves, f"top-1 on {results['num_test']} test images, {len(results['classes'])} "
                                    f"classes (mean +- sd over {len(args.seeds)} seeds)")
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(args.out / "learning_curve.png")
    with SummaryWriter(str(args.run_dir or args.out)) as writer:
        for method, per_k in results["methods"].items():
            for k, stats in per_k.items():
                writer.add_scalar(f"prompt_tune/{method}/top1", stats["mean"], int(k))
        writer.add_image("prompt_tune/learning_curve", picture)
    print(format_table(results))
    print(f"wrote {args.out / 'prompt_tune.json'}, {args.out / 'learning_curve.png'} and "
          f"{', '.join(results['prompt_files'].values())}")


def format_table(results: dict) -> str:
    """Methods as rows, shots as columns, mean +- sd of top-1."""
    shots = [str(k) for k in results["shots"]]
    lines = [f"{'top-1 (mean +- sd)':28}" + "".join(f"{'k=' + k:>14}" for k in shots)]
    for method, per_k in results["methods"].items():
        lines.append(f"{method:28}" + "".join(f"{per_k[k]['mean']:>8.3f} +-{per_k[k]['sd']:.3f}" for k in shots))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
