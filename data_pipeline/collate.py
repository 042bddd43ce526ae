"""Batch assembly: stack images, tokenize captions, MLM-mask, per the batch contract (docs/data.md)."""

import torch

from data_pipeline.masking import mask_tokens
from data_pipeline.transforms import normalize


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """Fixed-length padding: identical shapes on every rank and step.

    NumPy arrays wrapped as tensors: transformers builds "pt" tensors from Python lists, which costs
    about a quarter of the whole tokenize call (measured, fast tokenizer, 64 captions).
    """
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_special_tokens_mask=True,
        return_token_type_ids=False,
        return_tensors="np",
    )
    return {key: torch.from_numpy(value).long() for key, value in encoded.items()}


def collate_train(
    pixels: list[torch.Tensor],
    captions: list[str],
    keys: list[str],
    image_ids: list[int],
    *,
    tokenizer,
    max_len: int,
    mlm_probability: float,
    generator: torch.Generator,
    swapped: list[str | None] | None = None,
) -> dict:
    """The batch contract's fields; with `swapped` (each caption's word-swapped copy or None) the swap fields too."""
    text = tokenize(tokenizer, captions, max_len)
    mlm_input_ids, mlm_labels = mask_tokens(
        text["input_ids"],
        text["special_tokens_mask"],
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        generator=generator,
        mlm_probability=mlm_probability,
    )
    batch = {
        "pixel_values": normalize(torch.stack(pixels)),
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
        "image_ids": torch.tensor(image_ids, dtype=torch.long),
        "keys": keys,
    }
    if swapped is not None:
        batch.update(tokenize_swapped(tokenizer, swapped, captions, text["input_ids"], max_len))
    return batch


def tokenize_swapped(tokenizer, swapped: list[str | None], captions: list[str], input_ids: torch.Tensor,
                     max_len: int) -> dict[str, torch.Tensor]:
    """Hard-negative captions tokenized like the captions; a row without one repeats its caption and is not
    valid, nor is one whose swapped word truncation cut off (it would equal its positive)."""
    text = tokenize(tokenizer, [s if s is not None else c for s, c in zip(swapped, captions)], max_len)
    has_swap = torch.tensor([s is not None for s in swapped], dtype=torch.bool)
    return {
        "swap_input_ids": text["input_ids"],
        "swap_attention_mask": text["attention_mask"],
        "swap_valid": has_swap & (text["input_ids"] != input_ids).any(dim=1),
    }
