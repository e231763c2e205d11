"""benchmarks/table2.py: both protocols' real harness results side by side, reported numbers, how rows stopped."""
import csv
import json

import pytest
import torch

from benchmarks import run_benchmark, table2


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def harness(tiny_root, tmp_path, results, models, *extra):
    args = ["--dataset", "tiny", "--data-path", str(tiny_root), "--models", models, "--max-epochs", "30",
            "--results-dir", str(results), "--work-dir", str(tmp_path / "work" / results.name), "--isolation", "inprocess",
            "--set", "state=ERROR", "--set", "hidden_size=16", "--set", "inner_size=32", "--set", "stopping_step=1", "--set", "learning_rate=0.01",
            "--set", "MAX_ITEM_LIST_LENGTH=20", "--set", "topk=[5,10,20]", *extra]
    assert run_benchmark.main(args) == 0


def test_table2_puts_both_protocols_and_the_reported_numbers_beside_each_row(tiny_root, tmp_path, monkeypatch):
    results = tmp_path / "results"
    harness(tiny_root, tmp_path, results, "LRURec,GRU4Rec")
    harness(tiny_root, tmp_path, results / "history-excluded", "LRURec", "--set", "fmrl_eval_mask_history=True")
    load = run_benchmark.load_settings

    def with_numbers(dataset, props=run_benchmark.PROPS):
        settings = load(dataset, props)
        settings["dataset"] = {"title": "Tiny", "paper": {"LRURec": {"ndcg@10": 0.0438, "recall@10": 0.0871}},
                               "published": {"LRURec": {"protocol": "history-excluded", "ndcg@10": 0.5, "recall@10": 0.6,
                                                        "source": "a paper"}},
                               "not_run": {"GRU4Rec": "only on the paper protocol here"}}
        return settings

    monkeypatch.setattr(run_benchmark, "load_settings", with_numbers)
    assert table2.main(["--results", str(results), "--datasets", "tiny", "--rows", "LRURec,GRU4Rec,BSARec"]) == 0
    text = (results / "table2.md").read_text()

    def run(sub, row):
        return json.loads((results / sub / "tiny" / "runs" / "cpu" / row / "seed-2020.json").read_text())

    paper, masked = run("", "LRURec"), run("history-excluded", "LRURec")
    assert masked["resolved"]["fmrl_eval_mask_history"] is True and not paper["resolved"]["fmrl_eval_mask_history"]
    assert masked["stopped_by"] == paper["stopped_by"] == "early stopping"
    line = next(r for r in text.splitlines() if r.startswith("| ID-based | LRURec |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    gru = run("", "GRU4Rec")
    for i, metric in enumerate(("ndcg@5", "recall@5", "ndcg@10", "recall@10")):
        best = max(paper["test"][metric], gru["test"][metric])
        expected = f"{paper['test'][metric]:.4f}"
        assert cells[2 + i] == (f"**{expected}**" if paper["test"][metric] == best else expected)
        assert cells[7 + i] == f"**{masked['test'][metric]:.4f}**"  # the only history-excluded result: the best
    assert cells[6] == "0.0438 / 0.0871" and cells[11] == "0.5000 / 0.6000"
    assert cells[12] == f"early stopping, {paper['epochs']} ep (best {paper['best_epoch']}), 1 seed(s), cpu"
    gru_line = next(r for r in text.splitlines() if r.startswith("| ID-based | GRU4Rec |"))
    assert gru_line.endswith("| not run |")
    assert "- GRU4Rec, history excluded: **not run**: only on the paper protocol here" in text
    assert "- BSARec" not in text  # not run, and nothing more to say
    assert "LRURec: fMRLRec paper; LRURec: a paper." in text
    table = list(csv.DictReader((results / "table2.csv").open()))
    assert [(r["row"], r["protocol"], r["status"]) for r in table] == [
        ("LRURec", "paper", "ok"), ("LRURec", "history-excluded", "ok"), ("GRU4Rec", "paper", "ok"),
        ("GRU4Rec", "history-excluded", "not run"), ("BSARec", "paper", "not run"), ("BSARec", "history-excluded", "not run")]
    assert float(table[1]["test_ndcg@10"]) == masked["test"]["ndcg@10"]


def test_table2_picks_the_tag_with_more_seeds_then_the_better_validation():
    def summary(tag, n, valid, status="ok"):
        return {"tag": tag, "n_seeds": n, "valid_ndcg@10": valid, "status": status}

    assert table2.pick([summary("cpu", 1, 0.9), summary("cuda", 3, 0.1)])["tag"] == "cuda"
    assert table2.pick([summary("cpu", 3, 0.2), summary("cuda", 3, 0.1)])["tag"] == "cpu"
    assert table2.pick([summary("cpu", 0, None, "not run"), summary("cuda", 0, None, "not converged")])["tag"] == "cuda"
