"""Epoch-mode arithmetic: how a rank's batches are shared among its workers, and where a resume starts."""


def epoch_quotas(counts: list[list[int]], batch_size: int, batches_per_rank: int) -> list[list[int]]:
    """Per rank, per worker batch quotas summing to `batches_per_rank`, in proportion to the samples held."""
    quotas = []
    for rank_counts in counts:
        total = sum(rank_counts) or len(rank_counts)
        shares = [batches_per_rank * (n or not sum(rank_counts)) / total for n in rank_counts]
        quota = [int(share) for share in shares]
        by_remainder = sorted(range(len(quota)), key=lambda w: quota[w] - shares[w])  # largest remainder first
        for w in by_remainder[: batches_per_rank - sum(quota)]:
            quota[w] += 1
        quotas.append(quota)
    return quotas


def round_robin_position(quotas: list[int], consumed: int) -> tuple[list[int], int]:
    """Batches taken from each worker after `consumed` in-order round-robin batches, and the next worker."""
    taken, worker = [0] * len(quotas), 0
    for _ in range(consumed):
        while taken[worker] >= quotas[worker]:
            worker = (worker + 1) % len(quotas)
        taken[worker] += 1
        worker = (worker + 1) % len(quotas)
    return taken, worker
