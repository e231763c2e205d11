import pytest
import torch

from recbole_fmrl.model.lru import SCANS, LRULayer


@pytest.mark.parametrize("scan", ["doubling", "dense"])
@pytest.mark.parametrize("length", [1, 7, 32, 50])
def test_parallel_scan_equals_recurrence_with_gradients(scan, length):
    torch.manual_seed(length)
    shape = (3, length, 10)
    xr = torch.randn(shape, dtype=torch.double, requires_grad=True)
    xi = torch.randn(shape, dtype=torch.double, requires_grad=True)
    log_mod = (-torch.rand(10, dtype=torch.double) * 3).requires_grad_()
    phase = (torch.rand(10, dtype=torch.double) * 6.28).requires_grad_()
    inputs = [xr, xi, log_mod, phase]
    ref = SCANS["sequential"](*inputs)
    out = SCANS[scan](*inputs)
    weights = [torch.randn_like(r) for r in ref]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    g_ref = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, weights)), inputs)
    g_out = torch.autograd.grad(sum((r * w).sum() for r, w in zip(out, weights)), inputs, allow_unused=True)
    for a, b, x in zip(g_out, g_ref, inputs):  # length 1: lambda is unused, its gradient zero
        torch.testing.assert_close(torch.zeros_like(x) if a is None else a, b, rtol=1e-10, atol=1e-10)


def test_small_radius_does_not_overflow():
    # |lambda| ~ 1e-4: lambda^-k tricks overflow; the scans must stay finite and exact
    xr, xi = torch.randn(2, 64, 4), torch.randn(2, 64, 4)
    log_mod, phase = torch.full((4,), -9.0), torch.rand(4)
    for scan in ("doubling", "dense"):
        hr, hi = SCANS[scan](xr, xi, log_mod, phase)
        assert torch.isfinite(hr).all() and torch.isfinite(hi).all()
        torch.testing.assert_close(hr, SCANS["sequential"](xr, xi, log_mod, phase)[0], rtol=1e-5, atol=1e-5)


def test_ring_initialisation():
    torch.manual_seed(0)
    layer = LRULayer([8, 16], r_min=0.3, r_max=0.4)
    log_mod, phase = layer.log_lambda()
    radius = torch.exp(log_mod)
    assert torch.all(radius >= 0.3 - 1e-6) and torch.all(radius <= 0.4 + 1e-6)
    assert torch.all(phase >= 0) and torch.all(phase <= 2 * torch.pi)
    gamma = torch.exp(layer.params_log[2])
    torch.testing.assert_close(gamma, torch.sqrt(1 - radius**2))


def test_ring_radius_validation():
    with pytest.raises(ValueError, match="r_min"):
        LRULayer([8], r_min=0.5, r_max=0.2)


def test_lru_is_causal_and_nested():
    torch.manual_seed(0)
    layer = LRULayer([8, 16], r_min=0.5, r_max=0.9, dropout=0.0).double()
    with torch.no_grad():  # non-zero imaginary parts so the test covers them
        layer.in_im.weight.normal_().mul_(layer.in_im.mask)
        layer.out_im.weight.normal_().mul_(layer.out_im.mask)
    u = torch.randn(2, 9, 16, dtype=torch.double)
    y = layer(u)
    u2 = u.clone()
    u2[:, 5:] = torch.randn_like(u2[:, 5:])
    torch.testing.assert_close(layer(u2)[:, :5], y[:, :5], rtol=0, atol=1e-12)  # causal
    u3 = u.clone()
    u3[..., 8:] = torch.randn_like(u3[..., 8:])
    torch.testing.assert_close(layer(u3)[..., :8], y[..., :8], rtol=0, atol=1e-12)  # nested


def test_wider_state_is_nested():
    torch.manual_seed(1)
    layer = LRULayer([8, 16], r_min=0.8, r_max=0.99, dropout=0.0, state_ratio=2).double()
    assert layer.params_log.shape == (3, 32) and layer.in_re.weight.shape == (32, 16)
    u = torch.randn(2, 6, 16, dtype=torch.double)
    u2 = u.clone()
    u2[..., 8:] = torch.randn_like(u2[..., 8:])
    torch.testing.assert_close(layer(u2)[..., :8], layer(u)[..., :8], rtol=0, atol=1e-12)


@pytest.mark.parametrize("scan", ["dense", "doubling"])
def test_length_buckets_equal_one_padded_scan_and_a_per_sequence_recurrence(scan):
    from recbole_fmrl.model.lru import Packing

    torch.manual_seed(0)
    lengths = torch.tensor([3, 50, 1, 4, 2, 5, 3, 2, 4, 1, 6, 2])  # mostly short, one long: worth splitting
    packing = Packing(lengths)
    buckets = packing.buckets()
    assert len(buckets) == 2 and buckets[0][0].length == 6 and buckets[1][0].length == 50
    assert sorted(torch.cat([t for _, t in buckets]).tolist()) == list(range(int(lengths.sum())))
    layer = LRULayer([4, 8], r_min=0.5, r_max=0.9, dropout=0.0, scan=scan).double()
    with torch.no_grad():
        layer.in_im.weight.normal_()  # non-zero imaginary input path
        layer.out_im.weight.normal_()
    u = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, requires_grad=True)
    outputs, grads = [], []
    for bucketing in (True, False):
        layer.bucketing = bucketing
        y = layer(u, packing)
        outputs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                         [u, layer.params_log, layer.in_re.weight]))
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    layer.scan = "sequential"  # each sequence alone, step by step
    start = 0
    for n in lengths.tolist():
        alone = layer(u[start: start + n].unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(outputs[0][start: start + n], alone)
        start += n


def test_no_split_when_it_saves_little():
    from recbole_fmrl.model.lru import Packing

    assert len(Packing(torch.tensor([50, 49, 48, 50])).buckets()) == 1
    assert len(Packing(torch.tensor([7])).buckets()) == 1
    assert len(Packing(torch.tensor([5, 5, 5])).buckets()) == 1
