"""Sampled-softmax Matryoshka cross-entropy: the label against ``n`` uniformly drawn items per row.

The strongest published SASRec numbers on Amazon Beauty (eSASRec, RecSys 2025, "SASRec+SS": test
NDCG@10 0.0531) train with a 256-negative sampled softmax at every position rather than the full
softmax. A step costs ``n`` instead of ``N`` dot products per row, which pays on large catalogues; on
Beauty it trains worse than the full softmax (``results/amazon-beauty.md``, row SASRec-allpos-ss256).

Every labelled row draws its own ``n`` negatives uniformly from the ``N`` items (with replacement);
a negative equal to the row's label (an accidental hit) is masked out of the softmax, so the label
is never its own negative. Nested sizes share the draws: size m scores the
same candidates with the first m dims, so each size's loss depends on its own prefix only.

Evaluation is unchanged (a full ranking over every item); only the training signal is sampled.
"""
import torch
import torch.nn.functional as F

from recbole_fmrl.model.loss import matryoshka_cross_entropy
from recbole_fmrl.model.nested import block_bounds


def sampled_matryoshka_cross_entropy(hidden, items, labels, sizes, negatives):
    """Per-size mean cross-entropy ``[K]`` of the label against the drawn negatives.

    hidden [P, d] labelled states; items [N, d] the item table without padding; labels [P] row
    indices into ``items``; sizes increasing with sizes[-1] == d; negatives [P, n] row indices into
    ``items`` (``draw_negatives``). Differentiable wrt ``hidden`` and ``items``.
    """
    candidates = torch.cat([labels.unsqueeze(1), negatives], 1)  # [P 1+n], the label first
    emb = items[candidates]  # [P 1+n d]
    partial = torch.stack([torch.bmm(emb[:, :, a:b], hidden[:, a:b].unsqueeze(2)).squeeze(2)
                           for a, b in block_bounds(sizes)])  # [K P 1+n], one block's share each
    logits = partial.cumsum(0)  # [K P 1+n], size k = sum of blocks <= k
    hit = torch.cat([torch.zeros_like(labels, dtype=torch.bool).unsqueeze(1),
                     negatives == labels.unsqueeze(1)], 1)  # [P 1+n]
    logits = logits.masked_fill(hit, float("-inf"))
    K, P = logits.shape[:2]
    target = labels.new_zeros(K * P)  # the label sits in column 0
    return F.cross_entropy(logits.reshape(K * P, -1), target, reduction="none").view(K, P).mean(1)


def draw_negatives(num_rows, num_items, n, device):
    """``[num_rows, n]`` item indices drawn uniformly with replacement (torch's global RNG, so a
    seeded run draws the same negatives)."""
    return torch.randint(0, num_items, (num_rows, n), device=device)


def nested_softmax_loss(hidden, items, labels, sizes, num_negatives=0, **full_kwargs):
    """Per-size training CE ``[K]``: over every item (``num_negatives`` == 0, the paper's loss, fused
    in ``loss.matryoshka_cross_entropy`` with ``full_kwargs``) or over the label and
    ``num_negatives`` uniform negatives per row."""
    if num_negatives <= 0:
        return matryoshka_cross_entropy(hidden, items, labels, sizes, **full_kwargs)
    negatives = draw_negatives(hidden.shape[0], items.shape[0], num_negatives, hidden.device)
    return sampled_matryoshka_cross_entropy(hidden, items, labels, sizes, negatives)

