"""BERT-style MLM masking, applied in the collate step so it is fresh (and seeded) every batch."""

import torch


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mlm_probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `mlm_probability` of the non-special tokens; of those 80% -> [MASK], 10% -> random, 10% kept.

    `special_tokens_mask` is 1 for [CLS]/[SEP]/[PAD] (never selected). Returns (masked ids, labels) with
    labels -100 wherever a token was not selected.
    """
    selectable = special_tokens_mask == 0
    probs = torch.full(input_ids.shape, mlm_probability)
    selected = torch.bernoulli(probs, generator=generator).bool() & selectable
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))

    masked = input_ids.clone()
    to_mask = selected & torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool()
    masked[to_mask] = mask_token_id
    # half of the remaining 20%: a random token; the other half stays unchanged
    to_random = selected & ~to_mask & torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool()
    masked[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[to_random]
    return masked, labels
