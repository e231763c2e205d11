"""Resume: every epoch writes a last checkpoint beside the best one; a killed run continues bit for bit.

The interruption is an exception raised from the ``on_evaluation`` hook after an epoch (what a kill
leaves on disk: the last checkpoint of that epoch, written atomically before the hooks run).
"""
import pytest
import torch

import run_recbole_fmrl
from recbole_fmrl.errors import InputError
from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.driver import run


class Killed(Exception):
    pass


def kill_after(epoch):
    def hook(record):
        if record["epoch"] == epoch:
            raise Killed

    return hook


def settings(tiny_config, out, **overrides):
    return tiny_config(epochs=4, stopping_step=10, learning_rate=0.003, fmrl_output_dir=str(out), **overrides)


def only(folder, pattern):
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, files
    return files[0]


def as_arg(value):
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def test_last_checkpoint_holds_everything_to_continue(tiny_config, tmp_path):
    with pytest.raises(Killed):
        run("FMRLRec", "tiny", config_dict=settings(tiny_config, tmp_path / "a"), on_evaluation=kill_after(1))
    last = only(tmp_path / "a" / "saved", "*" + checkpoint.LAST_SUFFIX)
    best = checkpoint.best_path(last)
    assert best.is_file() and not list(last.parent.glob(".*.tmp"))  # atomic: no temporary left behind
    state = checkpoint.load(last)  # weights_only=True
    assert state["epoch"] == 1 and state["optimizer"]["state"]
    resume = state["resume"]
    assert set(resume) >= {"best_epoch", "best_valid_result", "rng", "scheduler", "train_loss", "finished"}
    assert set(resume["rng"]) == {"torch", "cuda", "loader", "numpy", "random"}
    assert [e for e, _ in resume["train_loss"]] == [0, 1] and resume["best_epoch"] in (0, 1)


@pytest.mark.parametrize("schedule", [{}, {"fmrl_lr_warmup_steps": 3, "fmrl_lr_decay_epochs": 5}],
                         ids=["constant-lr", "warmup-cosine"])
def test_resumed_run_matches_an_uninterrupted_one(tiny_config, tmp_path, schedule):
    full = run("FMRLRec", "tiny", config_dict=settings(tiny_config, tmp_path / "full", **schedule))
    cfg = settings(tiny_config, tmp_path / "cut", **schedule)
    with pytest.raises(Killed):
        run("FMRLRec", "tiny", config_dict=cfg, on_evaluation=kill_after(1))
    argv = ["--model", "FMRLRec", "--dataset", "tiny", *(f"{k}={as_arg(v)}" for k, v in cfg.items()),
            "--resume", str(tmp_path / "cut")]
    resumed = run_recbole_fmrl.main(argv)  # the command line, as a user continues a killed run
    assert [r["epoch"] for r in resumed["records"]] == [2, 3]
    assert resumed["epochs"] == full["epochs"] == 4 and resumed["best_epoch"] == full["best_epoch"]
    assert resumed["best_valid_score"] == full["best_valid_score"]
    assert resumed["best_valid_result"] == full["best_valid_result"]
    assert resumed["test_result"] == full["test_result"]
    assert resumed["size_results"] == full["size_results"]
    for pattern in ("*" + checkpoint.LAST_SUFFIX, "*[!t].pth"):  # final weights and best weights (not *.last.pth), bitwise
        a = checkpoint.load(only(tmp_path / "full" / "saved", pattern))["state_dict"]
        b = checkpoint.load(only(tmp_path / "cut" / "saved", pattern))["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(tiny_config, tmp_path, capsys):
    cfg = settings(tiny_config, tmp_path / "cut")
    with pytest.raises(Killed):
        run("FMRLRec", "tiny", config_dict=cfg, on_evaluation=kill_after(0))
    saved = tmp_path / "cut" / "saved"
    before = {p: p.read_bytes() for p in saved.iterdir()}
    argv = ["--model", "FMRLRec", "--dataset", "tiny", *(f"{k}={as_arg(v)}" for k, v in cfg.items()),
            "hidden_size=32", "fmrl_sizes=[8,32]", "--resume", str(tmp_path / "cut")]
    with pytest.raises(SystemExit) as exit_info:
        run_recbole_fmrl.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "hidden_size=16" in err[0] and "last.pth" in err[0]
    assert {p: p.read_bytes() for p in saved.iterdir()} == before  # nothing written, nothing lost


def test_resume_without_a_last_checkpoint_names_the_folder(tmp_path):
    (tmp_path / "saved").mkdir()
    with pytest.raises(InputError, match=str(tmp_path)):
        checkpoint.find_last(tmp_path)
    best = tmp_path / "saved" / "FMRLRec-x.pth"
    best.write_bytes(b"")
    with pytest.raises(InputError, match="FMRLRec-x.last.pth"):
        checkpoint.find_last(best)
