"""BSARec and UniSRec (plugin baselines) on the tiny dataset: shapes, exact layer algebra against slow
references, a gradient step, learning beyond popularity, and checkpoint reload."""
import math

import numpy as np
import pytest
import torch
from recbole.model.layers import TransformerLayer
from torch.nn import functional as F

from recbole_fmrl.model.bsarec import FrequencyLayer
from recbole_fmrl.model.unisrec import MoEAdaptor, PWLayer
from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.driver import prepare, run


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


SMALL = {"BSARec": {"hidden_size": 16, "inner_size": 32, "n_heads": 2},
         "UniSRec": {"hidden_size": 16, "inner_size": 32, "n_heads": 2}}


def build(tiny_config, model, **overrides):
    return prepare(model=model, dataset="tiny", config_dict=tiny_config(**{**SMALL[model], **overrides}), log=False)


def no_dropout(**extra):
    return {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0, **extra}


def gradient_step_lowers_the_loss(net, batch):
    """One SGD step on one batch lowers that batch's loss (dropout off: the same function before and after)."""
    net.train()
    torch.manual_seed(0)
    before = net.calculate_loss(batch)
    net.zero_grad()
    before.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in net.named_parameters():
            if grads[name] is not None:
                p -= 0.5 * grads[name]
    torch.manual_seed(0)
    after = net.calculate_loss(batch)
    assert after < before, (float(before), float(after))
    return grads


def scores_consistent(net, valid):
    net.eval()
    batch = next(iter(valid))[0]
    with torch.no_grad():
        scores = net.full_sort_predict(batch)
        assert scores.shape == (len(batch), net.n_items) and torch.isfinite(scores).all()
        torch.testing.assert_close(net.predict(batch), scores.gather(1, batch["item_id"][:, None])[:, 0])


# -------------------------------------------------------------------------------------------- BSARec

def test_bsarec_shapes_gradient_step_and_scores(tiny_config):
    config, net, _, (train, valid, _) = build(tiny_config, "BSARec", **no_dropout())
    assert config["fmrl_train_objective"] == "last_position" and len(net.blocks) == 2
    assert net.blocks[0].alpha == 0.7 and net.blocks[0].filter.n_low == 3  # the published c = 5: 3 rfft bins
    batch = next(iter(train))
    assert train._dataset.target_list_field not in batch  # prefix samples, one label each
    out = net.forward(batch["item_id_list"], batch["item_length"])
    assert out.shape == (*batch["item_id_list"].shape, 16)
    grads = gradient_step_lowers_the_loss(net, batch)
    for name in ("blocks.0.filter.sqrt_beta", "blocks.1.attention.query.weight", "item_embedding.weight"):
        assert grads[name].abs().sum() > 0, name
    scores_consistent(net, valid)


def dft_low_pass(x, n_low):
    """The low-pass as an explicit real DFT matrix: keep frequencies k with min(k, L - k) < n_low (float64)."""
    length = x.shape[1]
    k = torch.arange(length, dtype=torch.float64)
    kept = torch.minimum(k, length - k) < n_low
    t = torch.arange(length, dtype=torch.float64)
    angles = 2 * math.pi * k[kept][:, None, None] * (t[:, None] - t[None, :]) / length  # [K L L]
    matrix = torch.cos(angles).sum(0) / length  # [L L]
    return torch.einsum("ts,bsh->bth", matrix, x)


@pytest.mark.parametrize("length,c", [(20, 5), (21, 5), (20, 1), (8, 16)])
def test_bsarec_low_pass_equals_the_dft_projection(length, c):
    torch.manual_seed(0)
    layer = FrequencyLayer(hidden_size=4, c=c, dropout=0.0, eps=1e-12).double()
    x = torch.randn(3, length, 4, dtype=torch.double)
    torch.testing.assert_close(layer.low_pass(x), dft_low_pass(x, c // 2 + 1), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        layer.sqrt_beta.fill_(1.0)  # beta = 1: low + high = x
    torch.testing.assert_close(layer(x), layer.layer_norm(2 * x), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        layer.sqrt_beta.zero_()  # beta = 0: only the low frequencies are added back
    torch.testing.assert_close(layer(x), layer.layer_norm(x + dft_low_pass(x, c // 2 + 1)), rtol=1e-10, atol=1e-10)
    if c // 2 + 1 > length // 2:  # every frequency kept: low(x) = x
        torch.testing.assert_close(layer.low_pass(x), x, rtol=1e-10, atol=1e-10)


def test_bsarec_alpha_zero_is_a_sasrec_block_and_alpha_one_the_filter_alone(tiny_config):
    _, net, _, _ = build(tiny_config, "BSARec", bsarec_alpha=0.0, **no_dropout())
    block = net.blocks[0].double().eval()
    sasrec = TransformerLayer(2, 16, 32, 0.0, 0.0, "gelu", 1e-12).double().eval()
    sasrec.multi_head_attention.load_state_dict(block.attention.state_dict())
    sasrec.feed_forward.load_state_dict(block.feed_forward.state_dict())
    x = torch.randn(3, 20, 16, dtype=torch.double)
    seq = torch.randint(1, net.n_items, (3, 20))
    seq[0, :5] = 0  # left padding
    mask = net.get_attention_mask(seq).double()
    torch.testing.assert_close(block(x, mask), sasrec(x, mask), rtol=1e-10, atol=1e-10)
    block.alpha = 1.0
    torch.testing.assert_close(block(x, mask), block.feed_forward(block.filter(x)), rtol=1e-10, atol=1e-10)


def test_bsarec_reads_right_padded_sequences_as_the_left_padded_reference(tiny_config):
    _, net, _, (_, valid, _) = build(tiny_config, "BSARec", **no_dropout())
    net = net.double().eval()
    batch = next(iter(valid))[0]
    seq, lengths = batch["item_id_list"], batch["item_length"]
    length = seq.shape[1]
    left = torch.zeros_like(seq)
    for b in range(len(seq)):  # the reference's layout: [0 ... 0 i_1 ... i_n]
        left[b, length - lengths[b]:] = seq[b, : lengths[b]]
    with torch.no_grad():
        x = net.item_embedding(left) + net.position_embedding(torch.arange(length))[None]
        x = net.layer_norm(x)
        mask = net.get_attention_mask(left)
        for block in net.blocks:
            x = block(x, mask)
        torch.testing.assert_close(net.forward(seq, lengths), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("overrides,message", [
    ({"fmrl_train_objective": "all_positions"}, "whole window"),
    ({"bsarec_alpha": 1.5}, r"bsarec_alpha: need a weight in \[0, 1\], got 1.5"),
    ({"bsarec_c": 0}, "bsarec_c: need a cut-off of at least 1, got 0"),
])
def test_bsarec_refuses_bad_settings(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_config, "BSARec", **overrides)


# ------------------------------------------------------------------------------------------- UniSRec

@pytest.mark.parametrize("modality,objective", [("text_id", "last_position"), ("text", "last_position"),
                                                ("text_id", "all_positions")])
def test_unisrec_shapes_gradient_step_and_scores(tiny_config, modality, objective):
    config, net, _, (train, valid, _) = build(tiny_config, "UniSRec", fmrl_modality=modality,
                                              fmrl_train_objective=objective, **no_dropout(unisrec_adaptor_dropout_prob=0.0))
    assert len(net.adaptor.experts) == 8 and (net.item_embedding is None) == (modality == "text")
    assert net.text.shape == (net.n_items, 12)  # the tiny fixture's 12-d text features
    batch = next(iter(train))
    assert (net.target_list_field in batch) == (objective == "all_positions")
    assert net.forward(batch["item_id_list"], batch["item_length"]).shape == (len(batch), 16)
    grads = gradient_step_lowers_the_loss(net, batch)
    for name in ("adaptor.experts.0.lin.weight", "adaptor.experts.0.bias", "adaptor.w_gate", "trm_encoder.layer.0.multi_head_attention.query.weight"):
        assert grads[name].abs().sum() > 0, name
    assert (grads.get("item_embedding.weight") is not None) == (modality == "text_id")
    scores_consistent(net, valid)


def test_unisrec_reads_the_text_features_aligned_to_internal_ids(tiny_config, tiny_root):
    _, net, _, (train, _, _) = build(tiny_config, "UniSRec")
    tokens = train._dataset.field2id_token["item_id"]
    assert net.text[0].abs().sum() == 0  # padding
    # the fixture's column 0 holds the item's own token; norm none keeps the stored values
    np.testing.assert_array_equal(net.text[1:, 0].numpy(), [float(t) for t in tokens[1:]])


def test_unisrec_adaptor_and_scores_are_the_papers_formulas(tiny_config):
    torch.manual_seed(0)
    pw = PWLayer(6, 4, dropout=0.0).double()
    with torch.no_grad():
        pw.bias.normal_()
    x = torch.randn(5, 6, dtype=torch.double)
    torch.testing.assert_close(pw(x), (x - pw.bias) @ pw.lin.weight.T)
    moe = MoEAdaptor(3, 6, 4, dropout=0.0).double().eval()
    experts = torch.stack([e(x) for e in moe.experts], 1)  # [5 3 4]
    torch.testing.assert_close(moe(x), experts.mean(1))  # zero gate weights at init: uniform gates
    with torch.no_grad():
        moe.w_gate.normal_()
    gates = F.softmax(x @ moe.w_gate, -1)
    torch.testing.assert_close(moe(x), (gates[..., None] * experts).sum(1))
    moe.train()  # noisy gates while training
    assert not torch.allclose(moe(x), (gates[..., None] * experts).sum(1))

    _, net, _, (_, valid, _) = build(tiny_config, "UniSRec")
    net.eval()
    batch = next(iter(valid))[0]
    with torch.no_grad():
        table = net.adaptor(net.text) + net.item_embedding.weight  # transductive: text + ID
        hidden = net.forward(batch["item_id_list"], batch["item_length"])
        expected = F.normalize(hidden, dim=-1) @ F.normalize(table, dim=-1).T / 0.07
        torch.testing.assert_close(net.full_sort_predict(batch), expected)
        net.item_embedding.weight[5] += 1.0  # an in-place edit: the cached table is recomputed
        assert not torch.allclose(net.full_sort_predict(batch)[:, 5], expected[:, 5])


@pytest.mark.parametrize("modality", ["id", "image", "text_image_id"])
def test_unisrec_refuses_other_item_representations(tiny_config, modality):
    with pytest.raises(ValueError, match=f"UniSRec: fmrl_modality must be one of .*got '{modality}'"):
        build(tiny_config, "UniSRec", fmrl_modality=modality)


# ------------------------------------------------------------------------------ learning and reload

def popularity_ndcg10(train, test):
    """NDCG@10 of ranking every item by its training count, on the test users (no history masked)."""
    counts = torch.bincount(train._dataset.inter_feat["item_id"], minlength=train._dataset.item_num).double()
    gains = []
    for batch in test:
        positives = batch[3]
        score = counts[positives]
        rank = (counts[None, 1:] > score[:, None]).sum(1)  # items strictly more popular than the target
        gains += [1 / math.log2(r + 2) if r < 10 else 0.0 for r in rank.tolist()]
    return sum(gains) / len(gains)


# UniSRec whitened: the fixture's text column 0 holds the item token (100-129), one direction shared by every
# item that the experts' learned centre would need thousands of steps to remove (real encoders' rows are unit norm)
@pytest.mark.parametrize("model,extra", [("BSARec", {}), ("UniSRec", {"fmrl_feature_norm": "whiten"})])
def test_learns_beyond_popularity_and_reloads_to_the_same_metrics(tiny_config, model, extra):
    cfg = tiny_config(epochs=6, **SMALL[model], **extra)
    result = run(model, "tiny", config_dict=cfg, log=False)
    losses = [r["train_loss"] for r in result["records"]]
    assert max(losses[1:]) < losses[0] and losses[-1] < 0.9 * losses[0], losses  # the loss falls
    _, _, trainer, (train, _, test) = prepare(model=model, dataset="tiny", config_dict=cfg, log=False)
    popularity = popularity_ndcg10(train, test)
    assert result["test_result"]["ndcg@10"] > popularity + 0.1, (result["test_result"], popularity)
    state = checkpoint.load(result["saved_model_file"])  # weights-only load
    assert state["config"]["model"] == model
    reloaded = trainer.evaluate(test, load_best_model=True, model_file=result["saved_model_file"])
    assert reloaded == result["test_result"]


# ----------------------------------------------------------------------------------------- harness

def test_harness_rows_run_and_report_their_settings(tmp_path, tiny_root):
    import json

    from benchmarks import run_benchmark

    args = ["--dataset", "tiny", "--data-path", str(tiny_root), "--models", "BSARec,UniSRec", "--max-epochs", "1",
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--isolation", "inprocess",
            "--set", "state=ERROR", "--set", "hidden_size=16", "--set", "inner_size=32", "--set", "n_heads=2",
            "--set", "MAX_ITEM_LIST_LENGTH=20", "--set", "topk=[5,10,20]"]
    assert run_benchmark.main(args) == 0
    from benchmarks import bench_report

    results = {row: json.loads((tmp_path / "results" / "tiny" / "runs" / "cpu" / row / "seed-2020.json").read_text())
               for row in ("BSARec", "UniSRec")}
    assert all(r["status"] == "ok" and r["model"] == row for row, r in results.items())
    assert bench_report.settings_text(results["BSARec"]) == \
        "d=16, 2 blk, alpha 0.7, c 5, prefix samples, drop 0.5, adam lr 0.0005 bs 256"
    assert bench_report.settings_text(results["UniSRec"]) == \
        "d=16, 2 blk, text + ID, 8 experts, tau 0.07, raw features, prefix samples, drop 0.5, adam lr 0.001 bs 2048"
    report = (tmp_path / "results" / "tiny.md").read_text()
    assert "| ID-based | BSARec |" in report and "| Text-based | UniSRec |" in report
    bare = tmp_path / "bare" / "bare"  # no feature tables, no .item file: UniSRec cannot run there
    bare.mkdir(parents=True)
    settings = run_benchmark.load_settings("bare")
    model, config = run_benchmark.row_config(settings, "UniSRec", "cpu")
    assert run_benchmark.unavailable_reason(settings, "UniSRec", model, config, str(bare.parent), "bare") == \
        f"no text features for bare in {bare}"
    model, config = run_benchmark.row_config(settings, "BSARec", "cpu")
    assert run_benchmark.unavailable_reason(settings, "BSARec", model, config, str(bare.parent), "bare") is None


def test_table2_spaces_give_every_row_the_same_budget():
    from recbole_fmrl.tune import space as tune_space

    models = {}
    for name in ("fmrlrec-table2", "sasrecap-table2", "bsarec-table2", "unisrec-table2", "lrurec-table2"):
        job = tune_space.build_job(name, "ml-100k")
        models[job["model"]] = job
        assert sorted(job["space"]) == ["hidden_dropout_prob", "hidden_size", "learning_rate"]
        assert tune_space.grid_points(job["space"], job["search"]) == 8 and job["seeds"] == [2020, 2021, 2022]
        assert job["scheduler"] == "fifo" and job["base"]["stopping_step"] == 10 and job["base"]["epochs"] == 200
        cfg = tune_space.trial_config_dict(job, {"hidden_size": 64, "hidden_dropout_prob": 0.3, "learning_rate": 1e-3})
        assert cfg["attn_dropout_prob"] == 0.3
    assert sorted(models) == ["BSARec", "FMRLRec", "LRURec", "SASRecAP", "UniSRec"]
    assert models["BSARec"]["base"]["bsarec_alpha"] == 0.7 and models["SASRecAP"]["base"]["train_batch_size"] == 512
