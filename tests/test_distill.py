"""Self-distillation across nested sizes (``fmrl_distill_weight``): the KL against a row-by-row
reference, where its gradient goes, and the model's loss with it."""
import pytest
import torch

from recbole_fmrl.model.distill import nested_distillation
from recbole_fmrl.train.driver import prepare


def _reference(hidden, items, sizes):
    """Row by row, size by size: KL(softmax of the full dims || softmax of the first m dims)."""
    out = []
    for m in sizes:
        terms = []
        for p in range(hidden.shape[0]):
            teacher = torch.log_softmax(items @ hidden[p], 0).detach()
            student = torch.log_softmax(items[:, :m] @ hidden[p, :m], 0)
            terms.append((teacher.exp() * (teacher - student)).sum())
        out.append(torch.stack(terms).mean())
    return torch.stack(out)


@pytest.mark.parametrize("row_chunk", [1, 4, 64])
@pytest.mark.parametrize("sizes", [[2, 4], [1, 3, 8]])
def test_divergence_and_gradients_match_the_row_reference(sizes, row_chunk):
    g = torch.Generator().manual_seed(0)
    P, N, d = 9, 13, sizes[-1]
    hidden = torch.randn(P, d, dtype=torch.float64, generator=g, requires_grad=True)
    items = torch.randn(N, d, dtype=torch.float64, generator=g)
    items.requires_grad_(True)
    weights = torch.rand(len(sizes), dtype=torch.float64, generator=g)
    fast = nested_distillation(hidden, items, sizes, row_chunk=row_chunk)
    gh, ge = torch.autograd.grad((fast * weights).sum(), (hidden, items))
    slow = _reference(hidden, items, sizes)
    rh, re = torch.autograd.grad((slow * weights).sum(), (hidden, items))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge, re, rtol=1e-12, atol=1e-12)
    assert float(fast[-1].detach()) == 0.0 and (fast[:-1] > 0).all()


def test_row_subset_is_the_reference_on_the_drawn_rows():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 8, dtype=torch.float64, generator=g, requires_grad=True)
    items = torch.randn(7, 8, dtype=torch.float64, generator=g)
    torch.manual_seed(11)
    fast = nested_distillation(hidden, items, [2, 8], max_rows=4)
    torch.manual_seed(11)
    rows = torch.randperm(10)[:4]
    torch.testing.assert_close(fast, _reference(hidden[rows], items, [2, 8]), rtol=1e-12, atol=1e-12)
    for rows in (0, 10, 50):  # 0 or at least every row: the exact mean, no draw
        torch.testing.assert_close(nested_distillation(hidden, items, [2, 8], max_rows=rows),
                                   _reference(hidden, items, [2, 8]), rtol=1e-12, atol=1e-12)


def test_the_teacher_dims_get_no_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=g, requires_grad=True)
    items = torch.randn(11, 8, generator=g, requires_grad=True)
    gh, ge = torch.autograd.grad(nested_distillation(hidden, items, [2, 4, 8]).sum(), (hidden, items))
    assert torch.count_nonzero(gh[:, 4:]) == 0 and torch.count_nonzero(ge[:, 4:]) == 0
    assert torch.count_nonzero(gh[:, :4]) > 0 and torch.count_nonzero(ge[:, :4]) > 0


def test_sizes_that_predict_alike_have_zero_divergence():
    hidden, items = torch.randn(4, 8), torch.randn(6, 8)
    hidden[:, 2:] = 0.0  # dims past 2 add nothing: every size scores like size 2
    torch.testing.assert_close(nested_distillation(hidden, items, [2, 4, 8]), torch.zeros(3))
    torch.testing.assert_close(nested_distillation(hidden, items, [8]), torch.zeros(1))


def test_model_loss_adds_the_weighted_divergence(tiny_config):
    cfg = tiny_config(hidden_dropout_prob=0.0, attn_dropout_prob=0.0, fmrl_sizes=[4, 8, 16], fmrl_size_weights=[1, 2, 3])
    _, plain, _, (train, _, _) = prepare(model="FMRLRec", dataset="tiny", config_dict=cfg, log=False)
    _, distilled, _, _ = prepare(model="FMRLRec", dataset="tiny", config_dict=dict(cfg, fmrl_distill_weight=0.7), log=False)
    distilled.load_state_dict(plain.state_dict())
    assert distilled.distill_weight == 0.7 and len(plain.sizes) == 3
    batch = next(iter(train))
    base, extra = torch.stack(plain.calculate_loss(batch)), torch.stack(distilled.calculate_loss(batch))
    table = plain.item_table()
    x, packing = plain.network.encode(batch[plain.ITEM_SEQ], batch[plain.ITEM_SEQ_LEN], table)
    from recbole_fmrl.model.labels import labelled_states

    hidden, _ = labelled_states(plain, batch, x, x[packing.last], packing.gather)
    kl = nested_distillation(hidden, table[1:], plain.sizes)
    torch.testing.assert_close(extra - base, 0.7 * kl * plain.size_weights, rtol=1e-4, atol=1e-6)
    assert float((extra[-1] - base[-1]).detach()) == pytest.approx(0.0, abs=1e-6) and (extra[:-1] > base[:-1]).all()


def test_report_names_the_distillation():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_report

    run = {"model": "FMRLRec", "config": {}, "resolved": {"hidden_size": 256, "n_layers": 1, "fmrl_modality": "text",
                                                          "fmrl_distill_weight": 1.0, "fmrl_distill_rows": 128}}
    assert "distilled from size d x1.0 on 128 rows/step" in bench_report.settings_text(run)
    run["resolved"]["fmrl_distill_weight"] = 0.0
    assert "distilled" not in bench_report.settings_text(run)
