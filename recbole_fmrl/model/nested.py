"""Matryoshka ("fMRL") building blocks: nested linear layers and nested LayerNorm.

Sizes m_1 < ... < m_K split every hidden vector into increment blocks [m_{k-1}, m_k). A nested
linear lets output block k read only inputs [0, in_k): its weight is block lower-triangular, so
the first m_k outputs of the full layer are exactly the size-m_k layer applied to the first
in_k inputs (fMRLRec eq. 2-5). Square (in = out = M), up-scale (out = r*M) and down-scale
(in = r*M) layers are the same class with different boundary lists.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


def default_sizes(hidden_size: int, smallest: int = 8) -> list:
    """Powers of two from ``smallest`` up to ``hidden_size`` (always ending at hidden_size)."""
    sizes, m = [], smallest
    while m < hidden_size:
        sizes.append(m)
        m *= 2
    return sizes + [hidden_size]


def block_bounds(sizes) -> list:
    """Increment blocks [(0, m_1), (m_1, m_2), ...] of increasing sizes."""
    edges = [0] + list(sizes)
    return list(zip(edges[:-1], edges[1:]))


def check_sizes(sizes, hidden_size: int, key: str = "fmrl_sizes") -> list:
    """Validate a nesting list; errors name the config key (or argument) ``key``."""
    sizes = [int(s) for s in sizes]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"{key}: sizes must be positive integers, got {sizes}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{key}: sizes must be strictly increasing, got {sizes}")
    if sizes[-1] != hidden_size:
        raise ValueError(f"{key}: the last size ({sizes[-1]}) must equal hidden_size ({hidden_size})")
    return sizes


def staircase_mask(in_sizes, out_sizes):
    """Bool [out, in]: True where output row r (in block k) may read input column c < in_k."""
    mask = torch.zeros(out_sizes[-1], in_sizes[-1], dtype=torch.bool)
    for i_k, (lo, o_k) in zip(in_sizes, block_bounds(out_sizes)):
        mask[lo:o_k, :i_k] = True
    return mask


def nested_numel(in_sizes, out_sizes, bias=True):
    """Parameters of the non-zero blocks only: the count the paper (and this project) reports."""
    return sum((o - lo) * (i + int(bias)) for (lo, o), i in zip(block_bounds(out_sizes), in_sizes))


class NestedLinear(nn.Module):
    """Block lower-triangular linear layer, stored dense with a fixed staircase mask.

    Dense-plus-mask runs one GEMM instead of K small ones (faster for the K <= 10 sizes used
    here, results/efficiency.md); the masked-out entries are kept at zero and receive zero gradient. Each output
    block is initialised like an nn.Linear with its own fan-in in_k, as in the reference.
    """

    def __init__(self, in_sizes, out_sizes, bias=True):
        super().__init__()
        if len(in_sizes) != len(out_sizes):
            raise ValueError(f"in_sizes {in_sizes} and out_sizes {out_sizes} differ in length")
        self.in_sizes, self.out_sizes = list(in_sizes), list(out_sizes)
        self.weight = nn.Parameter(torch.empty(out_sizes[-1], in_sizes[-1]))
        self.bias = nn.Parameter(torch.empty(out_sizes[-1])) if bias else None
        self.register_buffer("mask", staircase_mask(self.in_sizes, self.out_sizes), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for i_k, (lo, o_k) in zip(self.in_sizes, block_bounds(self.out_sizes)):
            bound = 1.0 / math.sqrt(i_k)
            self.weight[lo:o_k].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias[lo:o_k].uniform_(-bound, bound)
        self.weight.mul_(self.mask)

    def masked_weight(self):
        return self.weight * self.mask

    def forward(self, x):  # [..., in] -> [..., out]
        return F.linear(x, self.masked_weight(), self.bias)

    def nested_numel(self):
        return nested_numel(self.in_sizes, self.out_sizes, self.bias is not None)

    def extra_repr(self):
        return f"in_sizes={self.in_sizes}, out_sizes={self.out_sizes}, bias={self.bias is not None}"


class NestedLayerNorm(nn.Module):
    """One LayerNorm per increment block, so a size-m sub-model sees exactly its own statistics.

    Implemented without a Python loop over blocks: per-block sums are scattered into a [..., K]
    tensor, which keeps the op count independent of K.
    """

    def __init__(self, sizes, eps=1e-5):
        super().__init__()
        self.sizes, self.eps = list(sizes), eps
        widths = [b - a for a, b in block_bounds(self.sizes)]
        self.weight = nn.Parameter(torch.ones(self.sizes[-1]))
        self.bias = nn.Parameter(torch.zeros(self.sizes[-1]))
        block_of = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        self.register_buffer("block_of", block_of, persistent=False)  # [d] block index per dim
        self.register_buffer("width", torch.tensor(widths, dtype=torch.float), persistent=False)

    def forward(self, x):  # [..., d]
        return self.standardize(x) * self.weight + self.bias

    def standardize(self, x, averaging=None):
        """Each block at zero mean and unit variance, without the affine (inference folds that into the
        next linear). With ``averaging`` (``averaging()``) and at most 8 rows, two GEMMs replace the
        scatters: fewer ops where per-op overhead dominates (streaming, one event at a time)."""
        if averaging is not None and x.dim() == 2 and x.shape[0] <= 8:
            centred = torch.addmm(x, x, averaging, alpha=-1)
            return centred * torch.rsqrt(torch.addmm(x.new_full((), self.eps), centred * centred, averaging))
        k = len(self.sizes)
        idx = self.block_of.expand(*x.shape[:-1], -1)
        width = self.width.to(x.dtype)  # integers: exact in any float dtype
        mean = x.new_zeros(*x.shape[:-1], k).scatter_add_(-1, idx, x) / width  # [..., K]
        centred = x - mean.gather(-1, idx)
        var = x.new_zeros(*x.shape[:-1], k).scatter_add_(-1, idx, centred * centred) / width
        return centred * torch.rsqrt(var + self.eps).gather(-1, idx)

    def averaging(self):
        """[d d] matrix whose product with x gives each dim its block's mean (symmetric)."""
        mat = self.weight.new_zeros(self.sizes[-1], self.sizes[-1])
        for a, b in block_bounds(self.sizes):
            mat[a:b, a:b] = 1.0 / (b - a)
        return mat
