"""Self-distillation across nested sizes: the largest size teaches the smaller ones (``fmrl_distill_weight``).

With full-scale nesting every weight of size m is also part of every larger size, so the label's
cross-entropy is the small sizes' only signal and it competes with the large sizes' for the shared
dims (measured on Beauty: size 32 of the nested model reaches 0.74x a size-32 model trained alone).
"In-place distillation" (Yu & Huang, "Universally Slimmable Networks", ICCV 2019) adds, within the
same step, a soft target for each narrower network: the widest network's own prediction, detached.
Here size m < d also matches the largest size's next-item distribution over every item:

    KL_m = mean over labelled rows of KL(p_d || p_m),  p_m = softmax(h[:m] @ E[:, :m]^T)

p_d is a constant (no gradient flows into the teacher through its own target), so only the first
m_{K-1} dims receive this term's gradient. Rows are processed in chunks whose logits are recomputed
in the backward pass, so the extra memory is a few of one chunk's ``[K, r, N]`` buffers.
"""
import torch

from recbole_fmrl.model.nested import block_bounds

ROW_CHUNK = 256  # rows per chunk: a few K * 256 * N float buffers (6 sizes, 12k items: ~75 MB each)


def _running_logits(hidden, items, bounds):
    """All-size logits ``[K r N]``: size k's = size k-1's + block k's product (one fused GEMM each;
    a stack and cumsum over the size dim cost 2-3 extra passes over the buffer)."""
    out = hidden.new_empty(len(bounds), hidden.shape[0], items.shape[0])
    torch.mm(hidden[:, : bounds[0][1]], items[:, : bounds[0][1]].T, out=out[0])
    for k, (a, b) in enumerate(bounds[1:], 1):
        torch.addmm(out[k - 1], hidden[:, a:b], items[:, a:b].T, out=out[k])
    return out


def _chunk_terms(hidden, items, sizes, lse=None):
    """One chunk's all-size logits [K r N], their log-sum-exps [K r] (computed unless given) and the
    teacher's probabilities [r N]."""
    logits = _running_logits(hidden, items, block_bounds(sizes))
    lse = logits.logsumexp(-1) if lse is None else lse
    return logits, lse, (logits[-1] - lse[-1].unsqueeze(-1)).exp()


class _NestedKL(torch.autograd.Function):
    """Summed over rows, KL_k = sum_j q_j (log q_j - log p_kj) = (q . l_K - lse_K) - q . l_k + lse_k with
    q = p_d; its gradient wrt size k's logits is p_k - q (q a constant). Logits are recomputed per chunk in
    backward, so memory stays one chunk's."""

    @staticmethod
    def forward(ctx, hidden, items, sizes, row_chunk):
        total, lses = hidden.new_zeros(len(sizes)), []
        for start in range(0, hidden.shape[0], row_chunk):
            logits, lse, q = _chunk_terms(hidden[start: start + row_chunk], items, sizes)
            ql = torch.einsum("rn,krn->kr", q, logits)  # [K r]
            total += ((ql[-1] - lse[-1]) - ql + lse).sum(1)  # the largest size's term is 0
            lses.append(lse)
        ctx.save_for_backward(hidden, items, torch.cat(lses, 1))  # [K P]: backward re-forms p without a pass
        ctx.sizes, ctx.row_chunk = sizes, row_chunk
        return total

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [K]
        hidden, items, lses = ctx.saved_tensors
        bounds = block_bounds(ctx.sizes)
        grad_h, grad_e = torch.zeros_like(hidden), torch.zeros_like(items)
        scale = grad_out.clone()
        scale[-1] = 0.0  # the teacher's own term is identically 0
        for start in range(0, hidden.shape[0], ctx.row_chunk):
            h = hidden[start: start + ctx.row_chunk]
            logits, lse, q = _chunk_terms(h, items, ctx.sizes, lses[:, start: start + ctx.row_chunk])
            g = (logits - lse.unsqueeze(-1)).exp_().sub_(q).mul_(scale.view(-1, 1, 1))  # [K r N]
            for k in range(len(bounds) - 2, -1, -1):  # block j's dims serve every size k >= j
                g[k] += g[k + 1]
            for j, (a, b) in enumerate(bounds):
                grad_h[start: start + ctx.row_chunk, a:b] = g[j] @ items[:, a:b]
                grad_e[:, a:b] += g[j].T @ h[:, a:b]
        return grad_h, grad_e, None, None


def nested_distillation(hidden, items, sizes, max_rows=0, row_chunk=ROW_CHUNK):
    """Per-size mean KL from the largest size's distribution ``[K]`` (the largest size's entry is 0).

    hidden [P, d] labelled states; items [N, d] the item table without padding; sizes increasing
    with sizes[-1] == d. ``max_rows`` > 0: the mean over that many rows drawn without replacement
    (torch's global RNG), an unbiased estimate at a fraction of the cost. Differentiable wrt
    ``hidden`` and ``items`` (the teacher is a constant).
    """
    if 0 < max_rows < hidden.shape[0]:
        hidden = hidden[torch.randperm(hidden.shape[0], device=hidden.device)[:max_rows]]
    return _NestedKL.apply(hidden, items, tuple(sizes), row_chunk) / max(1, hidden.shape[0])

