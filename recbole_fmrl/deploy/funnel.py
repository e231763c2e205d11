"""Funnel ranking across nested sizes (the cascade of Matryoshka adaptive retrieval).

``32:200,64:50,256``: score every item with the first 32 dims and keep the top 200, rescore those
with 64 dims and keep 50, rank those with 256 dims. One network pass at the largest size serves
every stage: the first m dims of a nested model's hidden state and item table *are* the size-m
model's. The scoring cost per user is N*m_1 + keep_1*m_2 + ... multiply-adds instead of N*m_K.
"""
import torch

from recbole_fmrl.errors import InputError


def parse_funnel(spec):
    """``"32:200,256"`` -> [(32, 200), (256, None)]; sizes increasing, shortlists shrinking."""
    stages = []
    for i, part in enumerate(str(spec).split(",")):
        fields = part.strip().split(":")
        last = i == len(str(spec).split(",")) - 1
        try:
            size = int(fields[0])
            keep = int(fields[1]) if len(fields) == 2 else None
        except ValueError:
            raise InputError(f"funnel {spec!r}: stages are SIZE:KEEP, the last one SIZE (e.g. 32:200,256)") from None
        if len(fields) > 2 or (keep is None) != last or size <= 0 or (keep is not None and keep <= 0):
            raise InputError(f"funnel {spec!r}: stages are SIZE:KEEP, the last one SIZE (e.g. 32:200,256)")
        stages.append((size, keep))
    sizes = [s for s, _ in stages]
    keeps = [k for _, k in stages[:-1]]
    if any(b <= a for a, b in zip(sizes, sizes[1:])) or any(b >= a for a, b in zip(keeps, keeps[1:])):
        raise InputError(f"funnel {spec!r}: sizes must increase and shortlists shrink stage by stage")
    return stages


def funnel_cost(stages, n_items):
    """Scoring multiply-adds per user: N*m_1 for the first stage, keep_{i-1}*m_i after that."""
    cost, candidates = 0, n_items
    for size, keep in stages:
        cost += candidates * size
        candidates = keep if keep is not None else candidates
    return cost


def funnel_topk(hidden, table, stages, k, excluded=None):
    """Top-``k`` (ids [B k], scores [B k] at the last stage's size) through the funnel.

    hidden [B M] and table [N+1 M] with M >= every stage size; ``excluded`` [B N+1] bool marks items
    never to return (padding, seen items). Excluded items score -inf at every stage.
    """
    ids = None
    for size, keep in stages:
        if ids is None:  # first stage: every item
            scores = hidden[:, :size] @ table[:, :size].T  # [B N+1]
            if excluded is not None:
                scores = scores.masked_fill(excluded, float("-inf"))
            ids = torch.arange(table.shape[0], device=table.device).expand(hidden.shape[0], -1)
        else:
            scores = torch.einsum("bm,bcm->bc", hidden[:, :size], table[ids, :size])
            if excluded is not None:
                scores = scores.masked_fill(excluded.gather(1, ids), float("-inf"))
        top = torch.topk(scores, min(keep if keep is not None else k, scores.shape[1]), dim=1)
        ids = ids.gather(1, top.indices)
    return ids, top.values
