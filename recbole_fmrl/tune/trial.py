"""One trial of a search, without Ray: the shared training driver plus reports and resumable checkpoints.

A trial is ``driver.prepare`` + ``FMRLTrainer.fit`` (the path the command line takes, so rerunning a
selected configuration gives the scores its trial reported), with a per-worker dataset cache and a
report after every evaluation that can carry a checkpoint (model, optimiser, early stopping, random
generators) from which an interrupted trial resumes exactly.
"""
import copy
import json
import os
import shutil
from collections import OrderedDict
from logging import getLogger
from pathlib import Path

import torch

from recbole_fmrl.errors import InputError
from recbole_fmrl.train import registry
from recbole_fmrl.train.driver import evaluate_sizes, prepare
from recbole_fmrl.tune.space import make_config, trial_config_dict

SCORE = "best_valid_score"  # the metric Tune selects and schedules on: best validation score so far
# read by RecBole's Dataset.__init__ / FMRLDataset.__init__ besides config.parameters["Dataset"]
DATASET_INIT_KEYS = ("model", "dataset", "data_path", "discretization", "encoding", "numerical_features",
                     "fmrl_feature_path", "fmrl_modality", "fmrl_train_objective")
DATASET_CACHE_SIZE = 2
_DATASETS = OrderedDict()  # per worker process: dataset key -> dataset as loaded (never built)


def ray_device_overrides():
    """gpu_id / use_gpu matching the GPUs Ray gave this worker (RecBole must not pick its own)."""
    import ray

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return {"gpu_id": "", "use_gpu": False}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(int(g)) for g in gpu_ids)
    return {"gpu_id": visible, "use_gpu": True}


def dataset_key(config):
    """What the loaded dataset depends on: the dataset keys and the keys the datasets' __init__ read."""
    keys = sorted(set(config.parameters["Dataset"]) | set(DATASET_INIT_KEYS))
    return repr([(k, config[k]) for k in keys])


def cached_dataset(config):
    """The trial's dataset: loaded once per worker and dataset configuration, then copied per trial.

    Loading (reading atomic files, filtering, remapping) happens once; each trial gets a deep copy
    bound to its own Config (``build`` mutates the dataset). Item feature tensors are shared, not
    copied, so they too are read once per worker.
    """
    key = dataset_key(config)
    loaded = _DATASETS.pop(key, None)
    if loaded is None:
        loaded = registry.create_dataset(config)
        getLogger().info(f"dataset loaded (pid {os.getpid()}; kept for later trials of this worker)")
    else:
        getLogger().info(f"dataset from this worker's cache (pid {os.getpid()})")
    _DATASETS[key] = loaded
    while len(_DATASETS) > DATASET_CACHE_SIZE:
        _DATASETS.popitem(last=False)
    memo = {id(loaded.config): config, id(loaded.logger): loaded.logger}
    if hasattr(loaded, "_feature_cache"):
        memo[id(loaded._feature_cache)] = loaded._feature_cache
    data = copy.deepcopy(loaded, memo)
    data.config = config
    return data


def build_run(model, dataset, config_dict, log=True):
    """``driver.prepare`` with the per-worker dataset cache (same seeding, so same numbers)."""
    config = make_config(model, dataset, config_dict)
    run = prepare(config=config, log=log, load_dataset=cached_dataset)
    if log:
        root = getLogger()
        for handler in [h for h in root.handlers if not hasattr(h, "baseFilename")]:
            root.removeHandler(handler)  # trial logs go to <trial>/fmrl/log/, not the console
    return run


def write_trial_checkpoint(folder, trainer, train_data, epoch, state, finished=""):
    """latest.pth (the trainer's last checkpoint: model, optimiser, early stopping, RNG states),
    best.pth and the trial's own state."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    trainer.save_last_checkpoint(epoch, train_data, finished=finished, path=folder / "latest.pth")
    if os.path.isfile(trainer.saved_model_file):
        shutil.copy2(trainer.saved_model_file, folder / "best.pth")
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def restore_trial_checkpoint(folder, trainer, train_data):
    folder = Path(folder)
    best_file = trainer.saved_model_file
    trainer.resume_checkpoint(str(folder / "latest.pth"), train_data)
    trainer.saved_model_file = best_file
    if (folder / "best.pth").is_file():
        shutil.copy2(folder / "best.pth", best_file)
    return json.loads((folder / "state.json").read_text())


def _metrics(prefix, result):
    return {f"{prefix}/{k}": float(v) for k, v in (result or {}).items()}


def trial_paths(job, params, out_dir, device=None):
    """The trial's config_dict with its own output folders (absolute) and device."""
    out = Path(out_dir).resolve()
    config_dict = trial_config_dict(job, params)
    config_dict.update({"fmrl_output_dir": str(out), "checkpoint_dir": str(out / "saved"), "show_progress": False})
    config_dict.update(device or {})
    return config_dict


def train_trial(job, params, trial_dir, report, resume_dir=None, device=None, threads=None):
    """Train one configuration, calling ``report(metrics, checkpoint_folder_or_None)`` after every evaluation."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    out = Path(trial_dir).resolve() / "fmrl"
    config, net, trainer, (train_data, valid_data, _) = build_run(
        job["model"], job["dataset"], trial_paths(job, params, out, device))
    trainer.saved_model_file = str(out / "saved" / "best.pth")
    if trainer.eval_step <= 0 or not valid_data:
        raise InputError("tuning selects on validation: set eval_step >= 1 and keep a validation split")
    metric = config["valid_metric"].lower()
    state = {"best_epoch": -1, "best_valid_result": None, "best_sizes": None}
    if resume_dir:
        state = restore_trial_checkpoint(resume_dir, trainer, train_data)
        getLogger().info(f"resumed from {resume_dir} at epoch {trainer.start_epoch}")
        if Path(resume_dir).resolve().parent == out:  # a copy Ray made for this restore
            shutil.rmtree(resume_dir, ignore_errors=True)
    every = max(1, int(job.get("checkpoint_every", 1)))
    scratch = out / "checkpoint-tmp"

    def on_evaluation(record):
        epoch, sizes = record["epoch"], record["size_results"]
        if record["improved"]:
            state.update(best_epoch=epoch, best_valid_result={k: float(v) for k, v in record["valid_result"].items()},
                         best_sizes={str(m): float(r[metric]) for m, r in sizes.items()} if sizes else None)
        metrics = {
            "epoch": epoch, "train_loss": record["train_loss"],
            "epoch_seconds": record["train_seconds"] + record["valid_seconds"], "valid_score": record["valid_score"],
            SCORE: record["best_valid_score"], "best_epoch": state["best_epoch"], "finished": record["finished"],
            "device": str(config["device"]), **_metrics("valid", record["valid_result"]),
            **_metrics("best", state["best_valid_result"]),
        }
        if sizes:
            metrics.update({f"valid_size/{m}": float(r[metric]) for m, r in sizes.items()})
        folder = None
        if record["finished"] or (epoch + 1) % (every * trainer.eval_step) == 0:
            folder = write_trial_checkpoint(scratch, trainer, train_data, epoch, state, record["finished"])
        report(metrics, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    try:  # Ray ends a stopped trial inside report() (SystemExit): the scratch folder still goes
        trainer.fit(train_data, valid_data, verbose=True, saved=True, show_progress=False, on_evaluation=on_evaluation)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        trainer.tensorboard.close()
    return state


def evaluate_checkpoint(job, params, best_file, out_dir, device=None):
    """Validation and test metrics (all sizes) of one trial's best checkpoint: run once, for the selected trial."""
    config, net, trainer, (_, valid_data, test_data) = build_run(
        job["model"], job["dataset"], trial_paths(job, params, out_dir, device))
    valid, test, sizes = evaluate_sizes(trainer, net, valid_data, test_data, model_file=str(best_file))
    trainer.tensorboard.close()
    if sizes is not None:
        sizes = {str(m): {"params": int(r["params"]), "valid": {k: float(v) for k, v in r["valid"].items()},
                          "test": {k: float(v) for k, v in r["test"].items()}} for m, r in sizes.items()}
    return {"valid": {k: float(v) for k, v in valid.items()}, "test": {k: float(v) for k, v in test.items()},
            "valid_metric": config["valid_metric"].lower(), "size_results": sizes}
