"""Matryoshka cross-entropy (fMRLRec eq. 13-14): one CE per nested size from a single pass.

Logits of size m use the first m dims of the hidden states and of the item table. Because the
sizes are nested, logits_{m_k} = sum_{j<=k} H[:, blk_j] @ E[:, blk_j]^T: the per-block partial
products plus a cumulative sum give all K sizes for the FLOPs of the largest one.

``matryoshka_cross_entropy`` computes the K per-size mean CEs without materialising the K full
``[P, N]`` logit matrices: the item table is walked in chunks of ``chunk_size`` items, an online
(shifted) sum of exponentials is kept per size and row, and the backward pass recomputes each
chunk's logits (Cut-Cross-Entropy / Liger style, generalised to nested sizes). Working memory is
one ``[K, P, chunk]`` buffer; the autograd context saves only the inputs and the ``[K, P]``
log-sum-exp.

Implementation notes (timings: ``benchmarks/bench_loss.py`` -> ``results/loss_bench.md``):

* The shift of the exponentials is folded into the GEMMs: the item chunk gets a column of ones in
  front of every block and the hidden states a column holding ``-shift``, so each GEMM writes
  ``logits - shift`` and no separate subtraction pass over ``[K, P, c]`` is needed. In the
  forward the shift starts at the label logit (a lower bound of the row max, so the sum of
  exponentials is >= 1 and nothing relevant underflows); a chunk whose sum exceeds ``e^50``
  (a logit more than ~50 nats above the shift, or an overflow) is recomputed with a max-based
  shift, so the result is exact for any logit range. In the backward the shift is
  ``lse_k - log(g_k / P)``, so ``exp`` yields ``g_k / P * softmax_k`` directly.
* Sizes are chained in place (``logits_k = logits_{k-1} + H_k @ E_k^T`` with ``addmm_``), so
  the forward costs the FLOPs of the largest size; the backward uses the reverse cumulative sum
  over sizes so that block ``j``'s gradient is one GEMM of width ``|blk_j|`` per direction. The
  narrow blocks (8-32 wide) are the price: each such GEMM reads a whole ``[rows, items]`` buffer
  for little arithmetic (``results/efficiency.md`` profiles it).
* The one-hot part of the gradient is applied once, outside the chunk loop.

Single-pass variant (``weights=`` given, e.g. the model's per-size loss weights): the caller's
upstream gradient is known before the forward, so the forward walks blocks of rows instead of
items -- for each block the K sizes' logits over all N items (a ``[K, r, N]`` buffer), their exact
per-size softmax (the whole row is at hand), and the block's gradients wrt hidden and items --
Liger-Kernel fused-linear-CE style. That is 3 GEMMs of plain CE's size and K exps per logit
(the recompute path: 4 GEMMs and 2K exps). Backward returns the stored gradients, scaled when
the upstream is a multiple of ``weights`` (loss scaling), and otherwise falls back to the
chunked recompute, so it is exact for any upstream. Extra memory: one ``[P, d]`` and one
``[N, d]`` gradient held from forward to backward. On the CPU the elementwise middle of each
block (cumulative logits, exp, sums, the weighted reverse cumulative sum) runs in a compiled C
kernel (``native.py``) that makes two sweeps over each row while it stays in cache, instead of
~10 PyTorch passes over the buffer; without a C compiler the same work runs in PyTorch ops.

On CUDA, ``chunk_size == 0`` materialises all logits (the reference path) whenever they fit
``CUDA_PLAIN_BYTES``: there the Python loop is launch-bound (see ``CUDA_PLAIN_BYTES``).
"""
import math

import torch
import torch.nn.functional as F

from recbole_fmrl.model import native as native_kernel
from recbole_fmrl.model.nested import block_bounds, check_sizes

# Elements of the [K, P, c] working buffer per chunk used when chunk_size == 0 (auto): ~32 MB in
# fp32. Larger chunks fall out of cache, smaller ones pay per-op overhead (results/loss_bench.md).
AUTO_BUFFER_ELEMS = 8 * 1024 * 1024
# Elements of the [K, r, N] working buffer of the single-pass path (rows per block r) when
# row_block == 0 on CPU; measured in benchmarks/bench_loss.py.
AUTO_ROW_BUFFER_ELEMS = 8 * 1024 * 1024
# On CUDA, chunk_size == 0 materialises everything (the plain reference path) when the K*P*N
# logits take at most this many bytes: the per-chunk Python loop is launch-bound on a GPU
# (results/efficiency-cuda.md). Above it the fused paths are used with a working buffer of this size.
CUDA_PLAIN_BYTES = 1 << 30
# Below this many K*P*N logits the plain reference path is used when chunk_size == 0.
AUTO_PLAIN_BELOW = 2 * 1024 * 1024
# Guard for the folded shift: a chunk whose per-row sum of exponentials exceeds exp(_GUARD) (or,
# in the single pass, falls below exp(-_GUARD)) is recomputed with a max-based shift.
_GUARD = 50.0


def matryoshka_logits(hidden, items, sizes):
    """All-size logits ``[K, P, N]`` from per-block partial products and a cumulative sum."""
    partial = torch.stack([hidden[:, a:b] @ items[:, a:b].T for a, b in block_bounds(sizes)])
    return partial.cumsum(0)


def matryoshka_cross_entropy_reference(hidden, items, labels, sizes):
    """Per-size mean CE ``[K]``, materialising every logit matrix (the slow reference)."""
    logits = matryoshka_logits(hidden, items, sizes)  # [K P N]
    return torch.stack([F.cross_entropy(lg, labels) for lg in logits])


def auto_chunk_size(num_sizes, num_rows, num_items, buffer_elems=None):
    """Chunk (items per chunk) used when ``chunk_size == 0``: a ~``buffer_elems`` (default
    ``AUTO_BUFFER_ELEMS``) ``[K, P, c]`` buffer."""
    c = (buffer_elems or AUTO_BUFFER_ELEMS) / max(1, num_sizes * num_rows)
    c = max(64, int(round(c / 64)) * 64)
    return max(1, min(c, num_items))


class _Plan:
    """Static layout for one call: blocks and the augmented column offsets."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.bounds = block_bounds(sizes)
        self.K = len(sizes)
        # Augmented item layout: [1, E_blk0, 1, E_blk1, ...]; block j starts at off[j] (its 1).
        self.off = [a + j for j, (a, _) in enumerate(self.bounds)]
        self.width_aug = sizes[-1] + self.K

    def hidden_aug(self, hidden):
        """Per-block left operands [shift column | H_blk]; shift columns are set by set_shift."""
        mats = []
        for a, b in self.bounds:
            m = hidden.new_empty(hidden.shape[0], b - a + 1)
            m[:, 1:] = hidden[:, a:b]
            mats.append(m)
        return mats

    def set_shift(self, mats, shift):
        """Column 0 of block k gets -(shift_k - shift_{k-1}), so the running sum is logits - shift."""
        torch.neg(shift[0], out=mats[0][:, 0])
        for k in range(1, self.K):
            torch.sub(shift[k - 1], shift[k], out=mats[k][:, 0])

    def items_aug(self, items):
        """[1, E_blk0, 1, E_blk1, ...] for the whole table (one [N, d + K] copy per pass)."""
        ea = items.new_empty(items.shape[0], self.width_aug)
        for j, (a, b) in enumerate(self.bounds):
            ea[:, self.off[j]] = 1
            ea[:, self.off[j] + 1: self.off[j] + 1 + b - a] = items[:, a:b]
        return ea

    def step(self, R, mats, ea, k):
        """R <- logits_k - shift_k from R = logits_{k-1} - shift_{k-1} (in place, no copy)."""
        a, b = self.bounds[k]
        blk = ea[:, self.off[k]: self.off[k] + b - a + 1].T
        if k == 0:
            torch.mm(mats[0], blk, out=R)
        else:
            R.addmm_(mats[k], blk)


def _label_logits(hidden, items, labels, bounds):
    """[K, P] label logits per size: cumulative per-block dot products."""
    prod = hidden * items.index_select(0, labels)
    return torch.stack([prod[:, a:b].sum(1) for a, b in bounds]).cumsum(0)


class _MatryoshkaCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, items, labels, sizes, chunk_size):
        plan = _Plan(sizes)
        K, P, N = plan.K, hidden.shape[0], items.shape[0]
        c = min(chunk_size, N)
        hidden_c, items_c = hidden.contiguous(), items.contiguous()
        label_logit = _label_logits(hidden_c, items_c, labels, plan.bounds)  # [K, P]
        shift = label_logit.clone()  # <= row max, so every row's sum of exps is >= ~1
        total = hidden.new_zeros(K, P)
        part = hidden.new_empty(K, P)
        mats = plan.hidden_aug(hidden_c)
        plan.set_shift(mats, shift)
        rbuf, tbuf = hidden.new_empty(P * c), hidden.new_empty(P * c)
        e_aug = plan.items_aug(items_c)
        limit = math.exp(_GUARD)
        for c0 in range(0, N, c):
            cc = min(c, N - c0)
            R, T = rbuf[: P * cc].view(P, cc), tbuf[: P * cc].view(P, cc)
            ea = e_aug[c0: c0 + cc]
            for k in range(K):
                plan.step(R, mats, ea, k)
                torch.exp(R, out=T)
                torch.sum(T, -1, out=part[k])
            if bool((part <= limit).all()):
                total.add_(part)
                continue
            # Some logit is far above its shift (or overflowed): redo the chunk with max shifts.
            delta = torch.zeros_like(shift)
            for k in range(K):
                plan.step(R, mats, ea, k)
                delta[k] = R.amax(-1).clamp_(min=0)
                torch.sub(R, delta[k].unsqueeze(-1), out=T).exp_()
                torch.sum(T, -1, out=part[k])
            total.mul_(torch.exp(-delta)).add_(part)
            shift.add_(delta)
            plan.set_shift(mats, shift)
        lse = shift + total.log()
        ctx.save_for_backward(hidden, items, labels, lse)
        ctx.plan, ctx.c = plan, c
        return (lse - label_logit).mean(1)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, items, labels, lse = ctx.saved_tensors
        grad_h, grad_e = _recompute_backward(ctx.plan, ctx.c, hidden, items, labels, lse, grad_out,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_h, grad_e, None, None, None


def _recompute_backward(plan, c, hidden, items, labels, lse, grad_out, need_h, need_e):
    """Gradients of ``sum_k grad_out_k * CE_k`` by recomputing each item chunk's logits."""
    K, (P, d), N = plan.K, hidden.shape, items.shape[0]
    hidden_c, items_c = hidden.contiguous(), items.contiguous()
    w = grad_out.to(hidden.dtype) / P  # [K] upstream weight of each size's mean CE
    # exp(logits - shift) = |w_k| * softmax_k. A size with w_k == 0 keeps its own lse as the shift
    # and its exponentials are zeroed instead: a huge shift (it was lse + 1e4) would be carried into
    # the next sizes' chained sums (logits_k - shift_k + H E^T + shift_k - shift_{k+1}) and cancel
    # there, leaving float32 rounding of 1e4 (~1e-3) in every later size's gradient.
    aw = w.abs()
    zero = [k for k in range(K) if not bool(aw[k] > 0)]
    shift = lse - torch.log(torch.where(aw > 0, aw, torch.ones_like(aw))).unsqueeze(1)
    negative = [k for k in range(K) if bool(w[k] < 0)]
    mats = plan.hidden_aug(hidden_c)
    plan.set_shift(mats, shift)
    grad_h = hidden.new_zeros(P, d) if need_h else None
    grad_et = hidden.new_empty(d, N) if need_e else None  # transposed: row blocks contiguous
    rbuf, sbuf = hidden.new_empty(P * c), hidden.new_empty(K * P * c)
    e_aug = plan.items_aug(items_c)
    for c0 in range(0, N, c):
        cc = min(c, N - c0)
        R, S = rbuf[: P * cc].view(P, cc), sbuf[: K * P * cc].view(K, P, cc)
        e_chunk = items_c[c0: c0 + cc]
        ea = e_aug[c0: c0 + cc]
        for k in range(K):
            plan.step(R, mats, ea, k)
            torch.exp(R, out=S[k])  # A_k = |w_k| softmax_k on this chunk
        for k in zero:
            S[k].zero_()
        for k in negative:
            S[k].neg_()
        for j in range(K - 2, -1, -1):  # G_j = sum_{k >= j} A_k
            S[j].add_(S[j + 1])
        for j, (a, b) in enumerate(plan.bounds):
            if need_h:
                grad_h[:, a:b].addmm_(S[j], e_chunk[:, a:b])
            if need_e:
                grad_et[a:b, c0: c0 + cc].addmm_(hidden_c[:, a:b].T, S[j], beta=0)
    # One-hot part: d logits_k[p, y_p] contributes -w_k; block j sees -sum_{k>=j} w_k.
    wj = w.flip(0).cumsum(0).flip(0)  # [K]
    scale = torch.cat([wj[j].expand(b - a) for j, (a, b) in enumerate(plan.bounds)])
    grad_e = None
    if need_h:
        grad_h.sub_(items_c.index_select(0, labels) * scale)
    if need_e:
        grad_e = grad_et.T.contiguous()
        grad_e.index_add_(0, labels, hidden_c * scale, alpha=-1)
    return grad_h, grad_e


def auto_row_block(num_sizes, num_rows, num_items, buffer_elems=None, hidden_size=0):
    """Rows per block of the single-pass path when ``row_block == 0``: a ~``buffer_elems``
    (default ``AUTO_ROW_BUFFER_ELEMS``) ``[K, r, N]`` buffer, r a multiple of 8 unless tiny, and
    at least ``hidden_size / 4`` rows: every block re-reads and re-writes the ``[d, N]``
    item-gradient accumulator, which at large d costs more than the buffer it saves
    (results/efficiency-d1024.md)."""
    r = (buffer_elems or AUTO_ROW_BUFFER_ELEMS) / max(1, num_sizes * num_items)
    r = max(8, int(r // 8) * 8, int(hidden_size // 4) // 8 * 8)
    return max(1, min(r, num_rows))


def _single_pass(plan, hidden, items, labels, weights, r, need_h, need_e, native=False):
    """Per-size mean CE ``[K]``, lse ``[K, P]`` and the gradients of ``sum_k weights_k * CE_k``
    wrt hidden and items, from one walk over blocks of ``r`` rows.

    Each block forms all K sizes' logits over all N items, exponentiates them once, and -- having
    the whole row, so the exact per-size normaliser -- turns them into
    ``G_j = sum_{k >= j} weights_k / P * softmax_k``; one GEMM per block and direction then gives
    the rows' hidden gradient and the block's contribution to the item gradient. 3 GEMMs of plain
    CE's size and K exps per logit in all. The elementwise middle runs in the compiled kernel
    (``native``: per-block partial products, then two cache-resident sweeps per row) or in PyTorch
    ops (chained GEMMs with the folded shift, then exp / sum / addcmul passes).
    """
    K, (P, d), N = plan.K, hidden.shape, items.shape[0]
    label_logit = _label_logits(hidden, items, labels, plan.bounds)  # [K, P]
    wp = (weights.to(device=hidden.device, dtype=hidden.dtype) / P).contiguous()
    need_g = need_h or need_e
    lse = hidden.new_empty(K, P)
    grad_h = hidden.new_empty(P, d) if need_h else None
    grad_et = hidden.new_empty(d, N) if need_e else None  # transposed: row blocks contiguous
    if native:
        item_blocks = [items[:, a:b].T for a, b in plan.bounds]  # [w_j N] views, no copy
        sbuf, lbuf = hidden.new_empty(K * r * N), hidden.new_empty(K * r)
    else:
        fill = _TorchBlock(plan, hidden, items, label_logit, wp, r, need_g)
    for p0 in range(0, P, r):
        rr = min(r, P - p0)
        rows = slice(p0, p0 + rr)
        if native:
            S = sbuf[: K * rr * N].view(K, rr, N)
            for j, (a, b) in enumerate(plan.bounds):
                torch.mm(hidden[rows, a:b], item_blocks[j], out=S[j])  # partial logits of block j
            lse_blk = lbuf[: K * rr].view(K, rr)
            with torch.profiler.record_function("fmrl::matryoshka_softmax"):
                native_kernel.matryoshka_softmax(S, wp, lse_blk, need_g)  # S[j] <- G_j
            lse[:, rows] = lse_blk
        else:
            S = fill(rows, lse)
        if not need_g:
            continue
        for j, (a, b) in enumerate(plan.bounds):
            if need_h:
                grad_h[rows, a:b].addmm_(S[j], items[:, a:b], beta=0)
            if need_e:
                grad_et[a:b].addmm_(hidden[rows, a:b].T, S[j], beta=0 if p0 == 0 else 1)
    loss = (lse - label_logit).mean(1)
    grad_e = None
    if need_g:  # one-hot part: block j sees -sum_{k>=j} wp_k at the label
        wj = wp.flip(0).cumsum(0).flip(0)
        scale = torch.cat([wj[j].expand(b - a) for j, (a, b) in enumerate(plan.bounds)])
        if need_h:
            grad_h.sub_(items.index_select(0, labels) * scale)
        if need_e:
            grad_e = grad_et.T.contiguous()
            grad_e.index_add_(0, labels, hidden * scale, alpha=-1)
    return loss, lse, grad_h, grad_e


class _TorchBlock:
    """The single pass's elementwise middle in PyTorch ops: for a block of rows, the K sizes'
    logits by chained GEMMs with the folded shift (the label logit, re-shifted by the row max
    where a sum of exponentials leaves [e^-50, e^50]), their exponentials, the block's lse and,
    if gradients are needed, ``G_j`` with one ``addcmul`` pass per size."""

    def __init__(self, plan, hidden, items, label_logit, wp, r, need_g):
        K, N = plan.K, items.shape[0]
        self.plan, self.wp, self.need_g = plan, wp, need_g
        self.shift = label_logit  # <= row max: every sum of exponentials is >= ~1
        self.mats = plan.hidden_aug(hidden)
        plan.set_shift(self.mats, self.shift)
        self.e_aug = plan.items_aug(items)
        self.rbuf = hidden.new_empty(r * N)
        self.sbuf = hidden.new_empty((K if need_g else 1) * r * N)
        self.sums = hidden.new_empty(K, r)

    def __call__(self, rows, lse):
        plan, K, N = self.plan, self.plan.K, self.e_aug.shape[0]
        rr = rows.stop - rows.start
        R = self.rbuf[: rr * N].view(rr, N)
        S = self.sbuf[: (K if self.need_g else 1) * rr * N].view(-1, rr, N)
        sums = self.sums[:, :rr]
        extra = torch.zeros_like(sums)  # additional per-row shift where the guard fired
        rm = [m[rows] for m in self.mats]
        limit = math.exp(_GUARD)
        carried = None  # per-row shift added by the guard so far; chained sizes inherit it via R
        for k in range(K):
            plan.step(R, rm, self.e_aug, k)  # R = logits_k - shift_k - carried for these rows
            T = S[k] if self.need_g else S[0]
            torch.exp(R, out=T)
            s = torch.sum(T, -1, out=sums[k])
            if not bool(((s <= limit) & (s >= 1 / limit)).all()):  # far from the shift: re-shift by the max
                delta = R.amax(-1)
                R.sub_(delta.unsqueeze(-1))  # in place, so the next (chained) sizes start shifted too
                torch.exp(R, out=T)
                torch.sum(T, -1, out=s)
                carried = delta if carried is None else carried.add_(delta)
            if carried is not None:
                extra[k] = carried
        lse[:, rows] = self.shift[:, rows] + extra + sums.log()
        if self.need_g:
            coef = self.wp.unsqueeze(1) / sums  # [K, rr]: G_k = coef_k * exp(...)
            S[K - 1].mul_(coef[K - 1].unsqueeze(-1))
            for j in range(K - 2, -1, -1):  # G_j = coef_j * S_j + G_{j+1}, one pass
                torch.addcmul(S[j + 1], S[j], coef[j].unsqueeze(-1), out=S[j])
        return S


def _scalar_multiple(g, w):
    """c with g == c * w (to a few ulps of g's dtype), or None."""
    if torch.equal(g, w.to(g.dtype)):
        return 1.0
    g64, w64 = g.double(), w.to(device=g.device, dtype=torch.float64)
    ww = float((w64 * w64).sum())
    if ww == 0.0:
        return 0.0 if not bool(g64.any()) else None
    c = float((g64 * w64).sum()) / ww
    tol = 4 * torch.finfo(g.dtype).eps
    if bool(((g64 - c * w64).abs() <= tol * (c * w64).abs() + 1e-300).all()):
        return c
    return None


class _MatryoshkaCESinglePass(torch.autograd.Function):
    """Forward computes the loss and the gradients for upstream ``weights``; backward reuses them
    when the upstream gradient is a multiple of ``weights``, else recomputes (exact for any)."""

    @staticmethod
    def forward(ctx, hidden, items, labels, sizes, weights, row_block, chunk_size, grad_enabled, native):
        plan = _Plan(sizes)
        # needs_input_grad is set from requires_grad even under torch.no_grad(): check both
        need_h, need_e = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        hidden_c, items_c = hidden.contiguous(), items.contiguous()
        loss, lse, grad_h, grad_e = _single_pass(plan, hidden_c, items_c, labels, weights,
                                                 row_block, need_h, need_e, native)
        ctx.save_for_backward(hidden, items, labels, lse)
        ctx.plan, ctx.c, ctx.weights = plan, chunk_size, weights
        ctx.grads = (grad_h, grad_e)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # The forward's gradients serve the first backward only (then freed); a second one through a
        # retained graph (retain_graph=True, autograd.grad twice) recomputes, exact for any upstream.
        grad_h, grad_e = ctx.grads if ctx.grads is not None else (None, None)
        first, ctx.grads = ctx.grads is not None, None
        c = _scalar_multiple(grad_out, ctx.weights) if first else None
        if c is None:  # upstream differs from the weights used in forward: recompute
            hidden, items, labels, lse = ctx.saved_tensors
            grad_h, grad_e = _recompute_backward(
                ctx.plan, ctx.c, hidden, items, labels, lse, grad_out,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        elif c != 1.0:
            grad_h = None if grad_h is None else grad_h * c
            grad_e = None if grad_e is None else grad_e * c
        if not ctx.needs_input_grad[0]:
            grad_h = None
        if not ctx.needs_input_grad[1]:
            grad_e = None
        return grad_h, grad_e, None, None, None, None, None, None, None


def matryoshka_cross_entropy(hidden, items, labels, sizes, chunk_size=0, weights=None,
                             row_block=0, native=None):
    """Per-size mean cross-entropy ``[K]`` over a full softmax on ``items``.

    hidden [P, d] states at labelled positions; items [N, d] the item table without the padding
    row; labels [P] row indices into ``items``; sizes increasing, sizes[-1] == d.

    ``chunk_size`` > 0: fused chunked path with that many items per chunk. ``chunk_size`` == 0:
    automatic -- the plain reference when K*P*N is small (on CUDA: when the K*P*N logits fit
    ``CUDA_PLAIN_BYTES``), else a fused path. ``chunk_size`` < 0: always the plain reference.
    Differentiable wrt ``hidden`` and ``items``; the backward pass honours any per-size upstream
    weights.

    ``weights`` [K] (optional): the upstream gradient the caller expects (e.g. the per-size loss
    weights when the caller returns ``sum_k weights_k * CE_k``). With it (and ``chunk_size`` >= 0
    not picking the plain path) the single-pass variant is used: the forward walks blocks of
    ``row_block`` rows (0: ``auto_row_block``) and computes the gradients along with the loss;
    backward returns them (scaled, if the upstream is a multiple of ``weights``) or, for any
    other upstream, falls back to the chunked recompute with ``chunk_size`` items per chunk.

    ``native`` (single pass on the CPU, fp32): None uses the compiled kernel (``native.py``) when
    it builds and the inputs are finite, True requires it, False uses PyTorch ops only.
    """
    sizes = tuple(check_sizes(sizes, hidden.shape[-1], key="sizes"))
    K, P, N = len(sizes), hidden.shape[0], items.shape[0]
    if weights is not None:
        weights = torch.as_tensor(weights).detach()
        if weights.shape != (K,):
            raise ValueError(f"weights: need shape ({K},), got {tuple(weights.shape)}")
    path, r, c = choose_path(hidden.device.type, hidden.element_size(), K, P, N, chunk_size,
                             weights is not None, row_block, hidden.shape[-1])
    if path == "reference":
        return matryoshka_cross_entropy_reference(hidden, items, labels, sizes)
    if path == "single":
        use_native = _use_native(native, hidden, items, K)
        return _MatryoshkaCESinglePass.apply(hidden, items, labels, sizes, weights, r, c,
                                             torch.is_grad_enabled(), use_native)
    return _MatryoshkaCE.apply(hidden, items, labels, sizes, c)


def _use_native(native, hidden, items, K):
    if native is False:
        return False
    if native and not native_kernel.usable(hidden, K):
        raise RuntimeError(f"native=True: the compiled loss kernel cannot serve {hidden.dtype} on "
                           f"{hidden.device} with {K} sizes ({native_kernel.error() or 'fp32 CPU only'})")
    if native is None and not native_kernel.usable(hidden, K):
        return False
    # -ffinite-math-only kernel: non-finite inputs go to the PyTorch path, which propagates them. A
    # sum is nan/inf if any element is (one pass, no [P, d] masks); a sum that merely overflows
    # also takes the PyTorch path, which is still exact.
    return bool(torch.isfinite(hidden.sum() + items.sum()))


def choose_path(device_type, elem_size, K, P, N, chunk_size=0, has_weights=False, row_block=0, d=0):
    """``(path, rows per block, items per chunk)`` used by ``matryoshka_cross_entropy``; path is
    ``"reference"`` (materialise), ``"single"`` (single pass) or ``"chunked"`` (item chunks,
    recompute in backward)."""
    if P == 0 or chunk_size < 0:
        return "reference", 0, 0
    cuda = device_type == "cuda"
    if chunk_size == 0 and ((K * P * N * elem_size <= CUDA_PLAIN_BYTES) if cuda
                            else (K * P * N < AUTO_PLAIN_BELOW)):
        return "reference", 0, 0
    budget = CUDA_PLAIN_BYTES // elem_size if cuda else None
    c = int(chunk_size) or auto_chunk_size(K, P, N, budget)
    if has_weights:
        return "single", int(row_block) or auto_row_block(K, P, N, budget, d), c
    return "chunked", 0, c
