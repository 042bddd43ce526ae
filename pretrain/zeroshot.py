"""`python -m pretrain.zeroshot`: zero-shot image classification with prompt templates and a verbalizer.

Each class is written as text (every template filled with every label word of the class) and scored by ITC
against each image, or with --scorer words by the caption-word head's probability of its label words (a model
trained with model.caption_words_weight); --itm-rerank-k re-orders each image's top k classes by the ITM
head. With --prompt, a learned context from `python -m pretrain.prompt_tune` takes the templates' place.
Writes zeroshot.json and confusion.png to --out, and with --run-dir both to that run's TensorBoard too.

    python -m pretrain.zeroshot --checkpoint runs/tiny-synthetic/export --data data/zeroshot/shape/test \\
        --templates data/zeroshot/shape/templates.txt --verbalizer data/zeroshot/shape/verbalizer.yaml --out out/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from data_pipeline import DataError
from data_pipeline.labelled_images import LabelledImages, read_labelled_images
from pretrain.eval.classification import (
    ImageFeatures,
    Prompts,
    class_scores,
    classification_metrics,
    encode_context_prompts,
    encode_images,
    encode_prompts,
    itm_rerank,
    word_scores,
)
from pretrain.eval.picture import confusion_picture
from pretrain.eval.prompts import BUILTIN_TEMPLATES, class_prompts, load_templates, load_verbalizer
from pretrain.evaluate import load_model, run_recipe, run_tokenizer
from pretrain.model import ALBEF
from pretrain.model.prompting import LearnedContext
from pretrain.train.recipe import RecipeError
from pretrain.train.reliability.files import replace_text


def load_run(checkpoint: Path, tokenizer: str | None, max_len: int | None) -> tuple[ALBEF, object, int]:
    """The model, its tokenizer and the prompt length, found as `pretrain.evaluate` finds them."""
    recipe = run_recipe(checkpoint)
    model = load_model(checkpoint).eval()
    tokenizer = run_tokenizer(checkpoint, tokenizer, recipe)
    if len(tokenizer) != model.config.vocab_size:
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                        f"{model.config.vocab_size}: pass --tokenizer with the one the model was trained with")
    return model, tokenizer, max_len or (recipe.data.max_len if recipe is not None else 32)


def hand_prompts(model: ALBEF, tokenizer, templates: list[str], verbalizer: dict[str, list[str]],
                 classes: list[str], max_len: int, device: torch.device) -> Prompts:
    prompts, owner = class_prompts(templates, verbalizer, classes)
    return encode_prompts(model, tokenizer, prompts, owner, max_len, device)


def single_template_top1(model: ALBEF, tokenizer, images: ImageFeatures, templates: list[str],
                         verbalizer: dict[str, list[str]], classes: list[str], max_len: int,
                         device: torch.device) -> dict[str, float]:
    """Top-1 of each template alone, to compare with their ensemble."""
    return {template: classification_metrics(class_scores(images, hand_prompts(
        model, tokenizer, [template], verbalizer, classes, max_len, device), len(classes)), images.labels,
        classes)["top1"] for template in templates}


def load_prompt(path: Path, data: LabelledImages, verbalizer_file: Path | None):
    """The learned context and the label words to put after it (the prompt file's, unless a verbalizer is
    given); class-specific context must be for exactly the data's classes."""
    try:
        context, meta = LearnedContext.load(path)
    except (OSError, ValueError) as err:
        hint = "write it with `python -m pretrain.prompt_tune`"
        raise DataError(f"cannot read prompt file {path} ({err}); {hint}") from err
    if context.class_specific and meta["classes"] != data.classes:
        raise DataError(f"prompt file {path} has class-specific context for classes {meta['classes']}, the data has "
                        f"{data.classes}; use a shared-context prompt file or the data it was trained for")
    if verbalizer_file is not None:
        return context, load_verbalizer(verbalizer_file, data.classes)
    words = meta.get("label_words", {})
    missing = [name for name in data.classes if name not in words]
    if missing:
        raise DataError(f"prompt file {path} has no label words for classes {missing}; pass --verbalizer")
    return context, {name: words[name] for name in data.classes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.zeroshot", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="run export/ or checkpoints/ directory")
    parser.add_argument("--data", required=True,
                        help="ImageFolder directory, or a `datasets` save_to_disk folder or hub name")
    parser.add_argument("--split", default="test", help="split of a `datasets` set")
    parser.add_argument("--image-column", default="image", help="image column of a `datasets` set")
    parser.add_argument("--label-column", default="label", help="ClassLabel column of a `datasets` set")
    parser.add_argument("--templates", default="photo",
                        help=f"file with one template per line ('{{}}' marks the label word) or a built-in set: "
                             f"{', '.join(BUILTIN_TEMPLATES)}")
    parser.add_argument("--verbalizer", type=Path, default=None,
                        help="YAML/JSON mapping class -> label word(s) (default: the class name, _ as space)")
    parser.add_argument("--prompt", type=Path, default=None,
                        help="learned context file from `python -m pretrain.prompt_tune` (replaces --templates)")
    parser.add_argument("--scorer", choices=("itc", "words"), default="itc",
                        help="itc: image feature against each class's prompts; words: the caption-word head's "
                             "probability of each class's label words (templates unused)")
    parser.add_argument("--itm-rerank-k", type=int, default=0, help="re-rank each image's top k classes by ITM")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: as pretrain.evaluate finds it)")
    parser.add_argument("--max-len", type=int, default=None, help="prompt length in tokens (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", required=True, type=Path, help="directory for zeroshot.json and confusion.png")
    parser.add_argument("--run-dir", type=Path, default=None, help="also log to this TensorBoard directory")
    parser.add_argument("--tag", default=None, help="TensorBoard tag (default: the data's last two path parts)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.scorer == "words" and args.prompt is not None:
        print("error: --prompt holds learned context for ITC scoring; drop it or use --scorer itc", file=sys.stderr)
        return 2
    try:
        data = read_labelled_images(args.data, split=args.split, image_column=args.image_column,
                                    label_column=args.label_column)
        if args.prompt is not None:
            context, verbalizer = load_prompt(args.prompt, data, args.verbalizer)
            templates = None
        else:
            templates, verbalizer = load_templates(args.templates), load_verbalizer(args.verbalizer, data.classes)
        model, tokenizer, max_len = load_run(args.checkpoint, args.tokenizer, args.max_len)
        model.to(device)
    except (FileNotFoundError, DataError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    images = encode_images(model, data, args.batch_size, device, keep_tokens=args.itm_rerank_k > 0)
    prompts = None  # the word head reads no prompts; ITC scoring and ITM re-ranking do
    if args.scorer == "itc" or args.itm_rerank_k > 0:
        if templates is None:
            prompts = encode_context_prompts(model, tokenizer, context, verbalizer, data.classes, max_len, device)
        else:
            prompts = hand_prompts(model, tokenizer, templates, verbalizer, data.classes, max_len, device)
    if args.scorer == "words":
        try:
            scores = word_scores(model, tokenizer, images, verbalizer, data.classes, device)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        scores = class_scores(images, prompts, len(data.classes))
    if args.itm_rerank_k > 0:
        scores = itm_rerank(model, images, prompts, scores, args.itm_rerank_k, args.batch_size, device)
    metrics = classification_metrics(scores, images.labels, data.classes)
    metrics.update(classes=data.classes, templates=templates, prompt=str(args.prompt) if args.prompt else None,
                   label_words=verbalizer, scorer=args.scorer, itm_rerank_k=args.itm_rerank_k, skipped=data.skipped)
    if args.scorer == "itc" and templates is not None and len(templates) > 1:
        metrics["single_template_top1"] = single_template_top1(model, tokenizer, images, templates, verbalizer,
                                                               data.classes, max_len, device)
    write_outputs(args, metrics)
    return 0


def write_outputs(args: argparse.Namespace, metrics: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "/".join(Path(args.data).parts[-2:])
    picture = confusion_picture(metrics["confusion"], metrics["classes"],
                                f"{tag}: top-1 {metrics['top1']:.3f} (rows true, columns predicted)")
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(args.out / "confusion.png")
    replace_text(args.out / "zeroshot.json", json.dumps(metrics, indent=2))
    if args.run_dir is not None:
        with SummaryWriter(str(args.run_dir)) as writer:
            writer.add_scalar(f"zeroshot/{tag}/top1", metrics["top1"])
            writer.add_scalar(f"zeroshot/{tag}/top5", metrics["top5"])
            writer.add_image(f"zeroshot/{tag}/confusion", picture)
            writer.add_text(f"zeroshot/{tag}/prompts", json.dumps({"templates": metrics["templates"],
                                                                    "label_words": metrics["label_words"]}))
    print(f"zero-shot on {metrics['num_images']} images / {metrics['num_classes']} classes ({metrics['scorer']} "
          f"scores, ITM re-rank k={metrics['itm_rerank_k']}): top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}")
    for template, top1 in metrics.get("single_template_top1", {}).items():
        print(f"  template {template!r}: top-1 {top1:.3f}")
    print(f"wrote {args.out / 'zeroshot.json'} and {args.out / 'confusion.png'}")


if __name__ == "__main__":
    sys.exit(main())
