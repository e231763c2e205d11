"""FMLPRec and LRURec (plugin baselines) and the benchmark harness's resume logic, on the tiny dataset."""
import csv
import json
import math
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from recbole.data.interaction import Interaction
from torch.nn import functional as F

from recbole_fmrl.model import network as network_module
from recbole_fmrl.model.fmlprec import FilterLayer, FMLPRec
from recbole_fmrl.train.driver import prepare, run
from tests.conftest import write_tiny_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
import run_benchmark  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # on a shared CPU, 2 threads made these small models ~10x slower


def build(tiny_config, model, **overrides):
    cfg = tiny_config(**{"hidden_size": 16, "inner_size": 32, **overrides})
    return prepare(model=model, dataset="tiny", config_dict=cfg, log=False)


# ------------------------------------------------------------------------------------------- FMLPRec

@pytest.mark.parametrize("objective,filter_", [("last_position", "global"), ("all_positions", "causal")])
def test_fmlprec_shapes_and_loss(tiny_config, objective, filter_):
    config, net, _, (train, valid, _) = build(tiny_config, "FMLPRec", fmrl_train_objective=objective,
                                              fmlp_filter=filter_)
    assert len(net.blocks) == 2 and net.blocks[0][0].causal == (filter_ == "causal")
    batch = next(iter(train))
    assert (net.target_list_field in batch) == (objective == "all_positions")
    out = net.forward(batch["item_id_list"], batch["item_length"])
    assert out.shape == (*batch["item_id_list"].shape, 16)
    loss = net.calculate_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert net.blocks[0][0].complex_weight.grad.abs().sum() > 0
    eval_batch = next(iter(valid))[0]
    net.eval()
    scores = net.full_sort_predict(eval_batch)
    assert scores.shape == (len(eval_batch), net.n_items)
    torch.testing.assert_close(net.predict(eval_batch), scores.gather(1, eval_batch["item_id"][:, None])[:, 0])


def test_fmlprec_all_positions_needs_causal_filter(tiny_config):
    with pytest.raises(ValueError, match=r"^fmlp_filter='global' .*need causal with fmrl_train_objective=all_positions"):
        build(tiny_config, "FMLPRec", fmrl_train_objective="all_positions", fmlp_filter="global")


def test_fmlprec_left_alignment():
    seq_len = torch.tensor([3, 5, 1])
    seq = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]])
    aligned = seq.gather(1, FMLPRec.left_align_index(seq_len, 5))
    assert aligned.tolist() == [[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 9]]


def test_fmlp_causal_filter_is_a_causal_linear_convolution():
    torch.manual_seed(0)
    layer = FilterLayer(max_len=10, hidden_size=4, dropout=0.0, eps=1e-12, causal=True).double()
    with torch.no_grad():
        layer.complex_weight.normal_()
    x = torch.randn(2, 10, 4, dtype=torch.double)
    k = layer.kernel()  # [L H]
    conv = torch.stack([sum(k[t - s] * x[:, s] for s in range(t + 1)) for t in range(10)], dim=1)
    torch.testing.assert_close(layer(x), layer.layer_norm(conv + x), rtol=1e-9, atol=1e-9)
    x2 = x.clone()
    x2[:, 6:] = torch.randn_like(x2[:, 6:])
    torch.testing.assert_close(layer(x2)[:, :6], layer(x)[:, :6], rtol=0, atol=1e-12)


def test_fmlp_global_filter_with_unit_response_is_identity():
    layer = FilterLayer(max_len=8, hidden_size=4, dropout=0.0, eps=1e-12, causal=False).double()
    with torch.no_grad():
        layer.complex_weight.zero_()
        layer.complex_weight[..., 0] = 1.0
    x = torch.randn(3, 8, 4, dtype=torch.double)
    torch.testing.assert_close(layer(x), layer.layer_norm(2 * x))


# -------------------------------------------------------------------------------------------- LRURec

@pytest.mark.parametrize("objective", ["all_positions", "last_position"])
def test_lrurec_settings_shapes_and_loss(tiny_config, objective):
    config, net, _, (train, valid, _) = build(tiny_config, "LRURec", inner_size=64, fmrl_train_objective=objective)
    assert len(net.blocks) == 2 and net.item_bias.shape == (net.n_items,)
    for block in net.blocks:
        lru = block.lru
        assert type(lru) is network_module.LRULayer  # the very layer FMRLRec's network uses
        assert lru.state_size == 32 and lru.sizes == [16]
        radius = torch.exp(lru.log_lambda()[0])
        assert radius.min() >= 0.8 - 1e-5 and radius.max() <= 0.99 + 1e-5
        assert lru.in_im.weight.abs().sum() > 0  # complex parts initialised too (truncated normal)
        assert block.w_1.out_features == 64
    for name, p in net.named_parameters():  # truncated normal: std 0.02 clipped to +-0.04
        if "layer_norm" not in name and "params_log" not in name:
            assert p.abs().max() <= 0.04 + 1e-7, name
    batch = next(iter(train))
    out, packing = net.encode(batch["item_id_list"], batch["item_length"])
    assert out.shape == (int(batch["item_length"].sum()), 16)  # real tokens only
    assert net.forward(batch["item_id_list"], batch["item_length"]).shape == (len(batch), 16)
    # post-LN: every block ends in a LayerNorm (unit affine at init)
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[0]), atol=1e-5, rtol=0)
    loss = net.calculate_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert net.item_bias.grad.abs().sum() > 0
    net.eval()
    eval_batch = next(iter(valid))[0]
    assert net.full_sort_predict(eval_batch).shape == (len(eval_batch), net.n_items)


def stepwise_lru(lru, u):
    """The LRU written as the paper's recurrence, one complex step at a time (float64)."""
    nu_log, theta_log, gamma_log = lru.params_log
    lam = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
    gamma = torch.exp(gamma_log)
    b_w = torch.complex(lru.in_re.masked_weight(), lru.in_im.masked_weight())
    b_b = torch.complex(lru.in_re.bias, lru.in_im.bias)
    c_w = torch.complex(lru.out_re.masked_weight(), lru.out_im.masked_weight())
    h = torch.zeros(u.shape[0], lru.state_size, dtype=lam.dtype)
    outs = []
    for t in range(u.shape[1]):
        h = lam * h + gamma * (u[:, t].to(lam.dtype) @ b_w.T + b_b)
        outs.append((h @ c_w.T).real + lru.out_re.bias)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("scan", ["dense", "doubling"])
def test_lrurec_lru_equals_stepwise_recurrence(tiny_config, scan):
    _, net, _, (_, valid, _) = build(tiny_config, "LRURec", fmrl_scan=scan)
    net = net.double().eval()
    lru = net.blocks[0].lru
    u = torch.randn(3, 11, 16, dtype=torch.double)
    torch.testing.assert_close(lru(u), stepwise_lru(lru, u), rtol=1e-10, atol=1e-10)
    # right padding needs no mask: what follows the last item cannot change its prediction
    batch = next(iter(valid))[0]
    seq, lengths = batch["item_id_list"], batch["item_length"]
    junk = torch.randint(1, net.n_items, seq.shape)
    after = torch.arange(seq.shape[1])[None] >= lengths[:, None]
    noisy = Interaction({**batch.interaction, "item_id_list": torch.where(after, junk, seq)})
    assert not torch.equal(noisy["item_id_list"], seq)
    with torch.no_grad():
        torch.testing.assert_close(net.full_sort_predict(noisy), net.full_sort_predict(batch))


def test_lrurec_packed_tokens_equal_the_padded_computation(tiny_config):
    _, net, _, (_, valid, _) = build(tiny_config, "LRURec")
    net = net.double().eval()
    batch = next(iter(valid))[0]
    seq, lengths = batch["item_id_list"], batch["item_length"]
    with torch.no_grad():
        x = net.embedding_layer_norm(net.item_embedding(seq))  # [B L d], padding included
        for block in net.blocks:  # the LRU on the full padded grid, position-wise layers everywhere
            h = block.lru_layer_norm(x + block.lru(x))
            x = block.ffn_layer_norm(h + block.w_2(F.gelu(block.w_1(h))))
        expected = x[torch.arange(len(seq)), lengths - 1]
        torch.testing.assert_close(net.forward(seq, lengths), expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ 1-epoch runs

@pytest.mark.parametrize("model", ["FMLPRec", "LRURec"])
def test_one_epoch_run(tiny_config, model):
    result = run(model, "tiny", config_dict=tiny_config(epochs=1, hidden_size=16, inner_size=32), log=False)
    assert result["epochs"] == 1 and result["size_results"] is None
    for split in ("best_valid_result", "test_result"):
        assert 0.0 <= result[split]["ndcg@10"] <= 1.0 and math.isfinite(result[split]["recall@10"])


# ----------------------------------------------------------------------------------------- harness

def harness_args(data, tmp_path, models, *extra):
    return ["--dataset", data.name, "--data-path", str(data.parent), "--models", models, "--max-epochs", "1",
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"),
            "--isolation", "inprocess", "--set", "state=ERROR", "--set", "hidden_size=16",
            "--set", "FMRLRec-*:fmrl_sizes=[8,16]", "--set", "MAX_ITEM_LIST_LENGTH=20",
            "--set", "topk=[5,10,20]", *extra]


def test_harness_resumes_without_redoing_finished_rows(tmp_path, monkeypatch, capsys):
    data = write_tiny_dataset(tmp_path / "data", name="tinynoimg", with_image=False)
    args = harness_args(data, tmp_path, "LRURec,FMRLRec-image")
    assert run_benchmark.main(args) == 0
    done = tmp_path / "results" / "tinynoimg" / "runs" / "cpu" / "LRURec" / "seed-2020.json"
    result = json.loads(done.read_text())
    assert result["status"] == "ok" and result["epochs"] == 1 and result["params"] > 0
    assert result["peak_rss_mb"] > 0 and result["train_epoch_seconds"] > 0
    report = (tmp_path / "results" / "tinynoimg.md").read_text()
    assert "| LRURec |" in report and "**cannot run**: no image features" in report
    assert (tmp_path / "results" / "tinynoimg.csv").is_file()
    stamp = done.stat().st_mtime_ns

    calls = []

    def fake_execute(job):
        calls.append(job["row"])
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(run_benchmark, "execute", fake_execute)
    capsys.readouterr()
    assert run_benchmark.main(args) == 0  # same settings: nothing runs
    assert calls == [] and done.stat().st_mtime_ns == stamp
    assert "done, skipped" in capsys.readouterr().out
    run_benchmark.main(args[:-2] + ["--set", "topk=[5,10]"])  # changed settings: the row reruns
    assert calls == ["LRURec"]
    assert json.loads(done.read_text())["status"] == "ok"  # a failed rerun keeps the finished result
    assert done.with_suffix(".failed.json").is_file()
    calls.clear()
    inter = data / f"{data.name}.inter"
    inter.write_text("".join(inter.read_text().splitlines(keepends=True)[:-1]))  # the dataset changed
    run_benchmark.main(args)  # same settings, other data: the finished row is stale
    assert calls == ["LRURec"]


def test_data_fingerprint_follows_the_manifests_file_hashes_not_its_timings(tmp_path):
    folder = tmp_path / "beauty"
    folder.mkdir()
    files = {"inter": {"file": "beauty.inter", "bytes": 10, "sha256": "a" * 64},
             "text": {"file": "beauty.text.npy", "bytes": 20, "sha256": "b" * 64}}

    def fingerprint(**meta):
        (folder / "meta.json").write_text(json.dumps({"files": files, **meta}))
        return run_benchmark.data_fingerprint(tmp_path, "beauty")

    first = fingerprint(timings={"text_features_s": 583.8}, source={"path": "../shared/x"})
    assert fingerprint(timings={"text_features_s": 611.2}, source={"path": "/abs/x"}) == first  # converted again
    files["text"]["sha256"] = "c" * 64
    assert fingerprint(timings={"text_features_s": 583.8}) != first  # other feature content
    (folder / "meta.json").write_text("{not json")  # no readable manifest: the files' sizes
    (folder / "beauty.inter").write_text("user_id:token\n")
    size_based = run_benchmark.data_fingerprint(tmp_path, "beauty")
    (folder / "beauty.inter").write_text("user_id:token\n1\n")
    assert run_benchmark.data_fingerprint(tmp_path, "beauty") != size_based


def test_harness_skips_a_row_another_invocation_is_running(tmp_path, tiny_root, monkeypatch, capsys):
    import socket

    args = harness_args(tiny_root / "tiny", tmp_path, "LRURec")
    lock = tmp_path / "work" / "tiny" / "cpu" / "LRURec" / ".seed-2020.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-11-30 07:00:00"}))
    monkeypatch.setattr(run_benchmark, "execute", lambda job: pytest.fail("ran a row another invocation holds"))
    assert run_benchmark.main(args) == 0
    out = capsys.readouterr().out
    assert (f"LRURec seed 2020 (cpu): skipped: {lock.parent / 'seed-2020'}: another benchmark invocation is running "
            f"this row and seed (pid {os.getppid()} on ") in out
    assert lock.is_file()  # the holder's lock stays


def test_harness_jobs_runs_rows_side_by_side_and_stops_them_all(tmp_path, tiny_root, monkeypatch, capsys):
    import time

    args = harness_args(tiny_root / "tiny", tmp_path, "LRURec,FMLPRec,SASRec", "--seeds", "2")
    args[args.index("--isolation") + 1] = "subprocess"
    with pytest.raises(SystemExit, match="--jobs 3: need at least 1, and runs overlap only with --isolation subprocess"):
        run_benchmark.main(harness_args(tiny_root / "tiny", tmp_path, "LRURec", "--jobs", "3"))
    running, peak, seen, guard = set(), [0], [], threading.Lock()
    first_three = threading.Barrier(3, timeout=60)  # passes only if three runs are in flight together

    def fake_run_job(job, isolation, label):
        with guard:
            running.add(label)
            peak[0] = max(peak[0], len(running))
            seen.append((job["row"], job["seed"]))
        if len(seen) <= 3:
            first_three.wait()
        time.sleep(0.05)
        with guard:
            running.discard(label)
        run_benchmark.atomic_write_json(job["result_path"], {"status": "failed", "seed": job["seed"], "error": "fake"})

    monkeypatch.setattr(run_benchmark, "run_job", fake_run_job)
    assert run_benchmark.main(args + ["--jobs", "3"]) == 0
    assert peak[0] == 3 and sorted(seen) == sorted((r, s) for r in ("LRURec", "FMLPRec", "SASRec") for s in (2020, 2021))

    seen.clear()

    def interrupted(job, isolation, label):  # Ctrl-C while the first run trains: nothing new starts
        seen.append(job["row"])
        raise KeyboardInterrupt

    monkeypatch.setattr(run_benchmark, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark.main(args + ["--jobs", "2"])
    assert len(seen) <= 2


def test_harness_a_worker_killed_while_jobs_stop_is_not_a_failure(tmp_path, monkeypatch, capsys):
    job = {"row": "LRURec", "model": "LRURec", "dataset": "tiny", "tag": "cpu", "seed": 2020, "key": "k", "command": "c",
           "data_fingerprint": None, "output_dir": str(tmp_path / "w"),
           "result_path": str(tmp_path / "r" / "seed-2020.json")}
    monkeypatch.setattr(run_benchmark, "run_subprocess", lambda job, log: -15)
    monkeypatch.setattr(run_benchmark, "_STOPPING", threading.Event())
    run_benchmark._STOPPING.set()
    run_benchmark.run_job(job, "subprocess", "[1/2] LRURec seed 2020 (cpu)")
    assert "[1/2] LRURec seed 2020 (cpu): stopped (the same command resumes it)" in capsys.readouterr().out
    assert not Path(job["result_path"]).with_suffix(".failed.json").exists()
    run_benchmark._STOPPING.clear()  # the same exit outside a stop is a failure, recorded
    run_benchmark.run_job(job, "subprocess", "[1/2] LRURec seed 2020 (cpu)")
    failed = json.loads(Path(job["result_path"]).with_suffix(".failed.json").read_text())
    assert "worker exited with -15" in failed["error"] and "FAILED" in capsys.readouterr().out


def test_harness_jobs_with_real_worker_processes(tmp_path, tiny_root):
    args = harness_args(tiny_root / "tiny", tmp_path, "LRURec,FMRLRec-text", "--jobs", "2")
    args[args.index("--isolation") + 1] = "subprocess"
    assert run_benchmark.main(args) == 0
    runs = tmp_path / "results" / "tiny" / "runs" / "cpu"
    for row in ("LRURec", "FMRLRec-text"):
        result = json.loads((runs / row / "seed-2020.json").read_text())
        assert result["status"] == "ok" and result["isolated"] and result["epochs"] == 1
    report = (tmp_path / "results" / "tiny.md").read_text()
    assert "| LRURec |" in report and "| FMRLRec-text |" in report


def test_harness_time_budget_stops_after_an_epoch(tmp_path, tiny_root):
    args = harness_args(tiny_root / "tiny", tmp_path, "LRURec", "--max-epochs", "5", "--max-train-minutes", "1e-6")
    assert run_benchmark.main(args) == 0
    result = json.loads((tmp_path / "results" / "tiny" / "runs" / "cpu" / "LRURec" / "seed-2020.json").read_text())
    assert result["stopped_by"] == "time budget" and result["epochs"] == 1 and result["best_epoch"] == 1
    report = (tmp_path / "results" / "tiny.md").read_text()  # cut while improving: shown, but not as a result
    line = next(r for r in report.splitlines() if r.startswith("| ID-based | LRURec |"))
    assert "**not converged**: seed 2020 stopped by its 0.0-min training budget after 1 epochs, before early " \
           "stopping" in line and "not a result" in line
    assert f"{result['test']['ndcg@10']:.4f}" not in line.split("**")[0]  # no metric cells


def test_report_counts_a_budget_stop_after_patience_ran_out_as_converged():
    import bench_report

    run = {"stopped_by": "time budget", "epochs": 23, "best_epoch": 12, "resolved": {"stopping_step": 10}}
    assert bench_report.converged(run)  # 11 epochs without a gain: early stopping would have ended it here
    assert not bench_report.converged(dict(run, epochs=22))  # 10: one more epoch might have improved
    assert not bench_report.converged(dict(run, stopped_by="max epochs", epochs=12))
    assert bench_report.converged(dict(run, stopped_by="early stopping", epochs=14))


def test_harness_resumes_an_interrupted_row_from_its_last_epoch(tmp_path, tiny_root, monkeypatch):
    from recbole_fmrl.train import driver

    def run(name):
        args = harness_args(tiny_root / "tiny", tmp_path / name, "LRURec", "--max-epochs", "3")
        assert run_benchmark.main(args) == 0
        return json.loads((tmp_path / name / "results" / "tiny" / "runs" / "cpu" / "LRURec" / "seed-2020.json").read_text())

    whole = run("whole")
    original = driver.fit_and_evaluate

    def killed_after_epoch_1(*args, on_evaluation=None, **kwargs):
        def hook(record):
            on_evaluation(record)
            if record["epoch"] == 1:
                raise KeyboardInterrupt  # as a kill: nothing after this epoch's checkpoint and progress line
        return original(*args, on_evaluation=hook, **kwargs)

    monkeypatch.setattr(driver, "fit_and_evaluate", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    runs_dir = tmp_path / "cut" / "results" / "tiny" / "runs" / "cpu" / "LRURec"
    assert not (runs_dir / "seed-2020.json").exists()
    unfinished = json.loads((runs_dir / "seed-2020.progress.json").read_text())
    assert unfinished["status"] == "unfinished" and unfinished["epochs"] == 2
    assert unfinished["valid_curve"] == whole["valid_curve"][:2]  # the curve so far, for the report
    import bench_report

    settings = run_benchmark.load_settings("tiny")
    bench_report.write_report("tiny", tmp_path / "cut" / "results", settings)
    report = (tmp_path / "cut" / "results" / "tiny.md").read_text()
    assert "| LRURec |" in report and "**unfinished**: seed 2020 unfinished after 2 epochs (still running or interrupted" in report
    assert (tmp_path / "cut" / "results" / "tiny-curves.png").is_file()
    given_up = dict(settings, dataset=dict(settings["dataset"], stopped={"LRU*": "trailed on validation"}))
    bench_report.write_report("tiny", tmp_path / "cut" / "results", given_up)  # a row given up is no longer pending
    report = (tmp_path / "cut" / "results" / "tiny.md").read_text()
    assert "**stopped**: seed 2020 given up after 2 epochs, before early stopping (best validation NDCG@10" in report
    assert "), not a result: trailed on validation |" in report
    assert "still running" not in report.split("| LRURec |")[1].split("\n")[0]
    (runs_dir / "seed-2020.progress.json").unlink()  # as after a kill of a harness without this record:
    args = harness_args(tiny_root / "tiny", tmp_path / "cut", "LRURec", "--max-epochs", "3")
    assert run_benchmark.main(args + ["--report-only"]) == 0  # --report-only rebuilds it from the work folder
    assert json.loads((runs_dir / "seed-2020.progress.json").read_text())["valid_curve"] == unfinished["valid_curve"]
    monkeypatch.setattr(driver, "fit_and_evaluate", original)
    from recbole_fmrl.train.trainer import FMRLTrainer

    trained, train_epoch = [], FMRLTrainer._train_epoch
    monkeypatch.setattr(FMRLTrainer, "_train_epoch", lambda self, data, epoch, **kw: trained.append(epoch) or
                        train_epoch(self, data, epoch, **kw))
    resumed = run("cut")
    assert trained == [2]  # only the epoch the kill cost
    assert resumed["epochs"] == whole["epochs"] == 3 and resumed["valid_curve"] == whole["valid_curve"]
    assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]
    assert not (runs_dir / "seed-2020.progress.json").exists()  # finished: the curve lives in the result
    epochs = [json.loads(line) for line in (tmp_path / "cut" / "work").rglob("progress.jsonl").__next__().open()]
    before = sum(r["train_seconds"] + r["valid_seconds"] for r in epochs[:2])  # the killed invocation's epochs
    assert resumed["wall_seconds"] >= before + resumed["setup_seconds"] + epochs[2]["train_seconds"] + epochs[2]["valid_seconds"]
    assert resumed["resumed_at_epoch"] == 2 and whole["resumed_at_epoch"] is None


def test_harness_largest_size_validation_matches_the_per_size_trainer(tiny_config, tmp_path):
    """Per-epoch validation of the largest size only gives the same curve, checkpoint and results."""
    results = []
    for fast in (True, False):
        config = tiny_config(hidden_size=16, fmrl_sizes=[8, 16], epochs=3, fmrl_modality="text")
        job = {"row": "FMRLRec-text", "model": "FMRLRec", "dataset": "tiny", "seed": 2020, "tag": "cpu", "key": "k",
               "command": "test", "config": config, "device": "cpu", "threads": 1, "max_train_seconds": None,
               "output_dir": str(tmp_path / f"fast-{fast}"), "fast_valid": fast,
               "result_path": str(tmp_path / f"results-{fast}" / "seed-2020.json")}
        results.append(run_benchmark.execute(job))
    fast, full = results
    assert len(fast["valid_curve"]) == 3 and fast["valid_curve"] == full["valid_curve"]
    assert fast["test"] == full["test"] and fast["size_results"] == full["size_results"]
    assert sorted(fast["size_results"], key=int) == ["8", "16"]


def test_history_filter_retests_kept_checkpoints_and_reproduces_the_reported_test(tmp_path, tiny_root, capsys):
    import history_filter

    args = harness_args(tiny_root / "tiny", tmp_path, "LRURec,FMRLRec-text", "--keep-checkpoints",
                        "--max-epochs", "2")
    assert run_benchmark.main(args) == 0
    results = tmp_path / "results"
    argv = ["--dataset", "tiny", "--data-path", str(tiny_root), "--results", str(results)]
    history_filter.main(argv)
    table = list(csv.DictReader((results / "tiny-history-filter.csv").open()))
    assert sorted(r["row"] for r in table) == ["FMRLRec-text", "LRURec"]
    for r in table:  # ranking every item reproduces the benchmark's own test number
        assert abs(float(r["ndcg@10"]) - float(r["reported_ndcg@10"])) <= 1e-4
        assert 0 <= float(r["masked_ndcg@10"]) <= 1
    markdown = (results / "tiny-history-filter.md").read_text()
    assert markdown.count("| yes |") == 2 and "**no**" not in markdown
    cache = next((tmp_path / "work").rglob(history_filter.CACHE_NAME))
    before = cache.stat().st_mtime_ns
    capsys.readouterr()
    history_filter.main(argv)  # cached: nothing is re-evaluated, the report is the same
    assert cache.stat().st_mtime_ns == before
    assert (results / "tiny-history-filter.md").read_text() == markdown

    kept = list((tmp_path / "work").rglob("*.pth")) + [cache]
    assert len(kept) >= 3
    for path in kept:  # another machine: no checkpoint is left
        path.unlink()
    history_filter.main(argv)  # the earlier report's numbers of the very same runs stay
    assert (results / "tiny-history-filter.md").read_text() == markdown
    assert list(csv.DictReader((results / "tiny-history-filter.csv").open())) == table
    lru = results / "tiny" / "runs" / "cpu" / "LRURec" / "seed-2020.json"
    rerun = json.loads(lru.read_text())
    rerun["test"]["ndcg@10"] += 0.01  # a later run of the row: the earlier numbers are not its own
    lru.write_text(json.dumps(rerun))
    history_filter.main(argv)
    markdown = (results / "tiny-history-filter.md").read_text()
    assert "| LRURec | | checkpoint not kept |" in markdown and markdown.count("| yes |") == 1
    (results / "tiny-history-filter.csv").write_text("row,seed,reported_ndcg@10\nLRURec,x,0.1\n")
    with pytest.raises(SystemExit, match=r"tiny-history-filter.csv:2: unreadable row"):
        history_filter.main(argv)
