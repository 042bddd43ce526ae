"""Why a template ensemble wins or loses against single templates: per task, each template's test top-1, the
ensemble (CLIP's rule, as `pretrain.zeroshot` scores), the single template a user could pick without test
labels (the best on the few-shot pool), a mixture over templates (log-sum-exp at the model's temperature),
with `--itm` the same comparison when the ITM head orders every class (`pretrain.zeroshot --itm-rerank-k C`),
and the class embeddings' geometry (mean cosine between classes; the norm of each class's prompt mean before
it is normalised again). Prints one JSON object; docs/prompting.md has the tables.

    python -m benchmarks.bench_prompts --checkpoint runs/tiny-synthetic/export --data data/zeroshot
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from data_pipeline.labelled_images import read_labelled_images
from pretrain.eval.classification import class_scores, encode_images, itm_rerank
from pretrain.eval.prompts import load_templates, load_verbalizer
from pretrain.zeroshot import hand_prompts, load_run

TASKS = ("shape", "color", "count", "background")


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100 * (scores.argmax(1) == labels).double().mean().item(), 1)


def measure_itm(model, tokenizer, max_len: int, images, templates, verbalizer, classes: list[str]) -> dict:
    """Top-1 when the ITM head orders every class, each template alone and all of them (margins averaged)."""
    def itm_top1(chosen):
        prompts = hand_prompts(model, tokenizer, chosen, verbalizer, classes, max_len, torch.device("cpu"))
        scores = class_scores(images, prompts, len(classes))
        return top1(itm_rerank(model, images, prompts, scores, len(classes), 512, torch.device("cpu")), images.labels)

    single = {t: itm_top1([t]) for t in templates}
    return {"itm_ensemble_top1": itm_top1(templates), "itm_best_single_on_test": max(single.values()),
            "itm_mean_single": round(sum(single.values()) / len(single), 1), "itm_single_top1": single}


def measure_task(model, tokenizer, max_len: int, root: Path, task: str, itm: bool) -> dict:
    device = torch.device("cpu")
    test, pool = (read_labelled_images(str(root / task / split)) for split in ("test", "train"))
    test_images = encode_images(model, test, 128, device, keep_tokens=itm)
    pool_images = encode_images(model, pool, 128, device)
    templates = load_templates(str(root / task / "templates.txt"))
    verbalizer = load_verbalizer(root / task / "verbalizer.yaml", test.classes)
    classes = len(test.classes)

    def scores(images, chosen):
        return class_scores(images, hand_prompts(model, tokenizer, chosen, verbalizer, test.classes, max_len, device),
                            classes)

    single_scores = {t: scores(test_images, [t]) for t in templates}
    single = {t: top1(s, test_images.labels) for t, s in single_scores.items()}
    on_pool = {t: top1(scores(pool_images, [t]), pool_images.labels) for t in templates}
    picked = max(templates, key=on_pool.get)  # first of the best on the pool: no test label involved
    prompts = hand_prompts(model, tokenizer, templates, verbalizer, test.classes, max_len, device)
    feats = F.normalize(prompts.feats, dim=-1)
    means = torch.zeros(classes, feats.shape[1]).index_add_(0, prompts.owner, feats) / torch.bincount(
        prompts.owner, minlength=classes)[:, None]
    embeddings = F.normalize(means, dim=-1)
    between = (embeddings @ embeddings.T)[~torch.eye(classes, dtype=torch.bool)].mean().item()
    ensemble = scores(test_images, templates)
    # a mixture over templates: each template's class embedding (its label words averaged, CLIP's rule), the
    # class scored by the log-sum-exp of its templates' similarities at the model's ITC temperature
    template = torch.arange(len(prompts.owner)) % len(templates)  # class_prompts: class, word, then template
    slot = prompts.owner * len(templates) + template
    per_template = F.normalize(torch.zeros(classes * len(templates), feats.shape[1]).index_add_(0, slot, feats),
                               dim=-1).view(classes, len(templates), -1)
    mixture = torch.logsumexp(torch.einsum("ne,cte->nct", test_images.feats, per_template)
                              / model.temperature().item(), dim=2)
    return {
        "templates": len(templates),
        "ensemble_top1": top1(ensemble, test_images.labels),
        "mixture_top1": top1(mixture, test_images.labels),
        # the templates' scores averaged (a logit ensemble), and the prompt mean not normalised again: where
        # these beat CLIP's rule, its renormalisation of the class means is what costs
        "score_average_top1": top1(torch.stack(list(single_scores.values())).mean(0), test_images.labels),
        "unnormalised_mean_top1": top1(test_images.feats @ means.T, test_images.labels),
        "ensemble_predicted": torch.bincount(ensemble.argmax(1), minlength=classes).tolist(),
        "best_single_on_test": max(single.values()),
        "mean_single": round(sum(single.values()) / len(single), 1),
        "worst_single": min(single.values()),
        "picked_on_pool": picked,
        "picked_on_pool_test_top1": single[picked],
        "class_cosine": round(between, 3),
        "class_mean_norms": dict(zip(test.classes, [round(n, 3) for n in means.norm(dim=-1).tolist()])),
        "single_top1": single,
    } | (measure_itm(model, tokenizer, max_len, test_images, templates, verbalizer, test.classes) if itm else {})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run's export/ or checkpoints/")
    parser.add_argument("--data", required=True, type=Path, help="`make zeroshot-data` output")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--itm", action="store_true", help="also score with the ITM head over every class (slow)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer, max_len = load_run(args.checkpoint, None, None)
    with torch.no_grad():
        result = {task: measure_task(model, tokenizer, max_len, args.data, task, args.itm)
                  for task in args.tasks.split(",")}
    print(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data), "tasks": result}, indent=1))


if __name__ == "__main__":
    main()
