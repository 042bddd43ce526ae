"""Zero-shot image-text retrieval: ITC ranking, optional ITM re-ranking of the top k, recall@k.

Works on one process or across ranks: each rank encodes its slice of the images and texts, features are
all-gathered, and the ITM re-ranking rows are split across ranks. Every rank runs the same number of
forward passes (ZeRO-3 gathers parameters collectively and would hang otherwise).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.batch import to_device
from pretrain.distributed import gather_no_grad
from pretrain.train.reliability.files import replace_text

RECALL_KS = (1, 5, 10)
# Re-ranked pairs are placed above every ITC-only pair: cosine similarities lie in [-1, 1].
RERANK_OFFSET = 2.0
# Held-out ITM triples draw their hard negatives from blocks of this many images, as from a training batch.
ITM_BLOCK = 128


def finite_or_last(scores: torch.Tensor) -> torch.Tensor:
    """Non-finite scores (NaN, +-inf) as -inf: they rank last, so a broken model cannot read as perfect
    (NaN compares false with everything, which made every NaN query a hit)."""
    return torch.where(torch.isfinite(scores), scores, float("-inf"))


def _ranks_of_best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's best-scored positive; ties with negatives count against it."""
    scores = finite_or_last(scores)
    best = scores.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~positive).sum(dim=1)


def recall_at_k(scores_i2t: torch.Tensor, image_ids: torch.Tensor, text_image_ids: torch.Tensor,
                ks: tuple[int, ...] = RECALL_KS) -> dict:
    """Image-to-text and text-to-image recall@k (fractions) from an [images, texts] score matrix.

    An image-to-text hit is any caption of the image within the top k; a text's single positive is its image.
    """
    return {"i2t": recall_of_queries(scores_i2t, image_ids, text_image_ids, ks),
            "t2i": recall_of_queries(scores_i2t.T, text_image_ids, image_ids, ks)}


def recall_of_queries(scores: torch.Tensor, query_ids: torch.Tensor, candidate_ids: torch.Tensor,
                      ks: tuple[int, ...] = RECALL_KS) -> dict:
    """Recall@k of one direction: `scores` [queries, candidates]; a hit is a candidate with the query's image id
    within the top k. (One direction at a time: re-ranked scores differ by direction, and a COCO-5k matrix is
    large.)"""
    rank = _ranks_of_best_positive(scores, query_ids[:, None] == candidate_ids[None, :])
    return {f"r{k}": (rank < k).float().mean().item() for k in ks}


@dataclass
class Examples:
    """A few queries and their top candidates (indices into the eval set's images / texts, best first)."""

    image_queries: torch.Tensor  # [n]
    texts_of_images: torch.Tensor  # [n, top]
    image_first_hit: torch.Tensor  # [n]: 0-based rank of the query image's best-ranked caption
    text_queries: torch.Tensor  # [m]
    images_of_texts: torch.Tensor  # [m, top]
    text_first_hit: torch.Tensor  # [m]: 0-based rank of the caption's image


def spread(total: int, n: int) -> torch.Tensor:
    """n indices spread evenly over range(total) (the middles of n equal parts): the same queries at every
    evaluation, so the pictures of successive steps compare."""
    n = min(n, total)
    return (2 * torch.arange(n) + 1) * total // (2 * n)


def retrieval_examples(i2t: torch.Tensor, t2i: torch.Tensor, image_ids: torch.Tensor, text_image_ids: torch.Tensor,
                       queries: int = 4, top: int = 5) -> Examples:
    """The top `top` candidates of `queries` image queries (rows of i2t [images, texts]) and as many caption
    queries (rows of t2i [texts, images]), ranked as recall_at_k ranks them."""
    images, texts = spread(len(image_ids), queries), spread(len(text_image_ids), queries)
    image_top, image_hit = _top_candidates(i2t[images], image_ids[images, None] == text_image_ids[None, :], top)
    text_top, text_hit = _top_candidates(t2i[texts], text_image_ids[texts, None] == image_ids[None, :], top)
    return Examples(images, image_top, image_hit, texts, text_top, text_hit)


def _top_candidates(scores: torch.Tensor, positive: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = finite_or_last(scores)
    # Negatives before positives among equal scores, as the recall counts ties: two stable sorts.
    by_positive = positive.long().argsort(dim=1, stable=True)
    by_score = scores.gather(1, by_positive).argsort(dim=1, descending=True, stable=True)
    order = by_positive.gather(1, by_score)
    return order[:, :top], _ranks_of_best_positive(scores, positive)


@torch.no_grad()
def encode_eval_set(model, data, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Image and text embeddings/features for the whole eval set, in global order, on every rank."""
    rank, world = distributed.rank(), distributed.world_size()
    images = {"embeds": [], "feats": [], "ids": []}
    for batch in data.image_batches(batch_size, rank=rank, world_size=world):
        batch = to_device(batch, device, dtype)
        embeds, feats = model.encode_image(batch["pixel_values"])
        images["embeds"].append(embeds)
        images["feats"].append(feats.float())
        images["ids"].append(batch["image_ids"])
    texts = {"embeds": [], "feats": [], "ids": [], "mask": []}
    for batch in data.text_batches(batch_size, rank=rank, world_size=world):
        batch = to_device(batch, device, dtype)
        embeds, feats = model.encode_text(batch["input_ids"], batch["attention_mask"])
        texts["embeds"].append(embeds)
        texts["feats"].append(feats.float())
        texts["ids"].append(batch["image_ids"])
        texts["mask"].append(batch["attention_mask"])
    out = {}
    for name, parts in (("image", images), ("text", texts)):
        ids = gather_no_grad(torch.cat(parts["ids"]))
        keep = ids >= 0  # padding rows carry image id -1
        for key, chunks in parts.items():
            out[f"{name}_{key}"] = gather_no_grad(torch.cat(chunks))[keep]
    return out


def this_ranks_rows(rows: int, rows_per_call: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of range(rows), padded to a whole number of calls of rows_per_call by
    repeating the last row (every rank must run the same number of forward passes: ZeRO-3 gathers
    collectively), and which of them are not padding."""
    rank, world = distributed.rank(), distributed.world_size()
    per_rank = math.ceil(math.ceil(rows / world) / rows_per_call) * rows_per_call
    local = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=device)
    return local.clamp(max=rows - 1), local < rows


@torch.no_grad()
def _itm_rerank(model, query_embeds, cand_embeds, text_mask, sim, k: int, batch_size: int,
                image_queries: bool) -> torch.Tensor:
    """Scores [queries, candidates] (float64, CPU) with each query's ITC top k re-ranked by the ITM head;
    query rows are split across ranks."""
    rows, k = sim.shape[0], min(k, sim.shape[1])
    topk = finite_or_last(sim).topk(k, dim=1).indices  # topk takes NaN for the largest value
    rows_per_call = max(1, batch_size // k)
    local_logits = []
    for chunk in this_ranks_rows(rows, rows_per_call, sim.device)[0].split(rows_per_call):
        cand = topk[chunk].reshape(-1)
        query = query_embeds[chunk].repeat_interleave(k, dim=0)
        if image_queries:
            logits = model.itm_logits(query, cand_embeds[cand], text_mask[cand])
        else:
            logits = model.itm_logits(cand_embeds[cand], query, text_mask[chunk].repeat_interleave(k, dim=0))
        local_logits.append(logits.float().view(len(chunk), k, 2))
    logits = gather_no_grad(torch.cat(local_logits))[:rows].cpu().double()
    # The match-logit margin, not the match probability: a confident head's probabilities round to 1.0 in fp32
    # (ties, which count against the positive), while its margins stay apart.
    return place_reranked(sim.cpu(), topk.cpu(), logits[..., 1] - logits[..., 0])


def place_reranked(sim: torch.Tensor, topk: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """float64 scores: the candidates `topk` [rows, k] of each row ordered by `margin` [rows, k] and above every
    other candidate, which keep their ITC order; non-finite scores or margins rank last."""
    scores = finite_or_last(sim.double())
    # a candidate without a finite ITC score stays last: re-ranking must not rescue a broken model
    margin = torch.where(torch.isfinite(margin) & torch.isfinite(scores.gather(1, topk)), margin, float("nan"))
    # Shift each row's margins so that its lowest sits at RERANK_OFFSET, above every cosine similarity; a
    # per-row shift keeps the order within the row, which is all a ranking reads.
    lowest = margin.nan_to_num(nan=float("inf")).amin(dim=1, keepdim=True)
    return scores.scatter_(1, topk, finite_or_last(margin - lowest + RERANK_OFFSET))


@torch.no_grad()
def evaluate_retrieval(model, data, batch_size: int, itm_rerank_k: int, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> tuple[dict, Examples]:
    """Returns (metrics in the eval.json layout, a few fixed queries' top candidates for the picture)."""
    was_training = model.training
    model.eval()
    enc = encode_eval_set(model, data, batch_size, device, dtype)
    sim = enc["image_feats"] @ enc["text_feats"].T
    i2t, t2i = sim, sim.T
    if itm_rerank_k > 0:
        i2t = _itm_rerank(model, enc["image_embeds"], enc["text_embeds"], enc["text_mask"], sim, itm_rerank_k,
                          batch_size, image_queries=True)
        t2i = _itm_rerank(model, enc["text_embeds"], enc["image_embeds"], enc["text_mask"], sim.T, itm_rerank_k,
                          batch_size, image_queries=False)
        itm_accuracy = itm_triple_accuracy(model, enc, sim, batch_size)
    model.train(was_training)
    image_ids, text_image_ids = enc["image_ids"].cpu(), enc["text_ids"].cpu()
    i2t, t2i = i2t.cpu(), t2i.cpu()
    metrics = {
        "i2t": recall_of_queries(i2t, image_ids, text_image_ids),
        "t2i": recall_of_queries(t2i, text_image_ids, image_ids),
        "num_images": int(image_ids.numel()),
        "num_texts": int(text_image_ids.numel()),
        "itm_rerank_k": itm_rerank_k,
        # queries with any non-finite score (ranked last, so mostly misses): non-zero means a broken model
        "non_finite_queries": {"i2t": _rows_not_finite(i2t), "t2i": _rows_not_finite(t2i)},
    }
    if itm_rerank_k > 0:  # what re-ranking bought: the ITC-only recalls beside the re-ranked ones
        metrics["itc"] = {"i2t": recall_of_queries(sim.cpu(), image_ids, text_image_ids),
                          "t2i": recall_of_queries(sim.T.cpu(), text_image_ids, image_ids)}
        metrics["itm_accuracy"] = itm_accuracy
    return metrics, retrieval_examples(i2t, t2i, image_ids, text_image_ids)


@torch.no_grad()
def itm_triple_accuracy(model, enc: dict, sim: torch.Tensor, batch_size: int) -> float:
    """ITM accuracy on held-out triples: each image with its first caption (a match), and two non-matches a
    training batch would offer as hard negatives, the hardest in its block of ITM_BLOCK images by ITC: the
    other image's caption ITC ranks highest for the image, and the other image it ranks highest for the
    caption. Always answering "no match" scores 2/3. The images are split across ranks."""
    first = {}
    for index, image_id in enumerate(enc["text_ids"].tolist()):
        first.setdefault(image_id, index)
    captions = torch.tensor([first[i] for i in enc["image_ids"].tolist()], device=sim.device)
    if len(captions) < 2:
        return float("nan")
    rows = torch.arange(len(captions), device=sim.device)
    block = (rows // ITM_BLOCK).clamp(max=(len(rows) - 2) // ITM_BLOCK)  # a last block of one joins the previous
    block_sim = finite_or_last(sim[:, captions]).masked_fill(block[:, None] != block, float("-inf"))
    block_sim = block_sim.fill_diagonal_(float("-inf"))
    negative_caption, negative_image = captions[block_sim.argmax(dim=1)], block_sim.argmax(dim=0)
    image_embeds, text_embeds, mask = enc["image_embeds"], enc["text_embeds"], enc["text_mask"]
    local_rows, real = this_ranks_rows(len(rows), batch_size, sim.device)
    correct = torch.zeros(1, dtype=torch.long, device=sim.device)
    for chunk, counted in zip(local_rows.split(batch_size), real.split(batch_size), strict=True):
        triples = ((chunk, captions[chunk], 1), (chunk, negative_caption[chunk], 0),
                   (negative_image[chunk], captions[chunk], 0))
        for images, texts, label in triples:
            logits = model.itm_logits(image_embeds[images], text_embeds[texts], mask[texts])
            correct += ((logits.argmax(dim=1) == label) & counted).sum()
    return int(gather_no_grad(correct).sum()) / (3 * len(rows))


def _rows_not_finite(scores: torch.Tensor) -> int:
    return int((~torch.isfinite(scores)).any(dim=1).sum())


def non_finite_warning(metrics: dict) -> str | None:
    """One line for the user when some scores were NaN/inf, else None."""
    bad = metrics.get("non_finite_queries", {})
    if not any(bad.values()):
        return None
    return (f"warning: non-finite similarity scores for {bad['i2t']} of {metrics['num_images']} image queries and "
            f"{bad['t2i']} of {metrics['num_texts']} text queries (ranked last, counted as misses): the model "
            "produces NaN/inf; check its weights")


def save_eval_json(path: Path, metrics: dict) -> None:
    """Written beside and renamed into place, so an eval.json that exists is always complete."""
    replace_text(path, json.dumps(metrics, indent=2))


def format_table(metrics: dict) -> str:
    ks = [f"R@{k}" for k in RECALL_KS]
    lines = [f"retrieval on {metrics['num_images']} images / {metrics['num_texts']} texts"
             f" (ITM re-rank k={metrics['itm_rerank_k']})",
             f"{'':30}" + "".join(f"{k:>8}" for k in ks)]
    rows = [("ITC", metrics.get("itc")), (f"ITC + ITM top {metrics['itm_rerank_k']}", metrics)]
    for method, recalls in rows if "itc" in metrics else [("ITC", metrics)]:
        for name, label in (("i2t", "image->text"), ("t2i", "text->image")):
            lines.append(f"{label + ' ' + method:30}" + "".join(f"{recalls[name][f'r{k}']:>8.3f}" for k in RECALL_KS))
    if "itm_accuracy" in metrics:
        lines.append(f"ITM accuracy on held-out hard triples {metrics['itm_accuracy']:.3f} (always 'no match': 0.667)")
    return "\n".join(lines)
