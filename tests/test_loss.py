"""Fused chunked Matryoshka cross-entropy == materialising reference (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from recbole_fmrl.model import loss as L
from recbole_fmrl.model.loss import (
    _MatryoshkaCE,
    matryoshka_cross_entropy,
    matryoshka_cross_entropy_reference,
)


def _inputs(P, N, d, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(P, d, generator=g, dtype=dtype) * scale).requires_grad_()
    items = (torch.randn(N, d, generator=g, dtype=dtype) * scale).requires_grad_()
    labels = torch.randint(0, N, (P,), generator=g)
    return hidden, items, labels


def _value_and_grads(fn, hidden, items, weights):
    out = fn()
    grads = torch.autograd.grad((out * weights).sum(), [hidden, items])
    return out.detach(), grads


CASES = [  # P, N, sizes, chunk
    (37, 101, [4, 8, 16], 16),      # N not divisible by chunk
    (37, 101, [4, 8, 16], 101),     # one exact chunk
    (37, 101, [4, 8, 16], 1000),    # chunk > N
    (50, 333, [2, 6, 32, 64], 64),
    (50, 333, [2, 6, 32, 64], 7),
    (20, 50, [16], 7),              # K = 1
    (1, 9, [1, 3], 2),
]


@pytest.mark.parametrize("P,N,sizes,chunk", CASES)
def test_fused_matches_reference_float64(P, N, sizes, chunk):
    hidden, items, labels = _inputs(P, N, sizes[-1], torch.float64, scale=0.7)
    w = torch.randn(len(sizes), dtype=torch.float64)  # arbitrary upstream weights, signs included
    ref, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items, w)
    out, gout = _value_and_grads(
        lambda: matryoshka_cross_entropy(hidden, items, labels, sizes, chunk), hidden, items, w)
    assert out.shape == (len(sizes),)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gout[0], gref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gout[1], gref[1], rtol=1e-10, atol=1e-12)


def test_k1_equals_plain_cross_entropy():
    hidden, items, labels = _inputs(40, 77, 12, torch.float64)
    out = matryoshka_cross_entropy(hidden, items, labels, [12], 10)
    gh, ge = torch.autograd.grad(out.sum(), [hidden, items])
    plain = F.cross_entropy(hidden @ items.T, labels)
    ph, pe = torch.autograd.grad(plain, [hidden, items])
    torch.testing.assert_close(out[0], plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, ph, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ge, pe, rtol=1e-10, atol=1e-12)


def test_zero_and_negative_weights():
    hidden, items, labels = _inputs(30, 90, 16, torch.float64)
    sizes = [4, 8, 16]
    for w in ([0.0, 1.0, 0.0], [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]):
        w = torch.tensor(w, dtype=torch.float64)
        _, gref = _value_and_grads(
            lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items, w)
        _, gout = _value_and_grads(
            lambda: matryoshka_cross_entropy(hidden, items, labels, sizes, 32), hidden, items, w)
        torch.testing.assert_close(gout[0], gref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gout[1], gref[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [4.0, 12.0])
def test_large_logits_overflow_guard(scale):
    """Logits far above the label logit trigger the max-shift recomputation; still exact."""
    hidden, items, labels = _inputs(25, 200, 16, torch.float32, scale=scale, seed=3)
    sizes = [8, 16]
    w = torch.tensor([0.3, 1.0])
    hd, it = hidden.detach().double().requires_grad_(), items.detach().double().requires_grad_()
    ref, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hd, it, labels, sizes), hd, it, w.double())
    out, gout = _value_and_grads(
        lambda: matryoshka_cross_entropy(hidden, items, labels, sizes, 64), hidden, items, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gout[0].double(), gref[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gout[1].double(), gref[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("chunk", [0, 96, 500])
def test_float32_close(chunk):
    hidden, items, labels = _inputs(64, 500, 32, torch.float32, scale=0.5, seed=1)
    sizes = [4, 8, 16, 32]
    w = torch.rand(len(sizes)) + 0.1
    ref, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items, w)
    out, gout = _value_and_grads(
        lambda: matryoshka_cross_entropy(hidden, items, labels, sizes, chunk), hidden, items, w)
    assert out.dtype == torch.float32 and gout[0].dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gout[0], gref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gout[1], gref[1], rtol=1e-4, atol=1e-6)


def test_auto_chunk_uses_fused_path_for_large_inputs(monkeypatch):
    calls = []
    orig = _MatryoshkaCE.apply
    monkeypatch.setattr(_MatryoshkaCE, "apply", lambda *a: calls.append(a[4]) or orig(*a))
    hidden, items, labels = _inputs(8, 10, 8, torch.float32)
    matryoshka_cross_entropy(hidden, items, labels, [4, 8])  # tiny: plain reference path
    assert calls == []
    monkeypatch.setattr(L, "AUTO_PLAIN_BELOW", 0)
    matryoshka_cross_entropy(hidden, items, labels, [4, 8])
    assert len(calls) == 1 and calls[0] >= 1


def test_only_inputs_and_lse_are_saved():
    """No [K, P, N] (or [P, N]) intermediate is kept for backward."""
    P, N, sizes = 30, 400, [4, 8, 16]
    hidden, items, labels = _inputs(P, N, 16, torch.float32)
    out = matryoshka_cross_entropy(hidden, items, labels, sizes, 64)
    saved = out.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) <= hidden.numel() + items.numel() + P + len(sizes) * P
    assert all(t.numel() < P * N for t in saved)


def test_only_hidden_or_only_items_requires_grad():
    hidden, items, labels = _inputs(20, 60, 8, torch.float64)
    sizes = [2, 8]
    ref = matryoshka_cross_entropy_reference(hidden, items, labels, sizes).sum()
    gh_ref, ge_ref = torch.autograd.grad(ref, [hidden, items])
    h2 = hidden.detach().requires_grad_()
    out = matryoshka_cross_entropy(h2, items.detach(), labels, sizes, 16).sum()
    torch.testing.assert_close(torch.autograd.grad(out, h2)[0], gh_ref)
    e2 = items.detach().requires_grad_()
    out = matryoshka_cross_entropy(hidden.detach(), e2, labels, sizes, 16).sum()
    torch.testing.assert_close(torch.autograd.grad(out, e2)[0], ge_ref)


def test_bad_sizes_rejected():
    hidden, items, labels = _inputs(4, 10, 8, torch.float32)
    with pytest.raises(ValueError):
        matryoshka_cross_entropy(hidden, items, labels, [4, 6])
    with pytest.raises(ValueError):
        matryoshka_cross_entropy(hidden, items, labels, [8, 4, 8])


# --- single-pass variant (weights known up front: gradients computed during the forward) ---

SP_CASES = [  # P, N, sizes, row_block
    (37, 101, [4, 8, 16], 8),       # P not divisible by the row block
    (37, 101, [4, 8, 16], 37),      # one exact block
    (37, 101, [4, 8, 16], 1000),    # block > P
    (50, 333, [2, 6, 32, 64], 16),
    (50, 333, [2, 6, 32, 64], 3),
    (20, 50, [16], 7),              # K = 1
    (1, 9, [1, 3], 2),
]


def _sp(hidden, items, labels, sizes, w, r, chunk=16):
    return lambda: matryoshka_cross_entropy(hidden, items, labels, sizes, chunk, weights=w, row_block=r)


@pytest.mark.parametrize("P,N,sizes,r", SP_CASES)
def test_single_pass_matches_reference_float64(P, N, sizes, r):
    hidden, items, labels = _inputs(P, N, sizes[-1], torch.float64, scale=0.7)
    w = torch.randn(len(sizes), dtype=torch.float64)  # signs included
    ref, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items, w)
    out = _sp(hidden, items, labels, sizes, w, r)()
    assert out.grad_fn.__class__.__name__.startswith("_MatryoshkaCESinglePass")
    gout = torch.autograd.grad((out * w).sum(), [hidden, items])
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gout[0], gref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gout[1], gref[1], rtol=1e-10, atol=1e-12)


def test_single_pass_reuses_forward_gradients(monkeypatch):
    """Upstream == weights (or a multiple of them): no recompute in backward."""
    calls = []
    orig = L._recompute_backward
    monkeypatch.setattr(L, "_recompute_backward", lambda *a: calls.append(1) or orig(*a))
    hidden, items, labels = _inputs(30, 90, 16, torch.float64, scale=0.7)
    sizes, w = [4, 8, 16], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for mult in (1.0, 2.5, 0.0):
        _, gref = _value_and_grads(
            lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items,
            w * mult)
        out = _sp(hidden, items, labels, sizes, w, 8)()
        gout = torch.autograd.grad((out * (w * mult)).sum(), [hidden, items])
        torch.testing.assert_close(gout[0], gref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gout[1], gref[1], rtol=1e-10, atol=1e-12)
    assert calls == []


@pytest.mark.parametrize("upstream", [[1.0, 1.0, 1.0], [0.2, 0.3, 0.51], [0.0, 1.0, 0.0],
                                      [1.0, -2.0, 0.5]])
def test_single_pass_mismatched_upstream_falls_back(upstream, monkeypatch):
    calls = []
    orig = L._recompute_backward
    monkeypatch.setattr(L, "_recompute_backward", lambda *a: calls.append(1) or orig(*a))
    hidden, items, labels = _inputs(30, 90, 16, torch.float64, scale=0.7)
    sizes, w = [4, 8, 16], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    g = torch.tensor(upstream, dtype=torch.float64)
    _, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items, g)
    out = _sp(hidden, items, labels, sizes, w, 8, chunk=32)()
    gout = torch.autograd.grad((out * g).sum(), [hidden, items])
    torch.testing.assert_close(gout[0], gref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gout[1], gref[1], rtol=1e-10, atol=1e-12)
    assert calls == [1]


def test_single_pass_k1_equals_plain_cross_entropy():
    hidden, items, labels = _inputs(40, 77, 12, torch.float64)
    out = matryoshka_cross_entropy(hidden, items, labels, [12], 10, weights=torch.ones(1),
                                   row_block=16)
    gh, ge = torch.autograd.grad(out.sum(), [hidden, items])
    plain = F.cross_entropy(hidden @ items.T, labels)
    ph, pe = torch.autograd.grad(plain, [hidden, items])
    torch.testing.assert_close(out[0], plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, ph, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ge, pe, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("r", [0, 16, 64])
def test_single_pass_float32_close(r):
    hidden, items, labels = _inputs(64, 500, 32, torch.float32, scale=0.5, seed=1)
    sizes = [4, 8, 16, 32]
    w = torch.rand(len(sizes)) + 0.1
    ref, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hidden, items, labels, sizes), hidden, items, w)
    out = _sp(hidden, items, labels, sizes, w, r, chunk=0 if r == 0 else 64)()
    gout = torch.autograd.grad((out * w).sum(), [hidden, items])
    assert out.dtype == torch.float32 and gout[0].dtype == torch.float32
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gout[0], gref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gout[1], gref[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [4.0, 12.0])
def test_single_pass_large_logits_overflow_guard(scale):
    hidden, items, labels = _inputs(25, 200, 16, torch.float32, scale=scale, seed=3)
    sizes = [8, 16]
    w = torch.tensor([0.3, 1.0])
    hd, it = hidden.detach().double().requires_grad_(), items.detach().double().requires_grad_()
    ref, gref = _value_and_grads(
        lambda: matryoshka_cross_entropy_reference(hd, it, labels, sizes), hd, it, w.double())
    out = _sp(hidden, items, labels, sizes, w, 8)()
    gout = torch.autograd.grad((out * w).sum(), [hidden, items])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gout[0].double(), gref[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gout[1].double(), gref[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_pass_guard_shift_carried_to_later_sizes_never_underflows(dtype):
    """Block 1 puts item 0 ~300 nats above every label (the guard re-shifts size 1 by its max and
    the chained size 2 inherits that shift); block 2 cancels it, so size 2's logits all sit ~300
    below the inherited shift and would underflow to a zero sum without the second check."""
    P, N = 6, 40
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(P, 8, generator=g, dtype=dtype)
    items = torch.randn(N, 8, generator=g, dtype=dtype)
    hidden[:, 0], hidden[:, 4] = 10.0, 10.0
    items[:, 0], items[:, 4] = 0.0, 0.0
    items[0, 0], items[0, 4] = 30.0, -30.0  # size-4 logit of item 0 = +300, size-8 logit: cancelled
    labels = torch.arange(1, P + 1)
    sizes, w = [4, 8], torch.tensor([1.0, 1.0])
    hd, it = hidden.double().requires_grad_(), items.double().requires_grad_()
    ref, gref = _value_and_grads(lambda: matryoshka_cross_entropy_reference(hd, it, labels, sizes), hd, it, w.double())
    hidden.requires_grad_(True)
    items.requires_grad_(True)
    out = _sp(hidden, items, labels, sizes, w, 3)()
    gout = torch.autograd.grad((out * w).sum(), [hidden, items])
    assert ref[0] > 250  # the label is far below item 0 at size 4
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.detach().double(), ref, **tol)
    torch.testing.assert_close(gout[0].double(), gref[0], **tol)
    torch.testing.assert_close(gout[1].double(), gref[1], **tol)


def test_single_pass_one_input_requires_grad_and_no_grad():
    hidden, items, labels = _inputs(20, 60, 8, torch.float64)
    sizes, w = [2, 8], torch.tensor([0.5, 0.5], dtype=torch.float64)
    ref = matryoshka_cross_entropy_reference(hidden, items, labels, sizes)
    gh_ref, ge_ref = torch.autograd.grad((ref * w).sum(), [hidden, items])
    h2 = hidden.detach().requires_grad_()
    out = _sp(h2, items.detach(), labels, sizes, w, 8)()
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), h2)[0], gh_ref)
    e2 = items.detach().requires_grad_()
    out = _sp(hidden.detach(), e2, labels, sizes, w, 8)()
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), e2)[0], ge_ref)
    calls = []
    orig = L._single_pass
    L._single_pass = lambda *a: calls.append(a[6:8]) or orig(*a)
    try:
        with torch.no_grad():
            out = _sp(hidden, items, labels, sizes, w, 8)()
    finally:
        L._single_pass = orig
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
    assert calls == [(False, False)]  # no gradients computed under no_grad


def test_single_pass_auto_and_weights_shape(monkeypatch):
    hidden, items, labels = _inputs(8, 10, 8, torch.float32)
    out = matryoshka_cross_entropy(hidden, items, labels, [4, 8], weights=torch.ones(2))
    assert out.grad_fn.__class__.__name__ != "_MatryoshkaCESinglePassBackward"  # tiny: plain
    monkeypatch.setattr(L, "AUTO_PLAIN_BELOW", 0)
    out = matryoshka_cross_entropy(hidden, items, labels, [4, 8], weights=torch.ones(2))
    assert "SinglePass" in out.grad_fn.__class__.__name__
    with pytest.raises(ValueError):
        matryoshka_cross_entropy(hidden, items, labels, [4, 8], weights=torch.ones(3))


def test_auto_row_block():
    assert L.auto_row_block(6, 2800, 12101) % 8 == 0
    assert L.auto_row_block(6, 5, 12101) == 5
    assert L.auto_row_block(1, 2800, 10**9) == 8
    assert L.auto_row_block(8, 2800, 12101) == 80  # the buffer budget decides at small d ...
    assert L.auto_row_block(8, 2800, 12101, hidden_size=1024) == 256  # ... d / 4 rows at large d
    assert L.auto_row_block(8, 100, 12101, hidden_size=1024) == 100


def test_choose_path_cpu_and_cuda():
    K, P, N = 6, 2800, 12101
    assert L.choose_path("cpu", 4, K, P, N, 0, True)[0] == "single"
    assert L.choose_path("cpu", 4, K, P, N, 0, False)[0] == "chunked"
    assert L.choose_path("cpu", 4, K, P, N, -1, True)[0] == "reference"
    assert L.choose_path("cpu", 4, K, 8, 10, 0, True)[0] == "reference"
    assert L.choose_path("cpu", 4, K, P, N, 512, False) == ("chunked", 0, 512)
    # CUDA: materialise whenever the K*P*N logits fit CUDA_PLAIN_BYTES (launch-bound loop)
    assert L.choose_path("cuda", 4, K, P, N, 0, True)[0] == "reference"
    assert L.choose_path("cuda", 4, K, P, N, 0, False)[0] == "reference"
    big = L.CUDA_PLAIN_BYTES // (4 * K * P) + 1
    path, r, c = L.choose_path("cuda", 4, K, P, big, 0, True)
    assert path == "single" and K * r * big * 4 <= L.CUDA_PLAIN_BYTES and r >= 8
    path, r, c = L.choose_path("cuda", 4, K, P, big, 0, False)
    assert path == "chunked" and K * P * c * 4 <= 1.01 * L.CUDA_PLAIN_BYTES


def test_efficiency_flop_counter_sees_the_fused_loss_gemms():
    """benchmarks/efficiency.py's FLOP bound: the single-pass loss (forward + backward) is 3 GEMMs
    of plain CE's size plus the per-block shift columns; torch's own counter misses addmm_."""
    from benchmarks import efficiency as bench
    P, N, sizes = 48, 300, (8, 16, 32)
    hidden, items, labels = _inputs(P, N, 32, torch.float64)
    hidden.requires_grad_(True)
    items.requires_grad_(True)
    with bench.flop_counter() as counter:
        L.matryoshka_cross_entropy(hidden, items, labels, sizes, chunk_size=64, weights=torch.ones(3),
                                   row_block=16).sum().backward()
    forward = 2 * P * N * (32 + len(sizes))  # every block GEMM carries one folded-shift column
    backward = 2 * (2 * P * N * 32)  # grad wrt hidden and wrt items, block by block
    assert counter.get_total_flops() == forward + backward
