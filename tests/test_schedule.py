"""Learning-rate warm-up and cosine decay (``fmrl_lr_warmup_steps``, ``fmrl_lr_decay_epochs``)."""
import importlib
import math

import pytest
import torch

from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.driver import run
from recbole_fmrl.train.schedule import WarmupCosine, attach_schedule, schedule_ended


def benchmarks_module(name):
    return importlib.import_module(f"benchmarks.{name}")


def reference_factor(step, warmup, total):
    """The multiplier written out case by case (HF's get_cosine_schedule_with_warmup, held at 0 after
    the last step instead of climbing back)."""
    if step < warmup:
        return step / warmup
    if step >= total:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup, epochs, per_epoch", [(0, 3, 7), (5, 3, 7), (10, 1, 10), (4, 2, 1)])
def test_multiplier_matches_the_reference(warmup, epochs, per_epoch):
    factor = WarmupCosine(warmup, epochs, per_epoch)
    total = epochs * per_epoch
    for step in range(total + 6):
        assert factor(step) == pytest.approx(reference_factor(step, warmup, total), abs=1e-12), step


def test_multiplier_matches_transformers_within_the_schedule():
    transformers = pytest.importorskip("transformers")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    theirs = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=6, num_training_steps=40)
    ours = WarmupCosine(6, 4, 10)
    for step in range(41):
        assert theirs.lr_lambdas[0](step) == pytest.approx(ours(step), abs=1e-12), step


def test_warmup_only_holds_the_rate_after_warmup():
    factor = WarmupCosine(4, 0, 100)
    assert [factor(s) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_the_optimiser_follows_the_schedule_step_by_step():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = attach_schedule(optimizer, 3, 2, 5)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimizer.step()  # the hook advances the schedule; no scheduler.step() in the loop
    assert seen == pytest.approx([0.5 * reference_factor(s, 3, 10) for s in range(12)], abs=1e-12)
    assert scheduler.last_epoch == 12


def test_no_keys_no_scheduler():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    assert attach_schedule(optimizer, 0, 0, 10) is None


def test_training_ends_when_the_rate_reaches_zero(tiny_config, tmp_path):
    cfg = tiny_config(epochs=6, stopping_step=10, fmrl_lr_warmup_steps=2, fmrl_lr_decay_epochs=2,
                      fmrl_output_dir=str(tmp_path))
    result = run("FMRLRec", "tiny", config_dict=cfg)
    assert result["epochs"] == 2 and result["stopped_by"] == "learning rate at 0"  # not 6, nor patience's 10
    assert result["records"][-1]["finished"] == "lr_zero"
    last = checkpoint.load(next((tmp_path / "saved").glob("*" + checkpoint.LAST_SUFFIX)))
    steps = last["resume"]["scheduler"]["last_epoch"]
    assert steps > 2 and steps % 2 == 0  # two epochs of whole batches
    assert [g["lr"] for g in last["optimizer"]["param_groups"]] == [0.0] * len(last["optimizer"]["param_groups"])
    assert last["resume"]["finished"] == "lr_zero"


def test_a_run_ended_at_rate_zero_resumes_to_its_result(tiny_config, tmp_path):
    import run_recbole_fmrl

    cfg = tiny_config(epochs=6, stopping_step=10, fmrl_lr_warmup_steps=2, fmrl_lr_decay_epochs=2,
                      fmrl_output_dir=str(tmp_path))
    first = run("FMRLRec", "tiny", config_dict=cfg)
    argv = ["--model", "FMRLRec", "--dataset", "tiny", *(f"{k}={str(v).replace(' ', '')}" for k, v in cfg.items()),
            "--resume", str(tmp_path)]
    again = run_recbole_fmrl.main(argv)
    assert again["records"] == []  # nothing left to train
    assert again["test_result"] == first["test_result"] and again["size_results"] == first["size_results"]


@pytest.mark.parametrize("warmup, epochs, per_epoch", [(0, 3, 7), (5, 3, 7), (30, 2, 10), (4, 0, 5), (0, 0, 5)])
def test_ended_means_zero_from_there_on(warmup, epochs, per_epoch):
    factor = WarmupCosine(warmup, epochs, per_epoch)
    horizon = max(warmup, epochs * per_epoch) + 20
    for step in range(horizon):
        zero_from_here = all(factor(t) == 0.0 for t in range(step, horizon))
        assert factor.ended(step) == (zero_from_here and bool(epochs)), step


def test_schedule_never_ends_a_model_with_running_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = attach_schedule(optimizer, 0, 1, 2)
    for _ in range(3):
        optimizer.step()
    assert not schedule_ended(scheduler, model)
    assert schedule_ended(scheduler, model[0]) and not schedule_ended(None, model[0])


def test_report_names_the_schedule():
    bench_report = benchmarks_module("bench_report")
    run = {"model": "FMRLRec", "config": {}, "resolved": {"hidden_size": 256, "learner": "adamw", "learning_rate": 0.001,
                                                          "train_batch_size": 64, "fmrl_lr_warmup_steps": 100,
                                                          "fmrl_lr_decay_epochs": 40}}
    assert bench_report.settings_text(run).endswith("adamw lr 0.001 bs 64, warm-up 100 steps, cosine to 0 over 40 epochs")
    run["resolved"].update(fmrl_lr_warmup_steps=0, fmrl_lr_decay_epochs=0)
    assert bench_report.settings_text(run).endswith("adamw lr 0.001 bs 64")


def test_report_says_what_ended_each_row():
    bench_report = benchmarks_module("bench_report")
    assert bench_report.stop_note("early stopping") == []
    assert bench_report.stop_note("early stopping; learning rate at 0") == [
        "ended by early stopping or the learning-rate schedule reaching 0"]
    assert bench_report.stop_note("learning rate at 0") == ["ended by the learning-rate schedule reaching 0"]
    assert bench_report.stop_note("early stopping; time budget") == [
        "ended by early stopping", "stopped by time budget once patience ran out"]
