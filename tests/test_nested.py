import pytest
import torch
from torch.nn import functional as F

from recbole_fmrl.model.nested import NestedLayerNorm, NestedLinear, check_sizes, default_sizes, nested_numel, staircase_mask

SIZES = [8, 16, 32, 64]


@pytest.mark.parametrize("shape", ["square", "up", "down"])
def test_prefix_equals_small_layer(shape):
    torch.manual_seed(0)
    in_sizes = [2 * m for m in SIZES] if shape == "down" else SIZES
    out_sizes = [2 * m for m in SIZES] if shape == "up" else SIZES
    layer = NestedLinear(in_sizes, out_sizes).double()
    x = torch.randn(5, in_sizes[-1], dtype=torch.double)
    full = layer(x)
    for k in range(len(SIZES)):
        i_k, o_k = in_sizes[k], out_sizes[k]
        small = NestedLinear(in_sizes[: k + 1], out_sizes[: k + 1]).double()
        small.load_state_dict({"weight": layer.weight[:o_k, :i_k], "bias": layer.bias[:o_k]})
        torch.testing.assert_close(full[:, :o_k], small(x[:, :i_k]), rtol=0, atol=1e-12)
        # and the prefix ignores every input beyond i_k
        x2 = x.clone()
        x2[:, i_k:] = torch.randn_like(x2[:, i_k:])
        torch.testing.assert_close(layer(x2)[:, :o_k], full[:, :o_k], rtol=0, atol=0)


def test_staircase_structure_and_init():
    torch.manual_seed(0)
    layer = NestedLinear(SIZES, SIZES)
    mask = staircase_mask(SIZES, SIZES)
    assert torch.equal(layer.weight != 0, mask)  # zero exactly outside the staircase
    lo = 0
    for m in SIZES:  # each output block initialised with its own fan-in m_k
        block = layer.weight[lo:m, :m]
        assert block.abs().max() <= 1 / m**0.5 and block.abs().max() > 0.5 / m**0.5
        lo = m
    loss = layer(torch.randn(3, 64)).sum()
    loss.backward()
    assert torch.all(layer.weight.grad[~mask] == 0)


def test_nested_numel_counts_nonzero_blocks():
    assert nested_numel(SIZES, SIZES, bias=False) == int(staircase_mask(SIZES, SIZES).sum())
    d = 1024
    ratio = nested_numel(default_sizes(d), default_sizes(d), bias=False) / d**2
    assert abs(ratio - 699_072 / 1_048_576) < 1e-12  # the paper's ~2/3


def test_nested_layernorm_equals_per_block_layernorm():
    torch.manual_seed(0)
    sizes = [8, 16, 40]
    ln = NestedLayerNorm(sizes).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(4, 3, 40, dtype=torch.double) * 3 + 1
    edges = [0] + sizes
    ref = torch.cat([F.layer_norm(x[..., a:b], (b - a,), ln.weight[a:b], ln.bias[a:b], 1e-5)
                     for a, b in zip(edges[:-1], edges[1:])], dim=-1)
    torch.testing.assert_close(ln(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sizes,hidden,message", [
    ([16, 8, 32], 32, "strictly increasing"),
    ([8, 16], 32, "must equal hidden_size"),
    ([0, 32], 32, "positive"),
])
def test_check_sizes_errors(sizes, hidden, message):
    with pytest.raises(ValueError, match=message) as err:
        check_sizes(sizes, hidden)
    assert "fmrl_sizes" in str(err.value)


def test_default_sizes():
    assert default_sizes(256) == [8, 16, 32, 64, 128, 256]
    assert default_sizes(48) == [8, 16, 32, 48]
