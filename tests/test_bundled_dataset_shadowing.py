"""RecBole's bundled-dataset shadowing (issue 31, class 5).

RecBole's Config replaces data_path by its own copy for a name it ships (``ml-100k``) and loads that
copy's settings files (columns, the plugin's text fields). A data_path holding ``<name>/<name>.inter``
(or its benchmark split files) must win, configured exactly like any other dataset folder, and the
log must say which folder was used. Without such a folder the bundled copy is used as before.
"""
import logging
from pathlib import Path

import recbole
import yaml
from conftest import write_tiny_dataset

from recbole_fmrl.data import validate
from recbole_fmrl.train import config as config_module
from recbole_fmrl.train.config import Config
from recbole_fmrl.train.driver import prepare

BUNDLED = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
RUN = {"hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
       "show_progress": False, "use_gpu": False, "MAX_ITEM_LIST_LENGTH": 20, "seed": 7, "topk": [10],
       "fmrl_modality": "id"}


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def config(tmp_path, dataset="ml-100k", model="FMRLRec", **extra):
    return Config(model=model, dataset=dataset, config_dict={"data_path": str(tmp_path / "data"),
                                                             "use_gpu": False, **extra})


def test_own_ml100k_folder_is_trained_on_and_the_log_names_it(tmp_path, caplog):
    """Before (RecBole): the bundled copy's 943 users were trained on, silently."""
    folder = write_tiny_dataset(tmp_path / "data", "ml-100k", with_image=False)
    before, bundled_before = snapshot(folder), snapshot(BUNDLED)
    caplog.set_level(logging.INFO)
    cfg, _, _, (train_data, _, _) = prepare(
        "FMRLRec", "ml-100k", config_dict={"data_path": str(tmp_path / "data"),
                                           "fmrl_output_dir": str(tmp_path / "runs"), **RUN}, log=False)
    assert cfg["data_path"] == str(folder.resolve())
    assert train_data._dataset.user_num - 1 == 40 and train_data._dataset.item_num - 1 == 30  # the tiny dataset's
    lines = [r.getMessage() for r in caplog.records if "ml-100k" in r.getMessage() and "bundled" in r.getMessage()]
    assert lines == [f"dataset ml-100k: {folder.resolve()}: no meta.json (not a dataset_tools conversion), files "
                     f"taken as they are (data_path's own folder, used instead of RecBole's bundled ml-100k)"]
    assert snapshot(folder) == before and snapshot(BUNDLED) == bundled_before


def test_own_ml100k_folder_is_configured_like_any_other_name(tmp_path):
    """Before: RecBole's and the plugin's ml-100k settings applied to the user's files too (the plugin's
    text fields movie_title/release_year/class: a converted ml-100k's title/year/genres text was ignored
    and fmrl_modality=auto fell back to learned ids)."""
    write_tiny_dataset(tmp_path / "data", "ml-100k", with_image=False)
    write_tiny_dataset(tmp_path / "data", "other", with_image=False)
    for model in ("FMRLRec", "BPR"):
        own, other = config(tmp_path, model=model), config(tmp_path, "other", model=model)
        differ = {k for k in set(own.final_config_dict) | set(other.final_config_dict)
                  if own.final_config_dict.get(k) != other.final_config_dict.get(k)}
        assert differ == {"dataset", "data_path"}, model
        assert own["data_path"] == str((tmp_path / "data" / "ml-100k").resolve())
    assert config(tmp_path)["fmrl_text_fields"] is None


def test_benchmark_split_files_make_an_own_folder_too(tmp_path):
    folder = tmp_path / "data" / "ml-100k"
    folder.mkdir(parents=True)
    for part in ("train", "valid", "test"):
        (folder / f"ml-100k.{part}.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\t1\t1.0\n")
    cfg = config(tmp_path, benchmark_filename=["train", "valid", "test"])
    assert cfg["data_path"] == str(folder.resolve())


def test_recboles_default_data_path_is_honoured(tmp_path, monkeypatch):
    """No data_path given: RecBole's default ``dataset/`` (relative to the launch folder) is the data_path."""
    monkeypatch.chdir(tmp_path)
    folder = write_tiny_dataset(tmp_path / "dataset", "ml-100k", with_image=False)
    cfg = Config(model="FMRLRec", dataset="ml-100k", config_dict={"use_gpu": False})
    assert cfg["data_path"] == str(folder.resolve())
    overall = yaml.safe_load((Path(recbole.__file__).parent / "properties" / "overall.yaml").read_text())
    assert config_module.RECBOLE_DATA_PATH == overall["data_path"]


def test_without_an_own_folder_the_bundled_copy_is_used_as_before(tmp_path):
    (tmp_path / "data" / "ml-100k").mkdir(parents=True)  # a folder without the interactions is not the dataset
    (tmp_path / "data" / "ml-100k" / "ml-100k.item").write_text("item_id:token\ttitle:token_seq\n1\tx\n")
    cfg = config(tmp_path)
    assert Path(cfg["data_path"]) == BUNDLED.resolve()
    assert cfg["fmrl_text_fields"] == ["movie_title", "release_year", "class"]  # the bundled copy's settings
    assert validate.check_run(cfg) == (f"dataset ml-100k: {BUNDLED.resolve()}: no meta.json (not a dataset_tools "
                                       f"conversion), files taken as they are (RecBole's bundled copy: data_path "
                                       f"holds no ml-100k/ml-100k.inter)")


def test_a_name_recbole_does_not_bundle_logs_no_note(tmp_path):
    folder = write_tiny_dataset(tmp_path / "data", "other", with_image=False)
    assert validate.check_run(config(tmp_path, "other")) == (
        f"dataset other: {folder.resolve()}: no meta.json (not a dataset_tools conversion), files taken as they are")
