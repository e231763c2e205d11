"""Issue 11's quality levers: SASRec at every position, hybrid text+ID items, single-size rows and the
nested-vs-independent report, on the tiny dataset and synthetic benchmark results."""
import csv
import json
import math

import pytest
import torch
from torch.nn import functional as F

from benchmarks import bench_report, run_benchmark
from recbole_fmrl.data.modality import has_id_table, modality_parts
from recbole_fmrl.errors import InputError
from recbole_fmrl.train.driver import prepare, run
from recbole_fmrl.train.trainer import select_score
from tests.conftest import write_tiny_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def build(tiny_config, model, **overrides):
    return prepare(model=model, dataset="tiny", config_dict=tiny_config(**overrides), log=False)


# ------------------------------------------------------------------------------- SASRec, all positions

def sasrec(tiny_config, **overrides):
    settings = dict(hidden_size=16, inner_size=32, n_layers=2, n_heads=2, hidden_dropout_prob=0.0,
                    attn_dropout_prob=0.0, **overrides)
    config, net, trainer, data = build(tiny_config, "SASRecAP", **settings)
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return config, net.double().eval(), trainer, data


def test_sasrecap_is_causal_and_ignores_padding(tiny_config):
    _, net, _, (train, _, _) = sasrec(tiny_config)
    batch = next(iter(train))
    seq, lengths = batch["item_id_list"], batch["item_length"]
    b = int(torch.argmax(lengths))
    t = int(lengths[b]) // 2
    changed = seq.clone()
    changed[b, t] = 1 + (changed[b, t] % (net.n_items - 1))  # another real item at position t
    with torch.no_grad():
        before, after = net.encode(seq, lengths), net.encode(changed, lengths)  # [B L d]
        torch.testing.assert_close(after[b, :t], before[b, :t], rtol=0, atol=1e-12)
        assert (after[b, t:lengths[b]] - before[b, t:lengths[b]]).abs().max() > 1e-6  # later positions see it
        # items after the sequence end (padding slots) change no real position
        junk = torch.where(torch.arange(seq.shape[1])[None] >= lengths[:, None],
                           torch.randint(1, net.n_items, seq.shape), seq)
        real = torch.arange(before.shape[1])[None] < lengths[:, None]
        torch.testing.assert_close(net.encode(junk, lengths)[real], before[real], rtol=0, atol=1e-12)


def test_sasrecap_loss_equals_a_per_position_reference(tiny_config):
    _, net, _, (train, _, _) = sasrec(tiny_config)
    batch = next(iter(train))
    targets = batch[net.target_list_field]  # [B L], 0 = no label
    assert (targets > 0).sum() > len(targets)  # every window is labelled at many positions
    with torch.no_grad():
        loss = net.calculate_loss(batch)
        terms = []  # each position on its own: the prefix up to it run alone, its next item scored
        for b in range(len(targets)):
            for t in torch.nonzero(targets[b] > 0).flatten().tolist():
                prefix = batch["item_id_list"][b : b + 1, : t + 1]
                hidden = net.forward(prefix, torch.tensor([t + 1]))  # [1 d]
                logits = hidden @ net.item_embedding.weight[1:].T
                terms.append(F.cross_entropy(logits, targets[b, t : t + 1] - 1))
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-9, atol=1e-9)


def test_sasrecap_last_position_samples_train_the_last_state(tiny_config):
    _, net, _, (train, _, _) = sasrec(tiny_config, fmrl_train_objective="last_position")
    batch = next(iter(train))
    assert net.target_list_field not in batch
    with torch.no_grad():
        hidden = net.forward(batch["item_id_list"], batch["item_length"])
        ref = F.cross_entropy(hidden @ net.item_embedding.weight[1:].T, batch["item_id"] - 1)
        torch.testing.assert_close(net.calculate_loss(batch), ref, rtol=1e-9, atol=1e-9)
        scores = net.full_sort_predict(batch)
        torch.testing.assert_close(net.predict(batch), scores.gather(1, batch["item_id"][:, None])[:, 0])


def test_sasrecap_learns_on_tiny_data(tiny_config):
    cfg = tiny_config(hidden_size=16, inner_size=32, epochs=12, learning_rate=0.01)
    result = run("SASRecAP", "tiny", config_dict=cfg, log=False)
    losses = [r["train_loss"] for r in result["records"]]
    assert losses[-1] < 0.75 * losses[0]
    # the tiny data walks item -> item + 1 80% of the time (30 items; a random ranking has NDCG@10 ~0.15)
    assert result["best_valid_result"]["ndcg@10"] > 0.5 and result["test_result"]["recall@10"] > 0.6


# ------------------------------------------------------------------------------- hybrid text + ID items

def test_hybrid_modalities_read_features_and_add_an_id_table():
    assert modality_parts("text_id") == ["text"] and modality_parts("text_image_id") == ["text", "image"]
    assert modality_parts("image_id") == ["image"] and modality_parts("id") == []
    assert [has_id_table(m) for m in ("text_id", "image_id", "text_image_id", "id", "text", "text_image")] == \
        [True, True, True, True, False, False]
    with pytest.raises(ValueError, match="unknown value"):
        modality_parts("id_text")


@pytest.mark.parametrize("modality", ["text_id", "text_image_id"])
def test_hybrid_items_are_features_plus_ids_and_every_size_is_its_slice(tiny_config, modality):
    config, net, _, data = build(tiny_config, "FMRLRec", hidden_size=32, fmrl_sizes=[8, 16, 32], n_layers=2,
                                 fmrl_modality=modality)
    encoder = net.network.item_encoder
    assert encoder.ids.embedding.weight.shape == (net.n_items, 32)
    net = net.double().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "params_log" not in name:
                p.add_(0.05 * torch.randn_like(p) * (p != 0 if p.ndim == 2 and "embedding" not in name and "proj" not in name else 1))
        table = encoder()
        torch.testing.assert_close(table, encoder.proj(encoder.features.double()) + encoder.ids.embedding.weight)
        interaction = next(iter(data[1]))[0]
        scores = net.full_sort_predict_sizes(interaction)  # [K B N+1]
        for k, m in enumerate(net.sizes):
            small = net.submodel(m).double().eval()
            assert small.item_encoder.ids.embedding.weight.shape == (net.n_items, m)
            torch.testing.assert_close(small.item_encoder.ids.embedding.weight, encoder.ids.embedding.weight[:, :m])
            hidden = small(interaction["item_id_list"], interaction["item_length"])
            torch.testing.assert_close(small.scores(hidden), scores[k], rtol=1e-9, atol=1e-9)
        encoder.ids.embedding.weight[1:, :8].add_(1.0)  # the ID table takes part in every size's scores
        net.eval()  # drops the cached evaluation item table
        assert not torch.allclose(net.full_sort_predict_sizes(interaction)[0], scores[0])


def test_hybrid_text_id_learns_on_tiny_data(tiny_config):
    """The tiny data's text features are random: what the model learns beyond them lives in the ID table."""
    hybrid, text = (run("FMRLRec", "tiny", config_dict=tiny_config(fmrl_modality=m, epochs=6), log=False)
                    for m in ("text_id", "text"))
    losses = [r["train_loss"] for r in hybrid["records"]]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert hybrid["best_valid_result"]["ndcg@10"] > text["best_valid_result"]["ndcg@10"] + 0.1  # (0.45 vs 0.27)


# ------------------------------------------------------------------------------ single-size benchmark rows

def dry_plan(tmp_path, *extra, dataset="amazon-beauty", device="cpu"):
    """The planned jobs of the real benchmark settings, on a tiny stand-in with text and image features."""
    if not (tmp_path / dataset).is_dir():
        write_tiny_dataset(tmp_path, name=dataset)
    args = run_benchmark.build_parser().parse_args(
        ["--dataset", dataset, "--data-path", str(tmp_path), "--results-dir", str(tmp_path / "r"),
         "--device", device, *extra])
    settings, jobs, skipped, _, _ = run_benchmark.plan(args, [])
    return settings, {j["row"]: j for j in jobs}


@pytest.mark.parametrize("device,sizes", [("cpu", [8, 16, 32, 64, 128, 256]), ("cuda", [8, 16, 32, 64, 128, 256, 512, 1024])])
def test_single_size_rows_copy_the_nested_row_at_each_size(tmp_path, device, sizes):
    weights = [2, 2] + [1] * (len(sizes) - 2)  # favouring small sizes: the nested row only
    _, jobs = dry_plan(tmp_path, "--models", "FMRLRec-text,FMRLRec-text-single-*", "--set", "learning_rate=0.002",
                       "--set", f"FMRLRec-text:fmrl_size_weights={weights}", device=device)
    nested = jobs.pop("FMRLRec-text")["config"]
    assert nested["fmrl_size_weights"] == weights
    assert sorted(jobs) == sorted(f"FMRLRec-text-single-{m}" for m in sizes)
    for m in sizes:
        single = jobs[f"FMRLRec-text-single-{m}"]["config"]
        assert (single["hidden_size"], single["fmrl_sizes"], single["fmrl_size_weights"]) == (m, [m], None)
        same = {k for k in nested if k not in ("hidden_size", "fmrl_sizes", "fmrl_size_weights")}
        assert {k: single[k] for k in same} == {k: nested[k] for k in same}
        assert single["learning_rate"] == 0.002 and single["fmrl_modality"] == "text"


def test_single_size_rows_are_chosen_only_when_asked(tmp_path):
    _, jobs = dry_plan(tmp_path, "--models", "FMRLRec-*")
    assert "FMRLRec-text" in jobs and "FMRLRec-text_id" in jobs and not any("-single-" in r for r in jobs)
    _, everything = dry_plan(tmp_path, "--models", "all")
    assert "SASRec-allpos" in everything and not any("-single-" in r for r in everything)
    _, singles = dry_plan(tmp_path, "--models", "single", "--set", "hidden_size=32")
    assert sorted(singles, key=lambda r: int(r.rsplit("-", 1)[1])) == [f"FMRLRec-text-single-{m}" for m in (8, 16, 32)]


# ------------------------------------------------------------------------------ nested-vs-independent report

def fake_result(row, seed, test, valid, sizes=None, params=1000):
    def metrics(x):
        return {k: (2 if k.startswith("recall") else 1) * x for k in bench_report.METRICS}

    size_results = None if sizes is None else {
        str(m): {"params": 100 * m, "test": metrics(t), "valid": metrics(v)} for m, (t, v) in sizes.items()}
    env = {"device": "cpu", "cpu": "test cpu", "gpu": None, "torch": "x", "recbole": "1.2.1"}
    return {"schema": 1, "status": "ok", "row": row, "model": "FMRLRec", "dataset": "toy", "seed": seed, "tag": "cpu",
            "key": "k", "command": "python -m benchmarks.run_benchmark --dataset toy", "config": {}, "resolved": {},
            "test": metrics(test), "valid": metrics(valid),
            "size_results": size_results, "params": params, "epochs": 12, "best_epoch": 7, "stopped_by": "early stopping",
            "valid_curve": [valid], "train_epoch_seconds": 1.0, "valid_epoch_seconds": 0.1, "wall_seconds": 20.0,
            "peak_rss_mb": 100.0, "env": env, "loadavg_start": [1.0], "loadavg_end": [1.0]}


def write_results(root, results):
    for r in results:
        path = root / "toy" / "runs" / "cpu" / r["row"] / f"seed-{r['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_nested_vs_independent_report_on_synthetic_results(tmp_path):
    nested = [fake_result("FMRLRec-text", 1, 0.04, 0.05, {8: (0.01, 0.012), 16: (0.02, 0.022), 32: (0.04, 0.05)}),
              fake_result("FMRLRec-text", 2, 0.06, 0.07, {8: (0.03, 0.032), 16: (0.02, 0.026), 32: (0.06, 0.07)})]
    singles = [fake_result("FMRLRec-text-single-8", 1, 0.04, 0.044, {8: (0.04, 0.044)}, params=800),
               fake_result("FMRLRec-text-single-8", 2, 0.04, 0.04, {8: (0.04, 0.04)}, params=800),
               fake_result("FMRLRec-text-single-32", 1, 0.0625, 0.08, {32: (0.0625, 0.08)}, params=3200)]
    write_results(tmp_path, nested + singles)
    progress = tmp_path / "toy" / "runs" / "cpu" / "FMRLRec-text-single-16" / "seed-1.progress.json"
    progress.parent.mkdir(parents=True)
    progress.write_text(json.dumps({"status": "unfinished", "row": "FMRLRec-text-single-16", "seed": 1, "epochs": 9,
                                    "command": "python -m benchmarks.run_benchmark --dataset toy --models single",
                                    "best_epoch": 8, "best_valid": 0.03, "valid_curve": [0.01] * 7 + [0.03, 0.02]}))
    settings = run_benchmark.load_settings("toy")  # no toy.yaml: rows.yaml and common.yaml only
    written = bench_report.write_report("toy", tmp_path, settings)
    stem = tmp_path / "toy-nested-vs-independent"
    assert {stem.with_suffix(s) for s in (".md", ".csv", ".png")} <= set(written)
    assert stem.with_suffix(".png").stat().st_size > 1000

    pairs = bench_report.nested_vs_independent(bench_report.load_runs(tmp_path, "toy"))
    (key, rows), = pairs.items()
    assert key == ("cpu", "FMRLRec-text") and [p["size"] for p in rows] == [8, 16, 32]
    size8, size16, size32 = rows
    assert size8["test_ndcg@10_nested"] == pytest.approx(0.02) and size8["test_ndcg@10_single"] == pytest.approx(0.04)
    assert size8["test_ndcg@10_ratio"] == pytest.approx(0.5) and size8["test_recall@10_ratio"] == pytest.approx(0.5)
    assert size8["valid_ndcg@10_ratio"] == pytest.approx(0.022 / 0.042)
    assert (size8["nested_seeds"], size8["single_seeds"], size8["single_params"]) == (2, 2, 800)
    assert size16["single_seeds"] == 0 and size16["test_ndcg@10_ratio"] is None  # the independent run is unfinished
    assert size16["valid_ndcg@10_ratio_bound"] == pytest.approx(0.024 / 0.03)  # nested valid mean / best so far
    assert size8["valid_ndcg@10_ratio_bound"] is None and size8["single_unfinished"] == []
    assert size32["test_ndcg@10_ratio"] == pytest.approx(0.05 / 0.0625)

    md = stem.with_suffix(".md").read_text()
    assert "| 8 | 2 / 2 | 0.0200 ± 0.0141 | 0.0400 ± 0.0000 | 0.50 |" in md and "| 32 | 2 / 1 |" in md and "0.80" in md
    assert "| ≤ 0.80 (so far) |" in md and "**unfinished** (seed 1): 9 epochs, best valid N@10 0.0300 at epoch 8" in md
    csv_rows = list(csv.DictReader(open(stem.with_suffix(".csv"))))
    assert json.loads(csv_rows[1]["single_unfinished"])[0]["epochs"] == 9 and csv_rows[0]["single_unfinished"] == ""
    main = (tmp_path / "toy.md").read_text()
    assert "## Nested sizes against independently trained ones" in main and "toy-nested-vs-independent.png" in main
    assert "FMRLRec-text-single-8 |" not in main  # single-size rows stay out of the main table


def test_a_lever_row_sits_beside_its_base_rows_independent_models(tmp_path):
    """rows.yaml ``independent_of``: FMRLRec-text-small-weights' sizes beside FMRLRec-text-single-<m>."""
    write_results(tmp_path, [
        fake_result("FMRLRec-text", 1, 0.04, 0.05, {8: (0.01, 0.012), 16: (0.04, 0.05)}),
        fake_result("FMRLRec-text-small-weights", 1, 0.035, 0.045, {8: (0.03, 0.033), 16: (0.035, 0.045)}),
        fake_result("FMRLRec-text-single-8", 1, 0.04, 0.044, {8: (0.04, 0.044)}, params=800)])
    settings = run_benchmark.load_settings("toy")
    assert settings["rows"]["FMRLRec-text-small-weights"]["independent_of"] == "FMRLRec-text"
    pairs = bench_report.nested_vs_independent(bench_report.load_runs(tmp_path, "toy"), settings)
    assert list(pairs) == [("cpu", "FMRLRec-text"), ("cpu", "FMRLRec-text-small-weights")]
    lever8 = pairs["cpu", "FMRLRec-text-small-weights"][0]
    assert lever8["test_ndcg@10_ratio"] == pytest.approx(0.03 / 0.04) and lever8["independent_of"] == "FMRLRec-text"
    section = "\n".join(bench_report.nested_markdown(pairs, "x.png"))
    assert "### FMRLRec-text-small-weights (cpu)\n\nIndependent side: `FMRLRec-text-single-<m>`" in section
    assert bench_report.nested_vs_independent(bench_report.load_runs(tmp_path, "toy")).keys() == {("cpu", "FMRLRec-text")}


# ------------------------------------------------------------------------------------ per-size weights

def test_size_weights_as_a_mapping_fit_any_largest_size(tiny_config):
    """{size: weight} with unlisted sizes at 1: the same setting favours the small sizes at every d."""
    for hidden, sizes, expected in ((16, [8, 16], [3, 1]), (32, [8, 16, 32], [3, 2, 1])):
        _, net, _, (train, _, _) = build(tiny_config, "FMRLRec", hidden_size=hidden, fmrl_sizes=sizes,
                                         fmrl_size_weights={8: 3, 16: 2} if hidden == 32 else {8: 3})
        torch.testing.assert_close(net.size_weights, torch.tensor(expected, dtype=torch.float) / sum(expected))
    per_size = net.calculate_loss(next(iter(train)))  # RecBole sums the weighted per-size terms
    assert len(per_size) == 3 and all(torch.isfinite(t) for t in per_size)
    _, listed, _, _ = build(tiny_config, "FMRLRec", hidden_size=32, fmrl_sizes=[8, 16, 32], fmrl_size_weights=[3, 2, 1])
    torch.testing.assert_close(listed.size_weights, net.size_weights)


# ----------------------------------------------------------------------- selection over every size

@pytest.mark.parametrize("rule", ["mean", "geomean"])
def test_select_on_every_size_drives_early_stopping_and_the_best_checkpoint(tiny_config, rule):
    """The score each validation hands early stopping is the rule applied to every size's NDCG@10,
    even when the harness asked for largest-size-only validation; the best epoch maximises it."""
    records = []
    result = run("FMRLRec", "tiny", config_dict=tiny_config(epochs=4, fmrl_select_on=rule, fmrl_valid_every_size=False),
                 on_evaluation=records.append, log=False)
    for r in records:
        per_size = [s["ndcg@10"] for s in r["size_results"].values()]
        expected = sum(per_size) / 2 if rule == "mean" else math.sqrt(per_size[0] * per_size[1])
        assert r["valid_score"] == pytest.approx(expected, rel=1e-9)
        assert r["valid_result"]["ndcg@10"] == r["size_results"][16]["ndcg@10"]  # the result stays the largest's
    scores = [r["valid_score"] for r in records]
    best = max(range(len(scores)), key=scores.__getitem__)
    assert records[-1]["best_epoch"] == records[best]["epoch"] and result["best_valid_score"] == scores[best]
    # the tested checkpoint is the selected epoch's: its validation at every size reproduces that epoch's
    assert result["size_results"][8]["valid"]["ndcg@10"] == pytest.approx(records[best]["size_results"][8]["ndcg@10"])


def test_select_on_names_the_key_for_an_unknown_rule(tiny_config):
    with pytest.raises(InputError, match=r"^fmrl_select_on='median' \(given as key=value\): need one of largest, mean, geomean, per_size$"):
        build(tiny_config, "FMRLRec", fmrl_select_on="median")


def test_geomean_selection_scores_zero_when_a_size_scores_zero():
    assert select_score([0.0, 0.04], "geomean") == 0.0 and select_score([0.01, 0.04], "geomean") == pytest.approx(0.02)
    assert select_score([0.01, 0.04], "mean") == pytest.approx(0.025)


def test_report_names_a_mean_selection_score_for_what_it_is():
    settings = run_benchmark.load_settings("toy")
    assert bench_report.score_name(settings["rows"]["FMRLRec-text"]) == "validation NDCG@10"
    geomean = bench_report.score_name(settings["rows"]["FMRLRec-text-select-geomean"])
    progress = [{"seed": 1, "epochs": 3, "best_epoch": 3, "best_valid": 0.02}]
    assert "best validation score (geomean of every size's NDCG@10) 0.0200 at epoch 3" in \
        bench_report.unfinished_text(progress, geomean)


# ------------------------------------------------------------------------------- history-masked evaluation

def _reference_ndcg(scores, interaction, mask, k=10):
    """NDCG@k of the positive item by hand: padding excluded, and with ``mask`` the input window's items."""
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    for b, row in enumerate(interaction["item_id_list"]):
        if mask:
            scores[b, row[row > 0]] = -torch.inf
    positive = scores.gather(1, interaction["item_id"][:, None])  # [B 1]
    rank = (scores > positive).sum(1)  # [B], 0 = first
    return torch.where(rank < k, 1.0 / torch.log2(rank.double() + 2), torch.zeros_like(rank, dtype=torch.double))


@pytest.mark.parametrize("model", ["FMRLRec", "SASRecAP", "LRURec"])
def test_history_masked_evaluation_equals_a_hand_ranking(tiny_config, model):
    extra = {"inner_size": 32} if model in ("SASRecAP", "LRURec") else {}
    config, net, trainer, (train, _, test) = build(tiny_config, model, epochs=3, metric_decimal_place=12, **extra)
    trainer.fit(train, None, saved=False)
    terms = {}
    with torch.no_grad():
        net.eval()
        for interaction, _, _, _ in test:
            per_size = net.full_sort_predict_sizes(interaction) if hasattr(net, "sizes") else \
                net.full_sort_predict(interaction)[None]
            for k, scores in enumerate(per_size):
                for mask in (False, True):
                    terms.setdefault((mask, k), []).append(_reference_ndcg(scores, interaction, mask))
    largest = len(net.sizes) - 1 if hasattr(net, "sizes") else 0
    results = {}
    for mask in (False, True):
        trainer.mask_history = mask  # read once from fmrl_eval_mask_history when the trainer is built
        results[mask] = trainer.evaluate(test, load_best_model=False)["ndcg@10"]
        assert results[mask] == pytest.approx(float(torch.cat(terms[mask, largest]).mean()), abs=1e-9)
        for k, m in enumerate(getattr(net, "sizes", [])):  # every nested size is masked alike
            assert trainer.size_results[m]["ndcg@10"] == pytest.approx(float(torch.cat(terms[mask, k]).mean()), abs=1e-9)
    assert results[True] != results[False]  # the tiny walk's histories do compete for the top 10
