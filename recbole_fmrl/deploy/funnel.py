"""Funnel ranking across nested sizes (the cascade of Matryoshka adaptive retrieval).

``32:200,64:50,256``: score every item with the first 32 dims and keep the top 200, rescore those
with 64 dims and keep 50, rank those with 256 dims. One network pass at the largest size serves
every stage: the first m dims of a nested model's hidden state and item table *are* the size-m
model's. The scoring cost per user is N*m_1 + keep_1*m_2 + ... multiply-adds instead of N*m_K.

``ann32:1000,256``: the first stage (only the first) may be approximate: a faiss HNSW index over the
first 32 dims (``deploy/ann.py``) returns 1000 candidates without scoring every item; the later
stages rerank them exactly. The stage after it may have its size (``ann256:200,256``: plain ANN at the
full size, the last stage only sorts).
"""
from collections import namedtuple

import torch

from recbole_fmrl.deploy import ann
from recbole_fmrl.errors import InputError

Stage = namedtuple("Stage", "size keep ann", defaults=(False,))  # keep None: the last stage; ann: faiss index
SYNTAX = "stages are SIZE:KEEP, the last one SIZE, the first may be annSIZE:KEEP (e.g. 32:200,256 or ann32:1000,256)"


def parse_stage(part, first, last, spec):
    fields = part.strip().split(":")
    ann = fields[0].startswith("ann")
    if ann and not first:
        raise InputError(f"funnel {spec!r}: only the first stage may be approximate (ann); {part.strip()!r} is not first")
    try:
        size = int(fields[0][3:] if ann else fields[0])
        keep = int(fields[1]) if len(fields) == 2 else None
    except ValueError:
        raise InputError(f"funnel {spec!r}: {SYNTAX}") from None
    if len(fields) > 2 or (keep is None) != last or size <= 0 or (keep is not None and keep <= 0) or (ann and last):
        raise InputError(f"funnel {spec!r}: {SYNTAX}")
    return Stage(size, keep, ann)


def parse_funnel(spec):
    """``"ann32:1000,64:200,256"`` -> [Stage(32, 1000, True), Stage(64, 200), Stage(256, None)]; sizes
    increasing, shortlists shrinking."""
    parts = str(spec).split(",")
    stages = [parse_stage(part, i == 0, i == len(parts) - 1, spec) for i, part in enumerate(parts)]
    sizes = [s.size for s in stages]
    keeps = [s.keep for s in stages[:-1]]
    same = [stages[0].ann] + [False] * (len(stages) - 2)  # after an ann stage the same size may rerank exactly
    if any(b < a or (b == a and not ok) for a, b, ok in zip(sizes, sizes[1:], same)) or any(
            b >= a for a, b in zip(keeps, keeps[1:])):
        raise InputError(f"funnel {spec!r}: sizes must increase and shortlists shrink stage by stage")
    return stages


def funnel_cost(stages, n_items, ann_distances=None):
    """Scoring multiply-adds per user: N*m_1 for an exact first stage, keep_{i-1}*m_i after that.

    An ann first stage costs ``ann_distances`` * s: the inner products its HNSW search computed per user
    (measured, faiss's ``hnsw_stats.ndis`` / queries; it cannot be known before searching). The graph walk
    itself (heap, visited set, random reads) is not a multiply-add and is not counted: compare latency too.
    """
    cost, candidates = 0, n_items
    for size, keep, approximate in map(as_stage, stages):
        if approximate and ann_distances is None:
            raise ValueError("funnel_cost: an ann stage costs its measured distance computations (ann_distances=)")
        cost += (ann_distances if approximate else candidates) * size
        candidates = keep if keep is not None else candidates
    return cost


def as_stage(stage):
    """A Stage from a Stage or a plain (size, keep) pair."""
    return Stage(*stage)


def funnel_topk(hidden, table, stages, k, excluded=None, index=None):
    """Top-``k`` (ids [B k], scores [B k] at the last stage's size) through the funnel.

    hidden [B M] and table [N+1 M] with M >= every stage size; ``excluded`` [B N+1] bool marks items
    never to return (padding, seen items). Excluded items score -inf at every stage. An ann first stage
    takes its candidates from ``index`` (``ann.AnnIndex`` over the first-stage size), which never holds
    the padding row: it counts as excluded there.
    """
    stages = [as_stage(s) for s in stages]
    ids = None
    if stages[0].ann:
        excluded = padding_excluded(hidden, table, excluded)
        ids, stages = ann_candidates(hidden, table, stages[0], excluded, index), stages[1:]
    for size, keep, _ in stages:
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


def padding_excluded(hidden, table, excluded):
    """``excluded`` with the padding row marked (a fresh all-False mask but the padding when None)."""
    if excluded is not None and bool(excluded[:, 0].all()):
        return excluded  # already marked (Recommender.excluded does): no O(B N) copy
    shape = (hidden.shape[0], table.shape[0])
    mask = torch.zeros(shape, dtype=torch.bool, device=table.device) if excluded is None else excluded.clone()
    mask[:, 0] = True
    return mask


def ann_candidates(hidden, table, stage, excluded, index):
    """ids [B keep] of the ann stage (``ann.shortlist``)."""
    if index is None or index.size != stage.size or index.n_items != table.shape[0] - 1:
        raise ValueError(f"an ann{stage.size} stage needs an ann.AnnIndex over the first {stage.size} dims of this table")
    return ann.shortlist(index, hidden, table, stage.keep, excluded)
