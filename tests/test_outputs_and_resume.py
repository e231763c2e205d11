"""Outputs nobody can clobber and resume that verifies what it resumes (issue 31, classes 2 and 3).

- two runs started in the same second into one ``fmrl_output_dir`` keep their own checkpoints;
- ``export`` never deletes or merges into a folder it did not write, replaces an artifact only with
  ``--force``, and cleans the staging folders of killed exports;
- a checkpoint with one changed byte in a weight is refused (payload sha256), and so is a resume on
  a dataset of the same name with other content.
"""
import json
import os
import zipfile

import pytest
import torch
from conftest import write_tiny_dataset

import run_recbole_fmrl
from recbole_fmrl.deploy import artifact
from recbole_fmrl.deploy.export import export_sizes
from recbole_fmrl.train import checkpoint, outputs
from recbole_fmrl.train.driver import run


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_recbole_fmrl.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run on the tiny dataset: (config_dict, its best checkpoint)."""
    root = tmp_path_factory.mktemp("outputs")
    write_tiny_dataset(root / "data", "tiny", with_image=False)
    cfg = {"data_path": str(root / "data"), "fmrl_output_dir": str(root / "runs"), "fmrl_cache_dir": str(root / "cache"),
           "hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
           "show_progress": False, "use_gpu": False, "state": "ERROR", "topk": [5, 10], "MAX_ITEM_LIST_LENGTH": 20,
           "seed": 7, "fmrl_modality": "text"}
    result = run("FMRLRec", "tiny", config_dict=cfg, log=False)
    return cfg, result["saved_model_file"]


# ----------------------------------------------------------------------------- run names

def test_two_runs_in_the_same_second_keep_their_own_checkpoints(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "get_local_time", lambda: "Jan-01-2030_00-00-00")  # the same start second
    out = tmp_path / "runs"
    first = run("FMRLRec", "tiny", config_dict=tiny_config(fmrl_output_dir=str(out), epochs=1, seed=1))
    second = run("FMRLRec", "tiny", config_dict=tiny_config(fmrl_output_dir=str(out), epochs=1, seed=2))
    assert first["saved_model_file"] != second["saved_model_file"]
    saved = sorted(p.name for p in (out / "saved").iterdir())
    assert len(saved) == 4 and all(name.startswith("FMRLRec-Jan-01-2030_00-00-00-") for name in saved)
    a, b = (checkpoint.load(r["saved_model_file"]) for r in (first, second))
    assert a["config"]["seed"] == 1 and b["config"]["seed"] == 2  # neither overwrote the other
    assert len(list((out / "log" / "FMRLRec").glob("*.log"))) == 2


def test_the_log_and_checkpoint_of_a_run_share_its_name(tiny_config, tmp_path):
    out = tmp_path / "runs"
    result = run("FMRLRec", "tiny", config_dict=tiny_config(fmrl_output_dir=str(out), epochs=1))
    stem = os.path.basename(result["saved_model_file"])[: -len(".pth")]
    (log,) = (out / "log" / "FMRLRec").glob("*.log")
    assert log.name == f"FMRLRec-tiny-{stem[len('FMRLRec-'):]}.log"


# ----------------------------------------------------------------------------- export targets

def test_export_refuses_a_folder_that_is_not_an_artifact(trained, tmp_path, capsys):
    _, ckpt = trained
    notes = tmp_path / "art" / "size-8" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my notes")
    line = refused(capsys, ["export", "--checkpoint", ckpt, "--sizes", 8, "--output", tmp_path / "art", "--force"])
    assert f"{notes.parent}: exists and is not an artifact (holds notes.txt)" in line  # was deleted, exit 0
    assert notes.read_text() == "my notes" and sorted(p.name for p in (tmp_path / "art").iterdir()) == ["size-8"]


def test_export_refuses_a_file_in_the_artifacts_place(trained, tmp_path, capsys):
    _, ckpt = trained
    (tmp_path / "size-8").write_text("a file")
    line = refused(capsys, ["export", "--checkpoint", ckpt, "--sizes", 8, "--output", tmp_path])
    assert f"{tmp_path / 'size-8'}: exists and is not an artifact" in line
    assert (tmp_path / "size-8").read_text() == "a file"


def test_export_replaces_an_artifact_only_with_force(trained, tmp_path, capsys):
    _, ckpt = trained
    export_sizes(ckpt, [8, 16], tmp_path)
    before = snapshot(tmp_path)
    line = refused(capsys, ["export", "--checkpoint", ckpt, "--sizes", 8, 16, "--output", tmp_path])
    assert f"{tmp_path / 'size-8'}: an artifact exists here; pass --force" in line
    assert snapshot(tmp_path) == before  # neither size touched: every target is checked before any work
    assert run_recbole_fmrl.main(["export", "--checkpoint", str(ckpt), "--sizes", "8", "--output", str(tmp_path),
                                  "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["size-16", "size-8"]  # nothing left beside them
    assert artifact.read(tmp_path / "size-8")[0]["size"] == 8


def test_force_never_deletes_a_file_added_to_an_artifact(trained, tmp_path, capsys):
    _, ckpt = trained
    export_sizes(ckpt, [8], tmp_path)
    (tmp_path / "size-8" / "README.txt").write_text("mine")
    line = refused(capsys, ["export", "--checkpoint", ckpt, "--sizes", 8, "--output", tmp_path, "--force"])
    assert "is not an artifact (holds README.txt" in line
    assert (tmp_path / "size-8" / "README.txt").read_text() == "mine"


def dead_pid():
    pid = 2 ** 22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_staging_folders_of_killed_exports_are_cleaned_by_the_next_one(trained, tmp_path):
    _, ckpt = trained
    host = artifact._host()
    killed = tmp_path / f".size-16.{host}.{dead_pid()}.abc123.tmp"  # a half-written export whose process is gone
    killed.mkdir()
    (killed / artifact.WEIGHTS).write_bytes(b"half")
    live = tmp_path / f".size-8.{host}.{os.getpid()}.def456.tmp"  # an export still running (this process)
    live.mkdir()
    other = tmp_path / ".size-8.elsewhere.1.xyz.tmp"  # another machine's: not ours to judge
    other.mkdir()
    export_sizes(ckpt, [8], tmp_path)
    assert not killed.exists() and live.is_dir() and other.is_dir()
    assert (tmp_path / "size-8" / artifact.MANIFEST).is_file()


def test_an_artifact_moved_aside_by_a_killed_replacement_comes_back(trained, tmp_path):
    _, ckpt = trained
    export_sizes(ckpt, [8], tmp_path / "first")
    aside = tmp_path / f".size-8.{artifact._host()}.{dead_pid()}.qq.old"
    aside.mkdir()
    os.replace(tmp_path / "first" / "size-8", aside / "artifact")  # killed between the two renames
    artifact.clean_stale(tmp_path)
    assert artifact.is_artifact(tmp_path / "size-8") and not aside.exists()


# ----------------------------------------------------------------------------- checkpoints

def flip_weight_byte(path):
    """Change one byte inside a tensor's data in a torch zip checkpoint (the zip container does not notice)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + int.from_bytes(
        raw[info.header_offset + 28: info.header_offset + 30], "little")
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_changed_byte_in_a_weight_is_refused_on_resume(tiny_config, tmp_path, capsys):
    cfg = tiny_config(fmrl_output_dir=str(tmp_path / "runs"), epochs=3)
    run("FMRLRec", "tiny", config_dict={**cfg, "epochs": 1})
    (last,) = (tmp_path / "runs" / "saved").glob("*.last.pth")
    flip_weight_byte(last)
    torch.load(last, weights_only=True)  # torch alone reads it: the damage is only visible to the digest
    before = snapshot(tmp_path / "runs" / "saved")
    argv = ["--model", "FMRLRec", "--dataset", "tiny", *(f"{k}={str(v).replace(' ', '')}" for k, v in cfg.items()),
            "--resume", tmp_path / "runs"]
    line = refused(capsys, argv)  # was: resumed and trained on the damaged weight, exit 0
    assert f"{last}: damaged checkpoint (its content does not match the sha256 it was saved with" in line
    assert snapshot(tmp_path / "runs" / "saved") == before


def test_export_refuses_a_damaged_checkpoint(trained, tmp_path, capsys):
    _, ckpt = trained
    damaged = tmp_path / "FMRLRec-damaged.pth"
    damaged.write_bytes(open(ckpt, "rb").read())
    flip_weight_byte(damaged)
    line = refused(capsys, ["export", "--checkpoint", damaged, "--sizes", 8, "--output", tmp_path / "art"])
    assert "damaged checkpoint" in line and not (tmp_path / "art").exists()


def test_the_digest_covers_every_value_and_survives_a_reload(trained, tmp_path):
    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    assert state[checkpoint.DIGEST_KEY] == checkpoint.payload_sha256(state)
    for change in (lambda s: s["config"].update(hidden_size=17), lambda s: s.update(epoch=s["epoch"] + 1),
                   lambda s: s["optimizer"]["param_groups"][0].update(lr=0.5)):
        changed = torch.load(ckpt, weights_only=True)
        change(changed)
        assert checkpoint.payload_sha256(changed) != state[checkpoint.DIGEST_KEY]


def test_a_checkpoint_from_before_the_digest_still_loads(trained, tmp_path):
    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    del state[checkpoint.DIGEST_KEY]
    torch.save(state, tmp_path / "old.pth")
    assert checkpoint.load(tmp_path / "old.pth")["epoch"] == state["epoch"]


def test_resume_on_other_data_of_the_same_name_is_refused(tiny_config, tmp_path, capsys):
    data = tmp_path / "data"
    write_tiny_dataset(data, "same", seed=1, with_image=False)
    cfg = tiny_config(data_path=str(data), fmrl_output_dir=str(tmp_path / "runs"), fmrl_modality="text", epochs=3)
    run("FMRLRec", "same", config_dict={**cfg, "epochs": 1})
    write_tiny_dataset(data, "same", seed=2, with_image=False)  # other interactions, the same name and size
    saved = snapshot(tmp_path / "runs" / "saved")
    argv = ["--model", "FMRLRec", "--dataset", "same", *(f"{k}={str(v).replace(' ', '')}" for k, v in cfg.items()),
            "--resume", tmp_path / "runs"]
    line = refused(capsys, argv)  # was: resumed on the new data (only the name was compared)
    assert "trained on other data than dataset same" in line and "content sha256" in line
    assert snapshot(tmp_path / "runs" / "saved") == saved


def test_checkpoints_carry_the_dataset_fingerprint(trained):
    cfg, ckpt = trained
    from recbole_fmrl.data import validate

    state = checkpoint.load(ckpt)
    folder = os.path.join(cfg["data_path"], "tiny")
    assert state["dataset_sha256"] == validate.fingerprint({"dataset": "tiny", "data_path": folder}, folder)
    assert json.dumps(state["dataset_sha256"])  # a plain value
