"""Sampled-softmax training (``fmrl_train_negatives``): the loss against a per-row slow reference, the
nested sizes' independence, accidental hits, and the models that train with it."""
import pytest
import torch
from torch.nn import functional as F

from recbole_fmrl.model.sampled_loss import draw_negatives, nested_softmax_loss, sampled_matryoshka_cross_entropy
from recbole_fmrl.train.driver import prepare, run


def _reference(hidden, items, labels, sizes, negatives):
    """Row by row, size by size: CE of [label, negatives except accidental hits] on the first m dims."""
    out = []
    for m in sizes:
        terms = []
        for p in range(hidden.shape[0]):
            keep = [n for n in negatives[p].tolist() if n != int(labels[p])]
            cand = torch.tensor([int(labels[p])] + keep)
            logits = items[cand, :m] @ hidden[p, :m]
            terms.append(torch.logsumexp(logits, 0) - logits[0])
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


@pytest.mark.parametrize("sizes", [[4], [2, 4], [1, 3, 8]])
def test_sampled_loss_and_gradients_match_the_row_reference(sizes):
    g = torch.Generator().manual_seed(0)
    P, N, n, d = 9, 7, 5, sizes[-1]  # N small: accidental hits and repeated negatives happen
    hidden = torch.randn(P, d, dtype=torch.float64, generator=g, requires_grad=True)
    items = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, N, (P,), generator=g)
    negatives = torch.randint(0, N, (P, n), generator=g)
    assert (negatives == labels[:, None]).any()  # the masking is exercised
    weights = torch.rand(len(sizes), dtype=torch.float64, generator=g)
    fast = sampled_matryoshka_cross_entropy(hidden, items, labels, sizes, negatives)
    gh, ge = torch.autograd.grad((fast * weights).sum(), (hidden, items))
    slow = _reference(hidden, items, labels, sizes, negatives)
    rh, re = torch.autograd.grad((slow * weights).sum(), (hidden, items))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge, re, rtol=1e-12, atol=1e-12)


def test_each_size_depends_on_its_prefix_only():
    g = torch.Generator().manual_seed(1)
    hidden, items = torch.randn(6, 8, generator=g), torch.randn(10, 8, generator=g)
    labels, negatives = torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6, 4), generator=g)
    base = sampled_matryoshka_cross_entropy(hidden, items, labels, [2, 4, 8], negatives)
    hidden2, items2 = hidden.clone(), items.clone()
    hidden2[:, 4:] += 3.0
    items2[:, 4:] -= 2.0  # only dims past 4 change
    moved = sampled_matryoshka_cross_entropy(hidden2, items2, labels, [2, 4, 8], negatives)
    torch.testing.assert_close(moved[:2], base[:2], rtol=0, atol=1e-6)
    assert abs(float(moved[2] - base[2])) > 1e-3


def test_all_negatives_hits_leave_only_the_label():
    hidden, items = torch.randn(3, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 2, 4])
    loss = sampled_matryoshka_cross_entropy(hidden, items, labels, [4], labels[:, None].repeat(1, 6))
    torch.testing.assert_close(loss, torch.zeros(1))  # a softmax over the label alone


def test_zero_negatives_is_the_full_softmax_and_draws_are_seeded():
    g = torch.Generator().manual_seed(2)
    hidden, items, labels = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g), torch.arange(5)
    full = nested_softmax_loss(hidden, items, labels, [4, 8], 0, chunk_size=-1)
    ref = torch.stack([F.cross_entropy(hidden[:, :m] @ items[:, :m].T, labels) for m in (4, 8)])
    torch.testing.assert_close(full, ref)
    torch.manual_seed(3)
    a = draw_negatives(5, 11, 7, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, draw_negatives(5, 11, 7, "cpu")) and a.min() >= 0 and a.max() < 11
    torch.manual_seed(4)
    sampled = nested_softmax_loss(hidden, items, labels, [4, 8], 7)
    torch.manual_seed(4)
    negatives = draw_negatives(5, 11, 7, "cpu")
    torch.testing.assert_close(sampled, sampled_matryoshka_cross_entropy(hidden, items, labels, [4, 8], negatives))


@pytest.mark.parametrize("model", ["FMRLRec", "SASRecAP"])
def test_models_train_with_sampled_negatives(tiny_config, model):
    extra = {"inner_size": 32} if model == "SASRecAP" else {}
    cfg = tiny_config(fmrl_train_negatives=8, epochs=12, learning_rate=0.01, hidden_dropout_prob=0.0,
                      attn_dropout_prob=0.0, **extra)
    _, net, _, (train, _, _) = prepare(model=model, dataset="tiny", config_dict=cfg, log=False)
    assert net.train_negatives == 8
    batch = next(iter(train))
    torch.manual_seed(5)
    first = net.calculate_loss(batch)
    torch.manual_seed(5)
    torch.testing.assert_close(net.calculate_loss(batch), first)  # same draws under the same seed
    result = run(model, "tiny", config_dict=cfg, log=False)
    losses = [r["train_loss"] for r in result["records"]]
    assert losses[-1] < 0.75 * losses[0]
    # tiny data walks item -> item + 1 80% of the time; a random ranking has NDCG@10 ~0.15
    assert result["test_result"]["ndcg@10"] > 0.4


def test_report_names_the_sampled_softmax():

    from benchmarks import bench_report

    run = {"model": "SASRecAP", "config": {"fmrl_train_negatives": 256},
           "resolved": {"hidden_size": 64, "n_layers": 1, "fmrl_train_objective": "all_positions"}}
    assert "all-pos windows, sampled softmax 256 neg" in bench_report.settings_text(run)
    run["config"] = {}
    assert "sampled" not in bench_report.settings_text(run)
