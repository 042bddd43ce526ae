"""Image classification with class prompts: image features, class scores, ITM re-ranking, accuracy metrics.

Scores are ITC cosine similarities between an image's feature and each class embedding
(pretrain.model.prompting.class_embeddings), or, for a model trained with the caption-word objective, its
word head's log-probabilities of each class's label words. ITM re-ranking orders each image's top k classes
by the fusion encoder's match margin, averaged over the class's prompts, and keeps them above the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_pipeline import DataError, clean_caption
from data_pipeline.collate import tokenize
from data_pipeline.labelled_images import LabelledImages
from data_pipeline.transforms import eval_image, normalize
from pretrain.eval.retrieval import finite_or_last, place_reranked
from pretrain.model import ALBEF
from pretrain.model.prompting import LearnedContext, class_embeddings, insert_context_slots


@dataclass
class ImageFeatures:
    feats: torch.Tensor  # [N, E] normalised ITC features
    words_input: torch.Tensor  # [N, D_v] what the caption-word head reads (ALBEF.words_input)
    labels: torch.Tensor  # [N]
    embeds: torch.Tensor | None  # [N, tokens, D_v] image token states, kept only for ITM re-ranking


@dataclass
class Prompts:
    """Encoded class prompts: token states for ITM, features for ITC, and each prompt's class."""

    embeds: torch.Tensor  # [P, L, D_t]
    mask: torch.Tensor  # [P, L]
    feats: torch.Tensor  # [P, E]
    owner: torch.Tensor  # [P]


@torch.no_grad()
def encode_images(model: ALBEF, data: LabelledImages, batch_size: int, device: torch.device,
                  keep_tokens: bool = False, desc: str = "images") -> ImageFeatures:
    """Every image once (eval transform), with a progress bar; the frozen encoder's features are cached by callers."""
    size = model.config.image_size
    feats, words_input, embeds = [], [], []
    for begin in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False):
        pixels = normalize(torch.stack([eval_image(b, size=size) for b in data.images[begin : begin + batch_size]]))
        tokens, feat = model.encode_image(pixels.to(device))
        feats.append(feat.float().cpu())
        words_input.append(model.words_input(tokens).cpu())
        if keep_tokens:
            embeds.append(tokens.cpu())
    return ImageFeatures(torch.cat(feats), torch.cat(words_input), data.labels.clone(),
                         torch.cat(embeds) if keep_tokens else None)


@torch.no_grad()
def encode_prompts(model: ALBEF, tokenizer, prompts: list[str], owner: list[int], max_len: int,
                   device: torch.device) -> Prompts:
    text = tokenize(tokenizer, prompts, max_len)
    mask = text["attention_mask"].to(device)
    embeds, feats = model.encode_text(text["input_ids"].to(device), mask)
    return Prompts(embeds.cpu(), mask.cpu(), feats.float().cpu(), torch.tensor(owner))


def class_scores(images: ImageFeatures, prompts: Prompts, num_classes: int) -> torch.Tensor:
    """[N, C] cosine similarities of each image with each class embedding."""
    return images.feats @ class_embeddings(prompts.feats, prompts.owner, num_classes).T


@torch.no_grad()
def word_scores(model: ALBEF, tokenizer, images: ImageFeatures, verbalizer: dict[str, list[str]],
                classes: list[str], device: torch.device) -> torch.Tensor:
    """[N, C] from the caption-word head (model.caption_words_weight > 0): the mean log-probability of a label
    word's tokens, averaged over the class's label words. No templates: the head reads words, not sentences."""
    if not hasattr(model, "words_head"):
        raise DataError("the model was trained without the caption-word objective (model.caption_words_weight 0), "
                        "so it has no word head: use --scorer itc")
    log_probs = model.words_head(images.words_input.to(device)).float().log_softmax(dim=1).cpu()
    columns = []
    for name in classes:
        per_word = []
        for word in verbalizer[name]:
            ids = tokenizer(clean_caption(word), add_special_tokens=False)["input_ids"]
            if not ids or tokenizer.unk_token_id in ids:
                raise DataError(f"label word {word!r} of class {name!r} is not in the tokenizer's vocabulary, so the "
                                "word head cannot score it: give the class other words in --verbalizer")
            per_word.append(log_probs[:, ids].mean(dim=1))
        columns.append(torch.stack(per_word).mean(dim=0))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def itm_rerank(model: ALBEF, images: ImageFeatures, prompts: Prompts, scores: torch.Tensor, k: int,
               batch_size: int, device: torch.device) -> torch.Tensor:
    """float64 [N, C]: each image's ITC top k classes re-ordered by their mean ITM match margin over the class's
    prompts and placed above the other classes (as retrieval's re-ranking places candidates)."""
    k = min(k, scores.shape[1])
    topk = finite_or_last(scores).topk(k, dim=1).indices
    # (image, rank, prompt) for every prompt of every image's top k classes; one image copy per pair, so pairs
    # of any images share a fusion pass whatever their classes' prompt counts
    image, rank, prompt = (topk[:, :, None] == prompts.owner[None, None, :]).nonzero().unbind(1)
    margins = []
    for part in tqdm(torch.arange(len(image)).split(batch_size), desc="ITM re-rank", unit="batch", leave=False):
        logits = model.itm_logits(images.embeds[image[part]].to(device), prompts.embeds[prompt[part]].to(device),
                                  prompts.mask[prompt[part]].to(device)).double().cpu()
        margins.append(logits[:, 1] - logits[:, 0])
    slot = image * k + rank
    sums = torch.zeros(len(scores) * k, dtype=torch.float64).index_add_(0, slot, torch.cat(margins))
    mean = sums / torch.bincount(slot, minlength=len(scores) * k)
    return place_reranked(scores, topk, mean.view(len(scores), k))


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Top-1 and top-5 accuracy (top-5 over min(5, C) classes), per-class top-1 and the confusion matrix
    (rows: true class, columns: predicted). Non-finite scores rank last."""
    scores = finite_or_last(scores)
    top = scores.topk(min(5, len(classes)), dim=1).indices
    predicted = top[:, 0]
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    hits = predicted == labels
    return {
        "top1": hits.double().mean().item(),
        "top5": (top == labels[:, None]).any(dim=1).double().mean().item(),
        "per_class": {name: hits[labels == c].double().mean().item() if bool((labels == c).any()) else None
                      for c, name in enumerate(classes)},
        "num_images": len(labels),
        "num_classes": len(classes),
        "confusion": confusion.tolist(),
    }


def label_word_ids(tokenizer, words: list[str], max_len: int, context_length: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Tokenised label words with `context_length` context slots after [CLS], `max_len` tokens in all."""
    if max_len - context_length < 3:
        raise ValueError(f"--max-len {max_len} leaves no room for label words after {context_length} context "
                         f"vectors; raise it to at least {context_length + 3}")
    text = tokenize(tokenizer, [clean_caption(word) for word in words], max_len - context_length)
    return insert_context_slots(text["input_ids"], text["attention_mask"], context_length)


def encode_context_prompts(model: ALBEF, tokenizer, context: LearnedContext, verbalizer: dict[str, list[str]],
                           classes: list[str], max_len: int, device: torch.device) -> Prompts:
    """Learned context before every label word of every class."""
    words = [word for name in classes for word in verbalizer[name]]
    owner = torch.tensor([label for label, name in enumerate(classes) for _ in verbalizer[name]])
    input_ids, mask = label_word_ids(tokenizer, words, max_len, context.length)
    with torch.no_grad():
        embeds, feats = context.to(device).encode(model, input_ids.to(device), mask.to(device), owner.to(device))
    return Prompts(embeds.cpu(), mask, feats.float().cpu(), owner)
