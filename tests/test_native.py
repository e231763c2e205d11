"""The compiled loss kernel (native.py + matryoshka_softmax.c) == the PyTorch single pass == the
materialising reference; its build cache, fallbacks and argument checks."""
import os
import subprocess
import sys

import pytest
import torch

from recbole_fmrl.model import loss as L
from recbole_fmrl.model import native
from recbole_fmrl.model.loss import matryoshka_cross_entropy, matryoshka_cross_entropy_reference


@pytest.fixture(scope="module")
def kernel():
    """The built library; under FMRL_NATIVE=require (CI) a failed build fails instead of skipping."""
    lib = native.load()
    if lib is None:
        pytest.skip(f"compiled kernel unavailable: {native.error() or 'FMRL_NATIVE=0'}")
    return lib


def _inputs(P, N, d, scale, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(P, d, generator=g, dtype=dtype) * scale).requires_grad_()
    items = (torch.randn(N, d, generator=g, dtype=dtype) * scale).requires_grad_()
    return hidden, items, torch.randint(0, N, (P,), generator=g)


def _run(hidden, items, labels, sizes, w, native_flag, r=0):
    out = matryoshka_cross_entropy(hidden, items, labels, sizes, 0, weights=w, row_block=r, native=native_flag)
    assert "SinglePass" in out.grad_fn.__class__.__name__
    return (out.detach(), *torch.autograd.grad((out * w).sum(), [hidden, items]))


@pytest.mark.parametrize("P,N,sizes,r,w", [
    (70, 3000, [4, 8, 16, 32], 0, [0.1, 0.2, 0.3, 0.4]),  # N spans 3 tiles of the online shift
    (33, 1024, [8, 24], 7, [1.0, -0.5]),                   # exactly one tile; negative weight
    (9, 1500, [16], 4, [1.0]),                             # K = 1
    (17, 2049, [2, 6, 32], 5, [0.0, 1.0, 0.0]),            # zero weights; a 1-item last tile
])
def test_native_matches_torch_path_and_reference(kernel, monkeypatch, P, N, sizes, r, w):
    monkeypatch.setattr(L, "AUTO_PLAIN_BELOW", 0)
    hidden, items, labels = _inputs(P, N, sizes[-1], 0.6)
    w = torch.tensor(w)
    got = _run(hidden, items, labels, sizes, w, True, r)
    torch_path = _run(hidden, items, labels, sizes, w, False, r)
    hd, it = hidden.detach().double().requires_grad_(), items.detach().double().requires_grad_()
    ref = matryoshka_cross_entropy_reference(hd, it, labels, sizes)
    ref = (ref.detach(), *torch.autograd.grad((ref * w.double()).sum(), [hd, it]))
    for a, b, c in zip(got, torch_path, ref):
        torch.testing.assert_close(a.double(), c, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_native_online_shift_across_tiles(kernel):
    """Each row's max sits in a different tile, up to 80 nats above the rest: the running sum is
    rescaled when a later tile raises the shift, and earlier tiles' exps are re-based in the
    gradient pass (wrong either way -> the softmax would be off by e^80)."""
    K, rows, n = 2, 4, 3 * 1024 + 5
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(K, rows, n, generator=g, dtype=torch.float64)
    for row, col in enumerate([3, 1500, 3074, n - 1]):
        parts[0, row, col] += 80.0
        parts[1, row, (col * 7) % n] += 40.0
    w = torch.tensor([0.25, 2.0], dtype=torch.float64)
    logits = parts.cumsum(0)
    lse_ref = logits.logsumexp(-1)
    soft = logits.softmax(-1) * w[:, None, None]
    g_ref = soft.flip(0).cumsum(0).flip(0)  # G_j = sum_{k >= j} w_k softmax_k
    buf, lse = parts.float().contiguous(), torch.empty(K, rows)
    native.matryoshka_softmax(buf, w.float(), lse, need_grad=True, threads=1)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(buf.double(), g_ref, rtol=1e-5, atol=1e-9)
    tiny = (buf != 0) & (buf.abs() < torch.finfo(torch.float32).tiny)
    assert not tiny.any()  # no subnormals reach the GEMMs


def test_native_threads_agree_and_lse_only(kernel):
    g = torch.Generator().manual_seed(3)
    parts = torch.randn(3, 37, 2500, generator=g)
    w = torch.tensor([0.2, 0.3, 0.5])
    outs = []
    for threads in (1, 3, 64):
        buf, lse = parts.clone(), torch.empty(3, 37)
        native.matryoshka_softmax(buf, w, lse, need_grad=True, threads=threads)
        outs.append((buf, lse))
    for buf, lse in outs[1:]:
        assert torch.equal(buf, outs[0][0]) and torch.equal(lse, outs[0][1])  # rows are independent
    buf, lse = parts.clone(), torch.empty(3, 37)
    native.matryoshka_softmax(buf, w, lse, need_grad=False)
    assert torch.equal(lse, outs[0][1])
    torch.testing.assert_close(lse, parts.cumsum(0).logsumexp(-1), rtol=1e-6, atol=1e-5)


def test_native_rejects_bad_buffers(kernel, monkeypatch):
    monkeypatch.setattr(L, "AUTO_PLAIN_BELOW", 0)
    buf, w, lse = torch.zeros(2, 3, 10), torch.ones(2), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="buf: need a contiguous fp32"):
        native.matryoshka_softmax(buf.transpose(1, 2).contiguous().transpose(1, 2), w, lse, True)
    with pytest.raises(ValueError, match="weights"):
        native.matryoshka_softmax(buf, w.double(), lse, True)
    with pytest.raises(ValueError, match="lse"):
        native.matryoshka_softmax(buf, w, torch.zeros(3, 2), True)
    hidden, items, labels = _inputs(4, 10, 8, 1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="native=True"):
        matryoshka_cross_entropy(hidden, items, labels, [8], 0, weights=torch.ones(1), row_block=2, native=True)


def test_non_finite_inputs_take_the_torch_path(kernel, monkeypatch):
    """The kernel is built with -ffinite-math-only: a nan in the inputs must still give a nan loss."""
    monkeypatch.setattr(L, "AUTO_PLAIN_BELOW", 0)
    hidden, items, labels = _inputs(10, 50, 8, 1.0)
    with torch.no_grad():
        hidden[3, 2] = float("nan")
    out = matryoshka_cross_entropy(hidden, items, labels, [4, 8], weights=torch.ones(2))
    assert torch.isnan(out).all()


def test_build_is_cached_and_atomic(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_FMRL_CACHE", str(tmp_path))
    monkeypatch.setitem(native._state, "cache_dir", None)  # no earlier run's fmrl_cache_dir in this process
    first = native.build()
    mtime = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert first.parent == tmp_path / "kernels"
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind


def _probe(env):
    code = ("import warnings, torch; warnings.simplefilter('always');"
            "from recbole_fmrl.model import loss as L; L.AUTO_PLAIN_BELOW = 0;"
            "h = torch.randn(6, 8); e = torch.randn(20, 8); y = torch.arange(6);"
            "print(float(L.matryoshka_cross_entropy(h, e, y, [4, 8], weights=torch.ones(2))[1]))")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_without_a_compiler_falls_back_or_fails_as_asked(tmp_path):
    env = {"PATH": str(tmp_path), "CC": "", "RECBOLE_FMRL_CACHE": str(tmp_path / "cache"), "FMRL_NATIVE": "1"}
    done = _probe(env)
    assert done.returncode == 0, done.stderr
    assert "using the PyTorch path" in done.stderr and "no C compiler found" in done.stderr
    float(done.stdout.strip())
    done = _probe({**env, "FMRL_NATIVE": "require"})
    assert done.returncode != 0 and "FMRL_NATIVE=require" in done.stderr
    done = _probe({**env, "FMRL_NATIVE": "0"})
    assert done.returncode == 0 and "PyTorch path" not in done.stderr  # disabled: silent


def test_disabled_kernel_explains_itself(monkeypatch):
    monkeypatch.setenv("FMRL_NATIVE", "0")
    monkeypatch.setattr(L, "AUTO_PLAIN_BELOW", 0)
    assert native.load() is None and native.error() == "disabled by FMRL_NATIVE=0"
    hidden, items, labels = _inputs(6, 40, 8, 1.0)
    with pytest.raises(RuntimeError, match="disabled by FMRL_NATIVE=0"):
        matryoshka_cross_entropy(hidden, items, labels, [4, 8], 0, weights=torch.ones(2), native=True)
    with pytest.raises(RuntimeError, match="unavailable: disabled by FMRL_NATIVE=0"):
        native.matryoshka_softmax(torch.zeros(1, 1, 4), torch.ones(1), torch.zeros(1, 1), True)
    out = matryoshka_cross_entropy(hidden, items, labels, [4, 8], 0, weights=torch.ones(2))  # auto: PyTorch ops
    torch.testing.assert_close(out, matryoshka_cross_entropy_reference(hidden, items, labels, [4, 8]).detach(),
                               rtol=1e-5, atol=1e-5)
