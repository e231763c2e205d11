"""Linear Recurrent Unit (Orvieto et al. 2023; LRURec, Yue et al. 2024) with nested projections.

h_t = lambda * h_{t-1} + gamma * (B u_t),   y_t = Re(C h_t)   (fMRLRec eq. 8-9)

lambda = exp(-exp(nu_log) + i exp(theta_log)) is diagonal, so every state dimension is its own
recurrence and the first m state dims depend only on the first m inputs once B and C are nested.
Complex B and C are kept as real/imaginary NestedLinear pairs and applied with one real GEMM
each, which is faster than complex GEMMs on CPU and keeps the parameter prefix structure.
"""
import math

import torch
from torch import nn

from recbole_fmrl.model.nested import NestedLinear


def lambda_powers(log_mod, phase, steps, dtype=None):
    """Real and imaginary parts of lam^k for k in ``steps`` [L]: |lam|^k (cos k.theta, sin k.theta), [L S] each.

    Computed from logs, never as lam^-k, so nothing overflows when |lam| is small. ``dtype`` (serving:
    float64) computes in that precision and rounds once to the parameters' dtype: in float32, cos(k theta)
    at k ~ 100 already loses ~1e-5. Training keeps the parameters' dtype (differentiable, fast).
    """
    out = log_mod.dtype
    work = dtype or out
    k = steps.to(work)[:, None]
    mag = torch.exp(k * log_mod.to(work))
    phase = phase.to(work)
    return (mag * torch.cos(k * phase)).to(out), (mag * torch.sin(k * phase)).to(out)


def scan_doubling(xr, xi, log_mod, phase):
    """Causal scan h_t = lam*h_{t-1} + x_t by recursive doubling: ceil(log2 L) elementwise steps.

    x = xr + i xi is [B L D]; lam = exp(log_mod + i phase) is [D]. After the step with offset k
    every position holds the sum over its last 2k inputs.
    """
    length, k = xr.shape[1], 1
    while k < length:
        pr, pi = lambda_powers(log_mod, phase, torch.tensor([k], device=xr.device))
        ar, ai = xr[:, :-k], xi[:, :-k]
        xr = torch.cat([xr[:, :k], xr[:, k:] + pr * ar - pi * ai], dim=1)
        xi = torch.cat([xi[:, :k], xi[:, k:] + pr * ai + pi * ar], dim=1)
        k *= 2
    return xr, xi


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def pair_kernel(log_mod, phase, length):
    """Per-channel real matrices M [D 2L 2L] with [hr | hi] = [xr | xi] @ M for the causal scan.

    M = [[Kr^T, Ki^T], [-Ki^T, Kr^T]] where K[t, s] = lam^(t-s) for s <= t (a Toeplitz kernel).
    """
    steps = torch.arange(length, device=log_mod.device)
    lag = steps[None, :] - steps[:, None]  # [L(s) L(t)] = t - s
    pr, pi = lambda_powers(log_mod, phase, steps)  # [L D]
    causal = (lag >= 0).to(pr.dtype)[..., None]
    kr, ki = pr[lag.clamp(min=0)] * causal, pi[lag.clamp(min=0)] * causal  # [L L D], K^T parts
    return torch.cat([torch.cat([kr, ki], 1), torch.cat([-ki, kr], 1)], 0).permute(2, 0, 1).contiguous()


def scan_channels(x, log_mod, phase):
    """Dense causal scan on channel-major inputs x [D B 2L] (real | imaginary over time).

    O(L^2 D) work in one batched GEMM: at L <= 64 this beats log2(L) elementwise passes, which
    are memory-bound. Channel-major layout keeps every operand contiguous for MKL/cuBLAS.
    """
    return _ContiguousGrad.apply(torch.bmm(x, pair_kernel(log_mod, phase, x.shape[-1] // 2)))


def scan_dense(xr, xi, log_mod, phase):
    """``scan_channels`` for [B L D] inputs (the layer avoids these transposes; tests use this)."""
    length = xr.shape[1]
    h = scan_channels(torch.cat([xr, xi], dim=1).permute(2, 0, 1).contiguous(), log_mod, phase)  # [D B 2L]
    h = h.permute(1, 2, 0)  # [B 2L D]
    return h[:, :length], h[:, length:]


def scan_sequential(xr, xi, log_mod, phase):
    """Step-by-step complex recurrence: the slow reference the parallel scans are tested against."""
    lam = torch.exp(torch.complex(log_mod, phase))
    x, h, out = torch.complex(xr, xi), torch.zeros_like(torch.complex(xr[:, 0], xi[:, 0])), []
    for t in range(x.shape[1]):
        h = lam * h + x[:, t]
        out.append(h)
    out = torch.stack(out, dim=1)
    return out.real, out.imag


SCANS = {"doubling": scan_doubling, "dense": scan_dense, "sequential": scan_sequential}

# Scans of right-padded batches z [B L 2S] (real | imaginary), what inference runs (``FMRLBlock.infer``).


def causal_kernels(pr, pi):
    """Toeplitz kernels K[c, t, s] = lambda_c^(t-s) for s <= t, real and imaginary: [S L L] each."""
    steps = torch.arange(pr.shape[0], device=pr.device)
    lag = steps[:, None] - steps[None, :]  # [L(t) L(s)]
    causal, index = (lag >= 0).to(pr.dtype), lag.clamp(min=0)
    return (pr.T[:, index] * causal).contiguous(), (pi.T[:, index] * causal).contiguous()


def scan_toeplitz(z, kr, ki):
    """States at every position: z [B L 2S] -> [B L 2S], with kernels [S >=L >=L] (first L used); what ONNX
    runs (a recurrence would unroll to the traced length). Channel-major contiguous operands: a batched
    GEMM on permuted views runs many times slower on CPU."""
    length, states = z.shape[1], kr.shape[0]
    kr, ki = kr[:, :length, :length], ki[:, :length, :length]
    zr = z[..., :states].permute(2, 1, 0).contiguous()  # [S L B]
    zi = z[..., states:].permute(2, 1, 0).contiguous()
    hr = torch.bmm(kr, zr) - torch.bmm(ki, zi)
    hi = torch.bmm(ki, zr) + torch.bmm(kr, zi)
    return torch.cat([hr, hi], 0).permute(2, 1, 0)  # [B L 2S]


def recurrence_step(z, h, lam_a, lam_b):
    """h' = lambda h + z on real pairs [.. 2S]: ``lam_a`` = [Re lambda | Re lambda], ``lam_b`` = [-Im lambda | Im lambda]."""
    return torch.addcmul(torch.addcmul(z, h, lam_a), h.roll(h.shape[-1] // 2, -1), lam_b)


def scan_recurrent(z, lam_a, lam_b):
    """States at every position by the recurrence: z [B L 2S] -> [B L 2S] (O(L B S) work). On a CPU this
    beats the O(L^2 B S) Toeplitz product at every batch size."""
    h, out = torch.zeros_like(z[:, 0]), []
    for t in range(z.shape[1]):
        h = recurrence_step(z[:, t], h, lam_a, lam_b)
        out.append(h)
    return torch.stack(out, 1)


def scan_last(z, lengths, pr, pi):
    """State at each sequence's last real position: z [B L 2S], lengths [B], powers [>=L S] -> [B 2S]."""
    length, states = z.shape[1], pr.shape[1]
    steps = torch.arange(length, device=z.device)
    lag = lengths[:, None] - 1 - steps[None, :]  # [B L]
    valid = (lag >= 0).to(z.dtype)[..., None]
    kr, ki = pr[lag.clamp(min=0)] * valid, pi[lag.clamp(min=0)] * valid  # [B L S]
    zr, zi = z[..., :states], z[..., states:]
    return torch.cat([(kr * zr - ki * zi).sum(1), (kr * zi + ki * zr).sum(1)], -1)


class Packing:
    """Where the real tokens of a right-padded batch are: sequence ops scatter/gather with it.

    Position-wise layers (projections, norms, feed-forward) then run on the V real tokens only,
    not on B x L padded slots: on Amazon data (mean length ~9, window 50) that is ~8x less work.
    The scan runs on [B, L_max] with L_max the longest sequence in the batch; causality makes the
    padding after each sequence irrelevant, so no carry mask is needed.
    """

    def __init__(self, lengths, max_length=None):
        self.lengths, self.batch = lengths, lengths.shape[0]
        self.length = int(lengths.max()) if max_length is None else max_length
        self.mask = torch.arange(self.length, device=lengths.device)[None, :] < lengths[:, None]  # [B L]
        self.index = self.mask.flatten().nonzero().squeeze(1)  # [V] into B*L, row-major
        self.last = torch.cumsum(lengths, 0) - 1  # [B] token index of each sequence's last item
        self._buckets = None

    def gather(self, padded):  # [B L ...] right-padded -> [V ...], the real tokens in packed order
        return padded[:, : self.length].flatten(0, 1)[self.index]

    def buckets(self, min_saving=1 / 3):
        """Length buckets for the scan: ``[(Packing of a bucket, its token ids in V or None)]``.

        A scan over [B, L] costs ~B L^2 (dense kernel) however short most sequences are; on Amazon
        data (mean length ~9, window 50) most of it is padding. The sequences are split at the
        length t minimising n_short t^2 + n_long L^2 when that saves at least ``min_saving`` of
        B L^2; else one bucket (``None``: every token, in order). Computed once per batch.
        """
        if self._buckets is None:
            self._buckets = [(self, None)]
            if self.batch > 1:
                full = self.batch * self.length**2
                counts = torch.bincount(self.lengths.cpu(), minlength=self.length + 1)[: self.length]  # t < L only
                short = counts.cumsum(0)  # [L] sequences of length <= t
                steps = torch.arange(self.length)
                cost = torch.where(counts > 0, short * steps**2 + (self.batch - short) * self.length**2, full)
                t = int(cost.argmin())  # first minimum: the shortest split among equal costs
                if int(cost[t]) <= (1 - min_saving) * full:
                    starts = self.last + 1 - self.lengths  # [B] first token of each sequence
                    self._buckets = [self._sub(self.lengths <= t, t, starts), self._sub(self.lengths > t, self.length, starts)]
        return self._buckets

    def _sub(self, chosen, length, starts):
        rows = chosen.nonzero().squeeze(1)
        sub = Packing(self.lengths[rows], length)
        tokens = starts[rows][sub.index // length] + sub.index % length  # [V_sub] token ids in V
        return sub, tokens

    @classmethod
    def full(cls, batch, length, device=None):
        return cls(torch.full((batch,), length, dtype=torch.long, device=device), length)


class LRULayer(nn.Module):
    """Nested complex LRU with ring-initialised eigenvalues.

    The state has ``state_ratio`` x the hidden size (fMRLRec: 1; LRURec: 2), nested as
    state_ratio * sizes so that a size-m model keeps the first state_ratio * m state dims.
    """

    def __init__(self, sizes, r_min=0.0, r_max=0.1, max_phase=2 * math.pi, dropout=0.1, scan="dense", bias=True,
                 state_ratio=1):
        super().__init__()
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"LRU ring radii need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        if scan not in SCANS:
            raise ValueError(f"unknown LRU scan {scan!r}; expected one of {sorted(SCANS)}")
        self.sizes, self.scan = list(sizes), scan
        self.bucketing = True  # scan short and long sequences separately (Packing.buckets); off: one padded scan
        states = [state_ratio * m for m in self.sizes]
        self.state_size = states[-1]
        self.in_re = NestedLinear(sizes, states, bias)  # B, real part
        self.in_im = NestedLinear(sizes, states, bias)  # B, imaginary part
        self.out_re = NestedLinear(states, sizes, bias)  # C, real part (its bias is Re(b_C))
        self.out_im = NestedLinear(states, sizes, bias=False)  # C, imaginary part
        self.params_log = nn.Parameter(torch.empty(3, self.state_size))  # rows: nu_log, theta_log, gamma_log
        self.dropout = nn.Dropout(dropout)
        self.reset_lru_parameters(r_min, r_max, max_phase)

    @torch.no_grad()
    def reset_lru_parameters(self, r_min, r_max, max_phase):
        d = self.state_size
        u1, u2 = torch.rand(d), torch.rand(d)
        mod_sq = (u1 * (r_max**2 - r_min**2) + r_min**2).clamp(min=1e-8)  # |lambda|^2 on the ring
        self.params_log[0] = torch.log(-0.5 * torch.log(mod_sq))
        self.params_log[1] = torch.log((max_phase * u2).clamp(min=1e-4))
        self.params_log[2] = 0.5 * torch.log1p(-mod_sq)
        # Imaginary parts start at zero, as in the reference; they learn through Re(C h).
        self.in_im.weight.zero_()
        if self.in_im.bias is not None:
            self.in_im.bias.zero_()
        self.out_im.weight.zero_()

    def log_lambda(self):
        """(log|lambda|, arg lambda), each [d]."""
        nu_log, theta_log, _ = self.params_log
        return -torch.exp(nu_log), torch.exp(theta_log)

    def projections(self):
        """(w_in [2S d], b_in [2S] or None, w_out [d 2S], b_out [d] or None): B = [B_re ; B_im] scaled by
        gamma and C = [C_re | -C_im], so that x = B u + b and y = C [h_re ; h_im] + b_C are one GEMM each."""
        gamma = torch.exp(self.params_log[2]).repeat(2)  # [2S], scales real and imaginary parts
        w_in = torch.cat([self.in_re.masked_weight(), self.in_im.masked_weight()]) * gamma[:, None]  # [2S d]
        b_in = None if self.in_re.bias is None else torch.cat([self.in_re.bias, self.in_im.bias]) * gamma
        w_out = torch.cat([self.out_re.masked_weight(), -self.out_im.masked_weight()], dim=1)  # [d 2S]
        return w_in, b_in, w_out, self.out_re.bias

    def forward(self, u, packing=None):
        """u: [B L d] (every position real), or [V d] real tokens laid out by ``packing``."""
        if packing is None:
            batch, length, d = u.shape
            return self.forward(u.reshape(batch * length, d), Packing.full(batch, length, u.device)).view(u.shape)
        w_in, b_in, w_out, b_out = self.projections()
        # Channel-major: B u^T as one GEMM gives [2S, V]; only L-long runs move after that.
        xt = torch.mm(w_in, u.t()) if b_in is None else torch.addmm(b_in[:, None], w_in, u.t())  # [2S V]
        buckets = packing.buckets() if self.bucketing else [(packing, None)]
        if len(buckets) == 1:
            ht = self._scan_tokens(xt, packing)  # [2S V]
        else:  # each bucket scans its own sequences at its own length; tokens go back in V order
            parts = [self._scan_tokens(xt.index_select(1, tokens), sub) for sub, tokens in buckets]
            order = torch.cat([tokens for _, tokens in buckets]).argsort()
            ht = torch.cat(parts, 1).index_select(1, order)
        y = torch.mm(ht.t(), w_out.t())  # [V d]
        if b_out is not None:
            y = y + b_out
        return self.dropout(y)

    def _scan_tokens(self, xt, packing):
        """Scan of the real tokens ``xt`` [2S V] laid out by ``packing``: states [2S V]."""
        states, batch, length = self.state_size, packing.batch, packing.length
        grid = xt.new_zeros(2 * states, batch * length).index_copy(1, packing.index, xt)  # [2S B*L]
        if self.scan == "dense":
            x = grid.view(2, states, batch, length).permute(1, 2, 0, 3).reshape(states, batch, 2 * length)
            h = scan_channels(x, *self.log_lambda())  # [S B 2L]
            ht = h.view(states, batch, 2, length).permute(2, 0, 1, 3).reshape(2 * states, batch * length)
        else:
            x = grid.view(2, states, batch, length).permute(0, 2, 3, 1)  # [2 B L S]
            hr, hi = SCANS[self.scan](x[0], x[1], *self.log_lambda())  # [B L S] x2
            ht = torch.stack([hr, hi]).permute(0, 3, 1, 2).reshape(2 * states, batch * length)
        return ht.index_select(1, packing.index)
