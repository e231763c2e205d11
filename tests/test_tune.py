"""Ray Tune searches: space files, the per-trial loop (exact resume), the dataset cache, GPU handling,
and one small Ray grid on the tiny dataset (per-epoch reports, a failing trial, best.yaml reproduces)."""
import json
import math
import os
import shutil

import pytest
import torch
import yaml

from recbole_fmrl.train.driver import run
from recbole_fmrl.tune import search as tune_search
from recbole_fmrl.tune import space as tune_space
from recbole_fmrl.tune import trial as tune_trial

TINY = {"hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 3, "stopping_step": 10, "train_batch_size": 16,
        "eval_batch_size": 64, "state": "INFO", "topk": [5, 10, 20], "MAX_ITEM_LIST_LENGTH": 20, "seed": 7,
        "learning_rate": 0.003}


def tiny_fixed(root, tmp, *searched):
    fixed = {**TINY, "data_path": str(root), "fmrl_cache_dir": str(tmp / "cache"), "use_gpu": False}
    return {k: v for k, v in fixed.items() if k not in searched}


def write_space(path, fixed, space, derived=None, **top):
    path.write_text(yaml.safe_dump({"model": "FMRLRec", "search": "grid", "scheduler": "fifo", **top,
                                    "fixed": fixed, "space": space, "derived": derived or {}}))
    return path


# ----------------------------------------------------------------------------- spaces (no Ray, no training)

@pytest.mark.parametrize("name", ["fmrlrec-paper", "fmrlrec-random-asha", "fmrlrec-cpu", "sasrec-cpu", "sasrec-paper",
                                  "fmrlrec-default-levers"])
def test_shipped_spaces_load(name):
    job = tune_space.build_job(name, "ml-100k")
    params = tune_space.ray_param_space(job["space"], job["search"])
    assert set(params) == set(job["space"])
    assert os.path.isabs(job["storage_path"])


def test_paper_grid_is_the_papers():
    job = tune_space.build_job("fmrlrec-paper", "ml-100k")
    assert tune_space.grid_points(job["space"], job["search"]) == 6 * 4 * 8 * 3 * 6 * 2
    assert tune_space.expand_range(job["space"]["hidden_dropout_prob"]["range"]) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert tune_space.expand_range(job["space"]["fmrl_ring_r_min"]["range"]) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    cfg = tune_space.trial_config_dict(job, {"fmrl_ring_r_min": 0.2, "hidden_dropout_prob": 0.3})
    assert cfg["fmrl_ring_r_max"] == 0.3 and cfg["attn_dropout_prob"] == 0.3
    # pinning on the command line takes a key out of the search
    pinned = tune_space.build_job("fmrlrec-paper", "ml-100k", overrides={"hidden_size": "256", "n_layers": "2"})
    assert pinned["pinned"] == ["hidden_size", "n_layers"] and "hidden_size" not in pinned["space"]
    assert pinned["base"]["hidden_size"] == 256
    assert tune_space.grid_points(pinned["space"], "grid") == 8 * 3 * 6 * 2
    assert tune_space.trial_count(dict(pinned, num_samples=2, seeds=[1, 2, 3])) == 8 * 3 * 6 * 2 * 2 * 3


def test_random_search_and_asha(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.sample import Categorical, Float

    job = tune_space.build_job("fmrlrec-random-asha", "ml-100k", overrides={"epochs": "12"})
    params = tune_space.ray_param_space(job["space"], job["search"])
    assert isinstance(params["hidden_size"], Categorical) and isinstance(params["learning_rate"], Float)
    assert tune_space.grid_points(job["space"], job["search"]) == 1 and tune_space.trial_count(job) == 40
    config = tune_space.make_config("FMRLRec", "ml-100k", dict(job["base"]))
    scheduler = tune_search._scheduler(job, config)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._max_t == 12 and scheduler._brackets[0]._rungs[-1][0] == 5
    grid = tune_space.build_job("fmrlrec-cpu", "ml-100k", scheduler="asha")
    assert tune_search._scheduler(grid, tune_space.make_config("FMRLRec", "ml-100k", dict(grid["base"])))._max_t == 10


def test_space_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot be searched"):
        tune_space.build_job(str(write_space(tmp_path / "a.yaml", {}, {"valid_metric": ["NDCG@10"]})), "tiny")
    with pytest.raises(ValueError, match="expected a list"):
        tune_space.build_job(str(write_space(tmp_path / "b.yaml", {}, {"hidden_size": {"normal": [1, 2]}})), "tiny")
    with pytest.raises(ValueError, match="only numbers"):
        tune_space.evaluate_expression("__import__('os').getcwd()", {})
    assert tune_space.evaluate_expression("max(a * 2, 3) - 0.5", {"a": 4}) == 7.5


# ----------------------------------------------------------------------------- one trial without Ray

def _job(tiny_root, tmp_path, **fixed):
    space = write_space(tmp_path / "space.yaml", {**tiny_fixed(tiny_root, tmp_path, "hidden_size"), **fixed},
                        {"hidden_size": [16]})
    return tune_space.build_job(str(space), "tiny", storage_path=str(tmp_path / "tune"))


def test_resumed_trial_continues_exactly(tiny_root, tmp_path):
    torch.set_num_threads(1)
    job = _job(tiny_root, tmp_path, epochs=4)
    full = []
    tune_trial.train_trial(job, {"hidden_size": 16}, tmp_path / "full", lambda m, f: full.append(m))
    assert [m["epoch"] for m in full] == [0, 1, 2, 3] and full[-1]["finished"] == "max_epochs"

    saved, seen = tmp_path / "saved-ckpt", []

    def interrupted(metrics, folder):
        seen.append(metrics)
        shutil.copytree(folder, saved, dirs_exist_ok=True)  # what Ray does with a reported checkpoint
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_trial.train_trial(job, {"hidden_size": 16}, tmp_path / "cut", interrupted)
    rest = []
    tune_trial.train_trial(job, {"hidden_size": 16}, tmp_path / "cut", lambda m, f: rest.append(m), resume_dir=saved)
    assert [m["epoch"] for m in rest] == [2, 3]
    for a, b in zip(full, seen + rest):
        assert a["train_loss"] == b["train_loss"] and a["valid_score"] == b["valid_score"]
        assert a["best_valid_score"] == b["best_valid_score"] and a["best_epoch"] == b["best_epoch"]


def test_dataset_loaded_once_per_worker(tiny_root, tmp_path, monkeypatch):
    import recbole_fmrl.train.registry as registry

    loads = []
    original = registry.create_dataset
    monkeypatch.setattr(registry, "create_dataset", lambda config: loads.append(1) or original(config))
    tune_trial._DATASETS.clear()
    job = _job(tiny_root, tmp_path, epochs=1)
    nets = []
    for hidden in (8, 16):
        cfg = tune_space.trial_config_dict(job, {"hidden_size": hidden, "fmrl_sizes": [hidden]})
        cfg["fmrl_output_dir"] = str(tmp_path / f"h{hidden}")
        _, net, _, (train, _, _) = tune_trial.build_run("FMRLRec", "tiny", cfg, log=False)
        nets.append(train._dataset)
    assert len(loads) == 1 and len(tune_trial._DATASETS) == 1
    loaded = next(iter(tune_trial._DATASETS.values()))
    assert nets[0]._feature_cache is nets[1]._feature_cache is loaded._feature_cache  # features read once
    assert nets[0]._feature_cache  # and really loaded
    # a different dataset configuration is a different cache entry
    cfg = dict(tune_space.trial_config_dict(job, {"hidden_size": 16}), MAX_ITEM_LIST_LENGTH=10,
               fmrl_output_dir=str(tmp_path / "l10"))
    tune_trial.build_run("FMRLRec", "tiny", cfg, log=False)
    assert len(loads) == 2


def test_recbole_gpu_id_cannot_override_ray_gpu(tiny_root, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    assert tune_trial.ray_device_overrides() == {"gpu_id": "3", "use_gpu": True}
    config = tune_space.make_config("FMRLRec", "tiny", {**tiny_fixed(tiny_root, tmp_path), "gpu_id": 0})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # RecBole's gpu_id=0 did not leak out
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert tune_trial.ray_device_overrides() == {"gpu_id": "", "use_gpu": False}
    config = tune_space.make_config("FMRLRec", "tiny", {**tiny_fixed(tiny_root, tmp_path), "gpu_id": "", "use_gpu": False})
    assert config["device"] == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == "3"


# ----------------------------------------------------------------------------- Ray end to end

@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def search(ray_session, tiny_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    space = write_space(tmp / "space.yaml", tiny_fixed(tiny_root, tmp, "learning_rate"),
                        # -1 is not a learning rate: that trial fails (twice: one retry) and the search goes on
                        {"learning_rate": [0.003, 0.01, -1.0]}, {"attn_dropout_prob": "hidden_dropout_prob / 2"})
    job = tune_space.build_job(str(space), "tiny", storage_path=str(tmp / "tune"), name="tiny-grid", max_failures=1)
    summary = tune_search.run_search(job, verbose=0)
    return job, summary, tmp


def test_grid_trials_finish_and_report_every_epoch(search):
    job, summary, _ = search
    rows = summary["rows"]
    assert len(rows) == 3
    done = [r for r in rows if r["status"] == "TERMINATED"]
    assert len(done) == 2 and all(r["end"] == "max_epochs" for r in done)
    for result in summary["result_grid"]:
        if result.error is None:
            history = result.metrics_dataframe
            assert list(history["epoch"]) == [0, 1, 2]  # one report per epoch
            assert list(history["training_iteration"]) == [1, 2, 3]
            assert history["best_valid_score"].is_monotonic_increasing
            assert {"valid/ndcg@10", "valid/recall@10", "valid_size/8", "valid_size/16"} <= set(history.columns)
            assert os.path.isdir(os.path.join(result.path, "fmrl", "log", "FMRLRec"))  # per-trial output folder
            assert os.path.isfile(os.path.join(result.path, "fmrl", "saved", "best.pth"))


def test_failing_trial_does_not_stop_the_search(search):
    job, summary, _ = search
    failed = [r for r in summary["rows"] if r["status"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["learning_rate"] == -1.0
    assert "learning_rate=-1.0" in failed[0]["error"] and "need a number > 0" in failed[0]["error"]
    assert failed[0]["rank"] == 3  # errors sort last
    md = open(summary["results_md"]).read()
    assert "error:" in md and "valid ndcg@10" in md


def test_selection_on_validation_and_outputs(search):
    job, summary, _ = search
    rows, selected = summary["rows"], summary["selected"]
    scores = [r["best_valid_score"] for r in rows if r["status"] == "TERMINATED"]
    assert scores == sorted(scores, reverse=True)
    assert selected["trial_id"] == rows[0]["trial_id"]
    # the best checkpoint re-evaluated after the search gives the reported validation score; test kept apart
    assert selected["valid"]["ndcg@10"] == pytest.approx(selected["reported_valid_score"], abs=1e-9)
    assert set(selected["test"]) == set(selected["valid"]) and set(selected["size_results"]) == {"8", "16"}
    with open(summary["results_csv"]) as f:
        header = f.readline().strip().split(",")
    assert header[:4] == ["rank", "trial_id", "status", "end"] and "learning_rate" in header
    assert "test" not in " ".join(header)


def test_best_yaml_reproduces_the_validation_score(search):
    job, summary, tmp = search
    best = yaml.safe_load(open(summary["best_yaml"]))
    assert best["learning_rate"] == summary["selected"]["params"]["learning_rate"]
    assert best["attn_dropout_prob"] == best["hidden_dropout_prob"] / 2  # derived keys are written out
    assert not set(tune_space.TRIAL_KEYS) & set(best)
    torch.set_num_threads(1)  # as the trial (1 CPU)
    # as `run_recbole_fmrl.py --config_files best.yaml` does it (logging on, at the YAML's `state` level)
    rerun = run(model=best["model"], dataset=best["dataset"], config_file_list=[summary["best_yaml"]],
                config_dict={"fmrl_output_dir": str(tmp / "rerun"), "show_progress": False}, log=True)
    assert rerun["best_valid_score"] == summary["selected"]["reported_valid_score"]
    assert rerun["test_result"]["ndcg@10"] == pytest.approx(summary["selected"]["test"]["ndcg@10"], abs=1e-9)


def test_rerunning_resumes_the_finished_search(search):
    job, summary, _ = search
    again = tune_search.run_search(job, verbose=0, evaluate_test=False)  # restores: nothing is retrained
    assert [(r["trial_id"], r["best_valid_score"]) for r in again["rows"]][:2] == \
           [(r["trial_id"], r["best_valid_score"]) for r in summary["rows"]][:2]
    assert json.loads(open(os.path.join(summary["experiment_dir"], tune_search.JOB_FILE)).read())["name"] == "tiny-grid"
    assert math.isfinite(again["rows"][0]["best_valid_score"])


def test_recbole_baseline_uses_the_same_trial_loop(tiny_root, tmp_path):
    space = write_space(tmp_path / "sasrec.yaml",
                        {**tiny_fixed(tiny_root, tmp_path, "hidden_size", "fmrl_sizes"), "epochs": 2, "n_layers": 1,
                         "n_heads": 1, "loss_type": "CE", "train_neg_sample_args": None},
                        {"hidden_size": [8, 16]}, {"inner_size": "hidden_size * 2"}, model="SASRec")
    job = tune_space.build_job(str(space), "tiny")
    assert job["model"] == "SASRec"
    reports = []
    tune_trial.train_trial(job, {"hidden_size": 8}, tmp_path / "sasrec", lambda m, f: reports.append((m, f is not None)),
                          threads=1)  # as a 1-CPU trial; 2 threads on 2 busy cores spin-wait
    assert not torch.is_anomaly_enabled()  # importing RecBole's SINE turned it on; trials turn it off
    assert [m["epoch"] for m, _ in reports] == [0, 1] and all(has_ckpt for _, has_ckpt in reports)
    assert "valid_size/8" not in reports[0][0] and math.isfinite(reports[-1][0]["best_valid_score"])


# ----------------------------------------------------------------------------- repeated seeds

def _row(trial, lr, seed, score, status="TERMINATED"):
    return {"trial_id": trial, "status": status, "seed": seed, "learning_rate": lr, "best_valid_score": score,
            "_params": {"learning_rate": lr, "seed": seed}, "_checkpoint": object() if status == "TERMINATED" else None}


def test_configurations_rank_on_their_mean_over_seeds():
    from recbole_fmrl.tune.report import config_groups

    job = {"seeds": [1, 2], "space": {"learning_rate": [0.1, 0.2, 0.3]}, "derived": {}}
    rows = [_row("a", 0.1, 1, 0.50), _row("b", 0.1, 2, 0.10),   # one lucky seed: mean 0.30
            _row("c", 0.2, 2, 0.36), _row("d", 0.2, 1, 0.34),   # mean 0.35: selected
            _row("e", 0.3, 1, 0.90), _row("f", 0.3, 2, float("nan"), status="ERROR")]  # incomplete: never first
    groups = config_groups(rows, job)
    assert [g["params"] for g in groups] == [{"learning_rate": 0.2}, {"learning_rate": 0.1}, {"learning_rate": 0.3}]
    best = groups[0]
    assert best["complete"] and best["n"] == 2 and [r["seed"] for r in best["rows"]] == [1, 2]
    assert best["mean"] == pytest.approx(0.35) and best["std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))
    assert not groups[2]["complete"] and groups[2]["n"] == 1
    assert [g["params"]["learning_rate"] for g in config_groups(rows, job, mode="min")][:2] == [0.1, 0.2]


def test_seed_summary_is_the_mean_and_sample_std_of_the_seeds():
    trials = [{"seed": 1, "trial_id": "a"}, {"seed": 2, "trial_id": "b"}, {"seed": 3, "trial_id": "c"}]
    evals = [{"valid": {"ndcg@10": v}, "test": {"ndcg@10": t}, "valid_metric": "ndcg@10",
              "size_results": {"8": {"params": 10, "valid": {"ndcg@10": v / 2}, "test": {"ndcg@10": t / 2}}}}
             for v, t in ((0.3, 0.2), (0.4, 0.1), (0.5, 0.3))]
    out = tune_search.seed_summary(trials, evals)
    assert out["test"]["ndcg@10"] == pytest.approx(0.2) and out["test_std"]["ndcg@10"] == pytest.approx(0.1)
    assert out["valid"]["ndcg@10"] == pytest.approx(0.4) and out["valid_std"]["ndcg@10"] == pytest.approx(0.1)
    assert out["size_results"]["8"]["test"]["ndcg@10"] == pytest.approx(0.1)
    assert out["size_results"]["8"]["params"] == 10 and [r["seed"] for r in out["per_seed"]] == [1, 2, 3]


def test_seeds_errors(tmp_path):
    space = write_space(tmp_path / "s.yaml", {}, {"learning_rate": [0.1]}, seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds must be a list of distinct integers"):
        tune_space.build_job(str(space), "tiny")
    space = write_space(tmp_path / "t.yaml", {}, {"learning_rate": [0.1], "seed": [1, 2]}, seeds=[1, 2])
    with pytest.raises(ValueError, match="seed is searched and the space repeats seeds"):
        tune_space.build_job(str(space), "tiny")
    space = write_space(tmp_path / "u.yaml", {}, {"learning_rate": [0.1]})
    with pytest.raises(ValueError, match="seed is given and the space repeats seeds"):
        tune_space.build_job(str(space), "tiny", overrides={"seed": "3"}, seeds=[1, 2])


def test_search_over_seeds_selects_on_the_mean_and_tests_every_seed(ray_session, tiny_root, tmp_path):
    space = write_space(tmp_path / "space.yaml", {**tiny_fixed(tiny_root, tmp_path, "learning_rate"), "epochs": 2},
                        {"learning_rate": [0.003, 0.03]}, seeds=[5, 6])
    job = tune_space.build_job(str(space), "tiny", storage_path=str(tmp_path / "tune"), name="seeds")
    summary = tune_search.run_search(job, verbose=0)
    rows, selected = summary["rows"], summary["selected"]
    assert tune_space.trial_count(job) == len(rows) == 4  # the announced count is what Ray ran
    assert sorted((r["learning_rate"], r["seed"]) for r in rows) == [(0.003, 5), (0.003, 6), (0.03, 5), (0.03, 6)]
    means = {lr: sum(r["best_valid_score"] for r in rows if r["learning_rate"] == lr) / 2 for lr in (0.003, 0.03)}
    best_lr = max(means, key=means.get)
    assert selected["params"] == {"learning_rate": best_lr} and selected["seeds"] == [5, 6]
    assert selected["reported_valid_score"] == pytest.approx(means[best_lr], abs=1e-12)
    # each seed's best checkpoint re-evaluated gives that trial's own validation score; test kept apart
    by_seed = {r["seed"]: r["best_valid_score"] for r in rows if r["learning_rate"] == best_lr}
    assert {run["seed"]: run["valid"]["ndcg@10"] for run in selected["per_seed"]} == pytest.approx(by_seed, abs=1e-9)
    tests = [run["test"]["ndcg@10"] for run in selected["per_seed"]]
    assert selected["test"]["ndcg@10"] == pytest.approx(sum(tests) / 2)
    assert "seed" not in yaml.safe_load(open(summary["best_yaml"])) or \
        yaml.safe_load(open(summary["best_yaml"]))["seed"] == TINY["seed"]  # the space's own seed, not a tried one
    md = open(summary["results_md"]).read()
    assert "Configurations, sorted by their mean validation ndcg@10" in md and "| 2 of 2 |" in md
    assert "| test, seed 5 |" in md and "| test, seed 6 |" in md


def test_an_old_ray_is_refused_in_one_line():
    from recbole_fmrl.errors import InputError

    with pytest.raises(InputError, match=r'^ray 2\.6\.3 is installed; searches need ray >= 2\.50: pip install -U "ray\[tune,serve\]>=2\.50"'):
        tune_search.check_ray_version("2.6.3")
    tune_search.check_ray_version("2.50.0")
    tune_search.check_ray_version("3.0.0.dev0")
    import ray

    tune_search.check_ray_version(ray.__version__)  # the set-up's Ray passes
