"""Ray Tune searches for FMRLRec and RecBole's baselines, on one machine or on a Ray cluster.

    python run_recbole_fmrl.py tune --space properties/tune/fmrlrec-cpu.yaml --dataset ml-100k
    python -m recbole_fmrl.tune --space fmrlrec-paper --dataset amazon-beauty data_path=data --gpus_per_trial 1 \
        --address auto                                                   # attach to a running cluster

A search space file (``properties/tune/*.yaml``) names the model, the search (grid or random), the
scheduler (fifo or ASHA), keys shared by every trial (``fixed``), the searched keys (``space``) and
keys computed from them (``derived``). Layering per trial, later wins: the plugin's properties ->
the space's ``fixed`` -> ``--config_files`` -> ``key=value`` -> the trial's sampled values ->
``derived``. A key given in ``--config_files`` or ``key=value`` that the space searches is pinned
(taken out of the search).

Each trial builds the plugin's Config, Dataset, Model and Trainer, trains epoch by epoch and reports
validation metrics after every evaluation (so ASHA can stop it early) with a checkpoint that lets an
interrupted or failed trial resume exactly where it stopped (model, optimiser, early-stopping state
and random number generators). Selection uses the best validation score of each trial only. The
selected trial's best checkpoint is evaluated once on the test split afterwards, and that result is
written separately (``selected.json`` and the Markdown report); no trial ever sees the test split.

Outputs under ``<storage_path>/<name>/`` (default ``<fmrl_output_dir>/tune/<model>-<dataset>-<space>``):
``results.csv`` and ``results.md`` (trials sorted by validation score), ``best.yaml`` (accepted as is by
``run_recbole_fmrl.py --config_files``), ``selected.json``, ``fmrl_job.json`` (the search, reused on
resume) and Ray's own experiment files; each trial writes RecBole's log/, log_tensorboard/ and
saved/ under ``<trial folder>/fmrl/``.
"""
import argparse
import ast
import contextlib
import copy
import csv
import json
import math
import operator
import os
import random
import shutil
import time
import warnings
from collections import OrderedDict
from logging import getLogger
from pathlib import Path

import numpy as np
import yaml

SEARCHES = ("grid", "random")
SCHEDULERS = ("fifo", "asha")
SPACE_KEYS = {"model", "dataset", "search", "scheduler", "num_samples", "search_seed", "asha", "fixed", "space",
              "derived", "description"}
DISTRIBUTIONS = ("grid", "choice", "range", "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint")
# keys each trial sets itself: never searched, never written to best.yaml
TRIAL_KEYS = ("fmrl_output_dir", "checkpoint_dir", "gpu_id", "use_gpu", "show_progress")
NOT_SEARCHABLE = set(TRIAL_KEYS) | {"model", "dataset", "valid_metric", "valid_metric_bigger", "metrics", "eval_args",
                                    "data_path", "fmrl_cache_dir", "fmrl_feature_path", "nproc", "local_rank"}
PATH_KEYS = ("data_path", "fmrl_cache_dir", "fmrl_feature_path", "fmrl_output_dir", "checkpoint_dir",
             "dataset_save_path", "dataloaders_save_path")
# read by RecBole's Dataset.__init__ / FMRLDataset.__init__ besides config.parameters["Dataset"]
DATASET_INIT_KEYS = ("model", "dataset", "data_path", "discretization", "encoding", "numerical_features",
                     "fmrl_feature_path", "fmrl_modality", "fmrl_train_objective")
JOB_FILE = "fmrl_job.json"
SCORE = "best_valid_score"  # the metric Tune selects and schedules on: best validation score so far


# --------------------------------------------------------------------------- YAML and search spaces

class _Loader(yaml.SafeLoader):
    """Safe YAML with RecBole's float rule: 1e-4 is a float, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", __import__("re").X),
    list("-+0123456789."))


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader) or {}


def find_space(space):
    """A space file path, or a bare name looked up in the plugin's properties/tune/."""
    path = Path(space).expanduser()
    if path.is_file():
        return path.resolve()
    from recbole_fmrl.config import properties_dir

    for candidate in (properties_dir() / "tune" / space, properties_dir() / "tune" / f"{space}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"search space {space!r}: no such file, nor properties/tune/{space}.yaml")


def typed(value):
    """A command-line ``key=value`` string as the Python value RecBole would make of it."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def plain(value):
    """Numbers, strings, lists and dicts only (numpy scalars from Ray's samplers become Python)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def expand_range(args):
    """``{range: [start, stop, step]}``: start, start + step, ..., stop (inclusive), rounded."""
    start, stop, step = args
    if step <= 0:
        raise ValueError(f"range {args}: step must be positive")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    values = [round(start + i * step, 10) for i in range(n)]
    return [int(v) if all(isinstance(a, int) for a in args) else v for v in values]


def check_distribution(key, spec):
    """(kind, args) of one space entry; a plain list is ``grid`` under grid search, ``choice`` under random."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"space.{key}: empty list")
        return None, spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, args = next(iter(spec.items()))
        if kind in ("grid", "choice") and (not isinstance(args, list) or not args):
            raise ValueError(f"space.{key}: {kind} needs a non-empty list")
        if kind == "range":
            return None, expand_range(args)
        if kind not in ("grid", "choice"):
            n = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3, "qloguniform": 3, "qrandint": 3}[kind]
            if not isinstance(args, list) or len(args) != n:
                raise ValueError(f"space.{key}: {kind} needs a list of {n} numbers, got {args!r}")
        return kind, args
    raise ValueError(f"space.{key}: expected a list or one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")


def grid_points(space, search):
    """Configurations per sample: the product of the grid axes (random draws count once)."""
    n = 1
    for key, spec in space.items():
        kind, args = check_distribution(key, spec)
        if kind == "grid" or (kind is None and search == "grid"):
            n *= len(args)
    return n


def ray_param_space(space, search):
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind, args = check_distribution(key, spec)
        if kind is None:
            kind = "grid" if search == "grid" else "choice"
        if kind == "grid":
            out[key] = tune.grid_search(list(args))
        elif kind == "choice":
            out[key] = tune.choice(list(args))
        else:
            out[key] = getattr(tune, kind)(*args)
    return out


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod}
_FUNCS = {"min": min, "max": max, "round": round, "int": int, "float": float, "abs": abs}


def evaluate_expression(expr, values):
    """Arithmetic over config values (``fmrl_ring_r_min + 0.1``); nothing else is evaluated."""
    if not isinstance(expr, str):
        return expr

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise ValueError(f"derived expression {expr!r}: unknown key {node.id!r}")
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"derived expression {expr!r}: only numbers, keys, + - * / // % ** and "
                         f"{', '.join(_FUNCS)} are allowed")

    value = ev(ast.parse(expr, mode="eval"))
    return round(value, 10) if isinstance(value, float) else value


def expression_names(expr):
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)} - set(_FUNCS) \
        if isinstance(expr, str) else set()


def sample_point(space):
    """One value per searched key (the first of a list, the low end of a distribution): for checks."""
    point = {}
    for key, spec in space.items():
        kind, args = check_distribution(key, spec)
        point[key] = args[0]
    return point


def trial_config_dict(job, params):
    """The config_dict of one trial: base (fixed + files + overrides), sampled values, derived keys."""
    cfg = dict(job["base"])
    cfg.update(plain(params))
    for key, expr in job["derived"].items():
        cfg[key] = evaluate_expression(expr, cfg)
    return cfg


def absolute_paths(cfg):
    out = dict(cfg)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def build_job(space, dataset=None, model=None, config_files=None, overrides=None, *, name=None, storage_path=None,
              search=None, scheduler=None, num_samples=None, search_seed=None, cpus_per_trial=1, gpus_per_trial=0,
              max_concurrent=None, max_failures=1, checkpoint_every=1):
    """Everything a search needs, as plain JSON-able values (stored with the experiment for resume)."""
    space_file = find_space(space)
    spec = load_yaml(space_file)
    unknown = set(spec) - SPACE_KEYS
    if unknown:
        raise ValueError(f"{space_file}: unknown top-level keys {sorted(unknown)}; expected {sorted(SPACE_KEYS)}")
    fixed = dict(spec.get("fixed") or {})
    searched = dict(spec.get("space") or {})
    derived = dict(spec.get("derived") or {})
    both = set(fixed) & (set(searched) | set(derived))
    if both:
        raise ValueError(f"{space_file}: keys both fixed and searched/derived: {sorted(both)}")
    user = {}
    for path in config_files or []:
        user.update(load_yaml(Path(path).expanduser()))
    user.update({k: typed(v) for k, v in (overrides or {}).items()})
    model = model or user.pop("model", None) or spec.get("model") or "FMRLRec"
    dataset = dataset or user.pop("dataset", None) or spec.get("dataset")
    user.pop("model", None), user.pop("dataset", None)
    if not dataset:
        raise ValueError("no dataset: pass --dataset NAME (or set dataset: in the space file)")
    pinned = sorted(k for k in user if k in searched or k in derived)
    for key in pinned:
        searched.pop(key, None), derived.pop(key, None)
    bad = sorted((set(searched) | set(derived)) & NOT_SEARCHABLE)
    if bad:
        raise ValueError(f"{space_file}: these keys cannot be searched: {bad}")
    if not searched:
        raise ValueError(f"{space_file}: nothing to search (space is empty after pinning {pinned})")
    search = search or spec.get("search", "grid")
    scheduler = scheduler or spec.get("scheduler", "fifo")
    if search not in SEARCHES:
        raise ValueError(f"search: {search!r}, expected one of {SEARCHES}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler: {scheduler!r}, expected one of {SCHEDULERS}")
    for key, value in searched.items():
        check_distribution(key, value)
    base = absolute_paths({**fixed, **user})
    missing = set().union(*[expression_names(e) for e in derived.values()]) - set(base) - set(searched) - set(derived)
    if missing:  # derived from a default value: record the default in the search's base config
        config = make_config(model, dataset, dict(base))
        base.update({k: config[k] for k in sorted(missing) if config[k] is not None})
    output_dir = Path(base.get("fmrl_output_dir") or "runs").expanduser().resolve()
    name = name or f"{model}-{dataset}-{space_file.stem}"
    job = {
        "model": model, "dataset": dataset, "space_file": str(space_file), "name": name,
        "storage_path": str(Path(storage_path).expanduser().resolve() if storage_path else output_dir / "tune"),
        "base": plain(base), "space": plain(searched), "derived": plain(derived), "pinned": pinned,
        "search": search, "scheduler": scheduler,
        "num_samples": int(num_samples or spec.get("num_samples") or 1),
        "search_seed": int(search_seed if search_seed is not None else spec.get("search_seed", 0)),
        "asha": dict(spec.get("asha") or {}),
        "resources": {"cpu": float(cpus_per_trial), "gpu": float(gpus_per_trial)},
        "max_concurrent": max_concurrent, "max_failures": int(max_failures), "checkpoint_every": int(checkpoint_every),
    }
    trial_config_dict(job, sample_point(searched))  # derived expressions fail here, not in every trial
    return job


# --------------------------------------------------------------------------- one trial (no Ray needed)

@contextlib.contextmanager
def preserved_cuda_env():
    """RecBole's Config._init_device writes CUDA_VISIBLE_DEVICES from gpu_id; undo that for the process."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def ray_device_overrides():
    """gpu_id / use_gpu matching the GPUs Ray gave this worker (RecBole must not pick its own)."""
    import ray

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return {"gpu_id": "", "use_gpu": False}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(int(g)) for g in gpu_ids)
    return {"gpu_id": visible, "use_gpu": True}


def make_config(model, dataset, config_dict):
    from recbole_fmrl.config import Config

    with preserved_cuda_env():
        return Config(model=model, dataset=dataset, config_dict=config_dict)


_DATASETS = OrderedDict()  # per worker process: dataset key -> dataset as loaded (never built)
DATASET_CACHE_SIZE = 2


def recbole_dataset_arguments():
    """RecBole's own list of dataset keys, as written in its source.

    ``config.parameters["Dataset"]`` cannot be used: it *is* RecBole's module-level list, and every
    Config appends the keys of the dataset's YAML files to it, for the rest of the process (the
    plugin's ml-100k.yaml sets hidden_size, so hidden_size would become a "dataset" key and every trial
    of a hidden-size grid would reload the data).
    """
    global _RECBOLE_DATASET_ARGUMENTS
    if _RECBOLE_DATASET_ARGUMENTS is None:
        import inspect

        import recbole.utils.argument_list as argument_list

        tree = ast.parse(inspect.getsource(argument_list))
        _RECBOLE_DATASET_ARGUMENTS = next(
            ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) == "dataset_arguments" for t in node.targets))
    return _RECBOLE_DATASET_ARGUMENTS


_RECBOLE_DATASET_ARGUMENTS = None


def dataset_key(config):
    """What the loaded dataset depends on: RecBole's dataset keys and the keys the datasets' __init__ read."""
    keys = sorted(set(recbole_dataset_arguments()) | set(DATASET_INIT_KEYS))
    return repr([(k, config[k]) for k in keys])


def cached_dataset(config):
    """The trial's dataset: loaded once per worker and dataset configuration, then copied per trial.

    Loading (reading atomic files, filtering, remapping) happens once; each trial gets a deep copy
    bound to its own Config (``build`` mutates the dataset). Item feature tensors are shared, not
    copied, so they too are read once per worker.
    """
    from recbole_fmrl.registry import create_dataset

    key = dataset_key(config)
    loaded = _DATASETS.pop(key, None)
    if loaded is None:
        loaded = create_dataset(config)
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
    """``quick_start.prepare`` with the per-worker dataset cache (same seeding, so same numbers)."""
    import torch
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_fmrl.data.auto_features import ensure_item_features
    from recbole_fmrl.outputs import init_logger
    from recbole_fmrl.quick_start import set_numerics
    from recbole_fmrl.registry import get_model, get_trainer

    config = make_config(model, dataset, config_dict)
    set_numerics(config)
    init_seed(config["seed"], config["reproducibility"])
    if log:
        init_logger(config)
        root = getLogger()
        for handler in [h for h in root.handlers if not hasattr(h, "baseFilename")]:
            root.removeHandler(handler)  # trial logs go to <trial>/fmrl/log/, not the console
    ensure_item_features(config)
    data = cached_dataset(config)
    getLogger().info(data)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    getLogger().info(net)  # as quick_start.prepare, so that a trial and a rerun do the same things in the same order
    trainer = get_trainer(config["model"])(config, net)
    # importing any RecBole sequential model imports SINE, whose module turns on autograd anomaly
    # detection for the whole process (a stack trace per op: baselines train several times slower)
    torch.autograd.set_detect_anomaly(False)
    return config, net, trainer, (train_data, valid_data, test_data)


def rng_state(train_data):
    import torch

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": train_data.generator.get_state() if getattr(train_data, "generator", None) is not None else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "random": [version, torch.tensor(mt, dtype=torch.int64), gauss],
    }


def set_rng_state(state, train_data):
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["loader"] is not None and getattr(train_data, "generator", None) is not None:
        train_data.generator.set_state(state["loader"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, mt, gauss = state["random"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))


def write_trial_checkpoint(folder, trainer, train_data, epoch, state):
    """latest.pth (model, optimiser, early stopping), best.pth, RNG states and the loop's own state."""
    import torch

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    trainer._save_checkpoint(epoch, verbose=False, saved_model_file=str(folder / "latest.pth"))
    if os.path.isfile(trainer.saved_model_file):
        shutil.copy2(trainer.saved_model_file, folder / "best.pth")
    torch.save(rng_state(train_data), folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def restore_trial_checkpoint(folder, trainer, train_data):
    import torch

    folder = Path(folder)
    best_file = trainer.saved_model_file
    trainer.resume_checkpoint(str(folder / "latest.pth"))
    trainer.saved_model_file = best_file
    if (folder / "best.pth").is_file():
        shutil.copy2(folder / "best.pth", best_file)
    set_rng_state(torch.load(folder / "rng.pt", weights_only=True), train_data)
    state = json.loads((folder / "state.json").read_text())
    trainer.best_valid_result = state["best_valid_result"]
    return state


def _metrics(prefix, result):
    return {f"{prefix}/{k}": float(v) for k, v in (result or {}).items()}


def train_trial(job, params, trial_dir, report, resume_dir=None, device=None, threads=None):
    """Train one configuration, calling ``report(metrics, checkpoint_folder_or_None)`` after every evaluation.

    The loop is RecBole's ``Trainer.fit`` (same early stopping, same checkpoints, same random
    numbers, so ``quick_start.run`` on the same configuration gives the same scores), opened up so
    that every evaluation is reported and every report can carry a resumable checkpoint.
    """
    import torch
    from recbole.utils import early_stopping

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    out = Path(trial_dir).resolve() / "fmrl"
    config_dict = trial_config_dict(job, params)
    config_dict.update({"fmrl_output_dir": str(out), "checkpoint_dir": str(out / "saved"), "show_progress": False})
    config_dict.update(device or {})
    config, net, trainer, (train_data, valid_data, _) = build_run(job["model"], job["dataset"], config_dict)
    trainer.saved_model_file = str(out / "saved" / "best.pth")
    if trainer.eval_step <= 0 or not valid_data:
        raise ValueError("tuning selects on validation: set eval_step >= 1 and keep a validation split")
    metric, bigger = config["valid_metric"].lower(), config["valid_metric_bigger"]
    last_eval = (trainer.epochs // trainer.eval_step) * trainer.eval_step - 1
    state = {"best_epoch": -1, "best_valid_result": None, "best_sizes": None}
    if resume_dir:
        state = restore_trial_checkpoint(resume_dir, trainer, train_data)
        getLogger().info(f"resumed from {resume_dir} at epoch {trainer.start_epoch}")
        if Path(resume_dir).resolve().parent == out:  # a copy Ray made for this restore
            shutil.rmtree(resume_dir, ignore_errors=True)
    trainer.eval_collector.data_collect(train_data)
    if (config["train_neg_sample_args"] or {}).get("dynamic", False):
        train_data.get_model(net)
    every = max(1, int(job.get("checkpoint_every", 1)))
    scratch = out / "checkpoint-tmp"
    try:  # Ray ends a stopped trial inside report() (SystemExit): the scratch folder still goes
        for epoch in range(trainer.start_epoch, last_eval + 1):
            start = time.perf_counter()
            loss = trainer._train_epoch(train_data, epoch, show_progress=False)
            loss = sum(loss) if isinstance(loss, tuple) else loss
            trainer.train_loss_dict[epoch] = loss
            trainer.logger.info(trainer._generate_train_loss_output(epoch, start, time.perf_counter(), loss))
            trainer._add_train_loss_to_tensorboard(epoch, loss)
            if (epoch + 1) % trainer.eval_step:
                continue
            score, result = trainer._valid_epoch(valid_data, show_progress=False)
            sizes = trainer.size_results
            trainer.best_valid_score, trainer.cur_step, stop, update = early_stopping(
                score, trainer.best_valid_score, trainer.cur_step, max_step=trainer.stopping_step, bigger=bigger)
            trainer.tensorboard.add_scalar("Vaild_score", score, epoch)
            trainer.logger.info(f"epoch {epoch} valid_score {score:.6f} best {trainer.best_valid_score:.6f}")
            if update:
                trainer._save_checkpoint(epoch, verbose=False)
                trainer.best_valid_result = result
                state.update(best_epoch=epoch, best_valid_result={k: float(v) for k, v in result.items()},
                             best_sizes={str(m): float(r[metric]) for m, r in sizes.items()} if sizes else None)
            finished = "early_stopped" if stop else ("max_epochs" if epoch >= last_eval else "")
            metrics = {
                "epoch": epoch, "train_loss": float(loss), "epoch_seconds": time.perf_counter() - start,
                "valid_score": float(score), SCORE: float(trainer.best_valid_score), "best_epoch": state["best_epoch"],
                "finished": finished, "device": str(config["device"]),
                **_metrics("valid", result), **_metrics("best", state["best_valid_result"]),
            }
            if sizes:
                metrics.update({f"valid_size/{m}": float(r[metric]) for m, r in sizes.items()})
            folder = None
            if finished or (epoch + 1) % (every * trainer.eval_step) == 0:
                folder = write_trial_checkpoint(scratch, trainer, train_data, epoch, state)
            report(metrics, folder)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if finished:
                break
        trainer._add_hparam_to_tensorboard(trainer.best_valid_score)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        trainer.tensorboard.close()
    return state


def evaluate_checkpoint(job, params, best_file, out_dir, device=None):
    """Validation and test metrics (all sizes) of one trial's best checkpoint: run once, for the selected trial."""
    config_dict = trial_config_dict(job, params)
    out = Path(out_dir).resolve()
    config_dict.update({"fmrl_output_dir": str(out), "checkpoint_dir": str(out / "saved"), "show_progress": False})
    config_dict.update(device or {})
    config, net, trainer, (_, valid_data, test_data) = build_run(job["model"], job["dataset"], config_dict)
    trainer.load_weights(str(best_file))
    valid = trainer.evaluate(valid_data, load_best_model=False)
    valid_sizes = trainer.size_results
    test = trainer.evaluate(test_data, load_best_model=False)
    test_sizes = trainer.size_results
    trainer.tensorboard.close()
    sizes = None
    if valid_sizes is not None:
        sizes = {str(m): {"params": int(net.nested_parameter_count(m)),
                          "valid": {k: float(v) for k, v in valid_sizes[m].items()},
                          "test": {k: float(v) for k, v in test_sizes[m].items()}} for m in net.sizes}
    return {"valid": {k: float(v) for k, v in valid.items()}, "test": {k: float(v) for k, v in test.items()},
            "valid_metric": config["valid_metric"].lower(), "size_results": sizes}


# --------------------------------------------------------------------------- Ray glue

def _ray_trial(params, job):
    """The Tune function trainable: Ray's trial folder, checkpoint, GPUs and CPUs -> ``train_trial``."""
    from ray.air import session
    from ray.air.checkpoint import Checkpoint

    warnings.filterwarnings("ignore", category=FutureWarning)
    trial_dir = session.get_trial_dir()
    resume_dir = None
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory(os.path.join(trial_dir, "fmrl", "resume"))
        # (removed again by train_trial once restored)

    def report(metrics, folder):
        session.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)) if folder else None)

    threads = session.get_trial_resources().required_resources.get("CPU", 1)
    train_trial(job, params, trial_dir, report, resume_dir=resume_dir, device=ray_device_overrides(),
                threads=threads)


def _evaluate_task(job, params, best_bytes, out_dir):
    import tempfile

    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.pth"
        best.write_bytes(best_bytes)
        return evaluate_checkpoint(job, params, best, out_dir, device=ray_device_overrides())


def _trial_dirname(trial):
    return f"trial_{trial.trial_id}"  # short: RecBole's file names and Windows-length paths stay sane


def make_trainable(job):
    from ray import tune

    resources = {"cpu": job["resources"]["cpu"], "gpu": job["resources"]["gpu"]}
    return tune.with_resources(tune.with_parameters(_ray_trial, job=job), resources)


def _mode(config):
    return "max" if config["valid_metric_bigger"] else "min"


def _driver_config(job):
    """The search's base configuration in the driver: checks it, names the metric, builds features once."""
    from recbole_fmrl.data.auto_features import ensure_item_features

    cfg = dict(job["base"], show_progress=False)
    config = make_config(job["model"], job["dataset"], cfg)
    ensure_item_features(config)
    return config


def _scheduler(job, config):
    if job["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = dict(job["asha"])
    max_t = asha.pop("max_t", None) or max(1, config["epochs"] // max(1, config["eval_step"]))
    return ASHAScheduler(time_attr="training_iteration", max_t=int(max_t),
                         grace_period=min(int(max_t), int(asha.pop("grace_period", 1))),
                         reduction_factor=float(asha.pop("reduction_factor", 2)), **asha)


def _reporter(job, metric, mode, report_every):
    from ray.tune import CLIReporter

    return CLIReporter(
        parameter_columns=list(job["space"]),
        metric_columns={"epoch": "epoch", "valid_score": metric, SCORE: f"best {metric}", "finished": "end"},
        max_report_frequency=report_every, sort_by_metric=True)  # metric and mode come from TuneConfig


def init_ray(address=None, num_cpus=None):
    """Attach to a cluster (``address``), or start a local Ray; an already running session is reused."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RECBOLE_FMRL_CACHE") if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}} if env and address else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def run_search(job, *, address=None, num_cpus=None, resume="auto", retry_errored=False, evaluate_test=True,
               verbose=1, report_every=30):
    """Run (or resume) a search; write results.csv/.md, best.yaml and selected.json; return a summary dict."""
    import ray
    from ray import air, tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    exp_dir = Path(job["storage_path"]) / job["name"]
    started = init_ray(address, num_cpus)
    try:
        restorable = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
        if restorable and resume == "no":
            raise FileExistsError(f"{exp_dir} holds a search; resume it (--resume auto) or pick another --name")
        if not restorable and resume == "yes":
            raise FileNotFoundError(f"{exp_dir}: no search to resume")
        if restorable:
            job = json.loads((exp_dir / JOB_FILE).read_text())
            print(f"resuming {exp_dir} (the stored search settings are used)")
        config = _driver_config(job)
        metric, mode = config["valid_metric"].lower(), _mode(config)
        if restorable:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=make_trainable(job), resume_unfinished=True,
                                       resume_errored=retry_errored)
        else:
            exp_dir.mkdir(parents=True, exist_ok=True)
            (exp_dir / JOB_FILE).write_text(json.dumps(job, indent=1))
            tuner = tune.Tuner(
                make_trainable(job),
                param_space=ray_param_space(job["space"], job["search"]),
                tune_config=tune.TuneConfig(
                    metric=SCORE, mode=mode, num_samples=job["num_samples"], scheduler=_scheduler(job, config),
                    search_alg=BasicVariantGenerator(random_state=job["search_seed"]),
                    max_concurrent_trials=job["max_concurrent"], reuse_actors=True,
                    trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname),
                run_config=air.RunConfig(
                    name=job["name"], storage_path=job["storage_path"], verbose=verbose,
                    failure_config=air.FailureConfig(max_failures=job["max_failures"]),
                    checkpoint_config=air.CheckpointConfig(num_to_keep=1),
                    progress_reporter=_reporter(job, metric, mode, report_every)))
        start = time.perf_counter()
        previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic table: chosen columns, sorted by the metric
        try:
            grid = tuner.fit()
        finally:
            if previous is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = previous
        search_seconds = time.perf_counter() - start
        rows = result_rows(grid, job, metric, mode)
        unfinished = [r["trial_id"] for r in rows if r["status"] not in ("TERMINATED", "ERROR")]
        if unfinished:
            print(f"search interrupted ({len(unfinished)} trials unfinished): rerun the same command to resume {exp_dir}")
        selected = None
        best = next((r for r in rows if r["status"] == "TERMINATED" and r.get("_checkpoint")), None)
        best_bytes = read_best_weights(best["_checkpoint"]) if best is not None and not unfinished else None
        if best_bytes is not None:
            selected = {"trial_id": best["trial_id"], "trial_dir": best["trial_dir"], "params": best["_params"],
                        "best_epoch": best["best_epoch"], "reported_valid_score": best[SCORE],
                        "valid_metric": metric, "config": best_config(job, best["_params"])}
            if evaluate_test:
                task = ray.remote(_evaluate_task).options(num_cpus=job["resources"]["cpu"],
                                                          num_gpus=job["resources"]["gpu"], max_retries=0)
                selected.update(ray.get(task.remote(job, best["_params"], best_bytes, str(exp_dir / "selected"))))
        total_seconds = time.perf_counter() - start
        summary = write_outputs(exp_dir, job, rows, selected, metric, mode, search_seconds, total_seconds)
        summary["result_grid"] = grid
        return summary
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- results

def _trial_params(result, job, saved_config=None):
    """The sampled values of a trial (also for trials that failed before their first report)."""
    params = result.config or saved_config
    if params is None and result.path and os.path.isfile(os.path.join(result.path, "params.json")):
        with open(os.path.join(result.path, "params.json")) as f:
            params = json.load(f)
    params = plain(params or {})
    return {k: params[k] for k in job["space"] if k in params}


def read_best_weights(checkpoint):
    """best.pth of a trial's last Ray checkpoint (local folder or cloud storage), or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / "best.pth"
        return path.read_bytes() if path.is_file() else None


def _trial_states(grid):
    """Trial folder -> (status, sampled config) as saved in the experiment's state file.

    The saved state tells an interrupted trial (PENDING / RUNNING / PAUSED) from a finished one,
    which the ResultGrid does not; it also holds the config of trials that never started.
    """
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(getattr(grid, "_local_path", None) or grid.experiment_path).trials
    except Exception:  # noqa: BLE001 - fall back to what the ResultGrid holds
        trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return {os.path.basename(str(t.local_path)): (t.status, t.config) for t in trials}


def result_rows(grid, job, metric, mode):
    rows = []
    states = _trial_states(grid)
    for result in grid:
        m = result.metrics or {}
        m = m if SCORE in m else {}  # a trial that never reported has only its trial_id here
        saved_status, saved_config = states.get(os.path.basename(result.path or ""), ("TERMINATED", None))
        params = _trial_params(result, job, saved_config)
        derived = {k: v for k, v in trial_config_dict(job, params).items() if k in job["derived"]} if params else {}
        error = "" if result.error is None else (str(result.error).strip().splitlines() or [""])[-1][:300]
        status = "ERROR" if error else saved_status
        end = m.get("finished") or ("error" if error else "unfinished" if status != "TERMINATED" else
                                    "stopped by scheduler" if m else "no report")
        row = {"trial_id": os.path.basename(result.path or "").replace("trial_", "") or (result.metrics or {}).get("trial_id", ""),
               "status": status, "end": end, **params, **derived,
               SCORE: m.get(SCORE, float("nan")), "best_epoch": m.get("best_epoch", ""),
               "epochs": (m.get("epoch", -1) + 1) if m else 0, "evaluations": m.get("training_iteration", 0),
               **{k[len("best/"):]: v for k, v in m.items() if k.startswith("best/")},
               "time_s": f"{m.get('time_total_s', 0.0):.1f}", "error": error, "trial_dir": result.path,
               "_params": params, "_checkpoint": result.checkpoint}
        rows.append(row)
    sign = -1 if mode == "max" else 1

    def order(row):
        score = row[SCORE]
        ok = isinstance(score, (int, float)) and math.isfinite(score)
        return (0 if ok else 1, sign * score if ok else 0, row["trial_id"])

    rows.sort(key=order)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def best_config(job, params):
    """The selected configuration as one flat dict (trial-only keys left out)."""
    cfg = trial_config_dict(job, params)
    for key in TRIAL_KEYS:
        cfg.pop(key, None)
    return {"model": job["model"], "dataset": job["dataset"], **plain(cfg)}


def _fmt(value):
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def write_outputs(exp_dir, job, rows, selected, metric, mode, search_seconds, total_seconds):
    exp_dir = Path(exp_dir)
    param_cols = list(job["space"]) + list(job["derived"])
    metric_cols = sorted({k for r in rows for k in r if "@" in k and not k.startswith("_")},
                         key=lambda k: (k != metric, k.split("@")[0], int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0))
    head = ["rank", "trial_id", "status", "end"] + param_cols + [SCORE, "best_epoch", "epochs"]
    csv_cols = head + metric_cols + ["time_s", "error", "trial_dir"]
    with open(exp_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in csv_cols})
    cutoff = metric.split("@")[1] if "@" in metric else None
    md_metrics = [k for k in metric_cols if k != metric and (cutoff is None or k.endswith(f"@{cutoff}"))][:3]
    md_cols = ["rank", "trial_id", "end"] + param_cols + [f"valid {metric}", "best epoch", "epochs"] + \
              [f"valid {k}" for k in md_metrics] + ["time (s)"]
    lines = [f"# Tune: {job['model']} on {job['dataset']} ({Path(job['space_file']).name})", "",
             f"- search: {job['search']}, scheduler: {job['scheduler']}, trials: {len(rows)} "
             f"({sum(r['status'] == 'ERROR' for r in rows)} failed, "
             f"{sum(r['status'] not in ('ERROR', 'TERMINATED') for r in rows)} unfinished), "
             f"selection: best validation {metric} ({mode})",
             f"- wall time: search {search_seconds:.0f} s, with the selected trial's test evaluation {total_seconds:.0f} s",
             f"- resources per trial: {job['resources']['cpu']:g} CPU, {job['resources']['gpu']:g} GPU"
             + (f"; pinned: {', '.join(job['pinned'])}" if job["pinned"] else ""), "",
             "Trials, sorted by validation score (test metrics are never used to select):", "",
             "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for row in rows:
        cells = [row["rank"], row["trial_id"], row["end"] if row["status"] != "ERROR" else f"error: {row['error'][:80]}"]
        cells += [row.get(k, "") for k in param_cols]
        cells += [row[SCORE], row["best_epoch"], row["epochs"]] + [row.get(k, "") for k in md_metrics] + [row["time_s"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if selected:
        best_yaml = exp_dir / "best.yaml"
        header = (f"# Selected by validation {metric} = {selected['reported_valid_score']:.4f} "
                  f"(trial {selected['trial_id']}, best epoch {selected['best_epoch']}) in {exp_dir}.\n"
                  f"# Rerun: python run_recbole_fmrl.py --model {job['model']} --dataset {job['dataset']} "
                  f"--config_files {best_yaml}\n")
        best_yaml.write_text(header + yaml.safe_dump(selected["config"], sort_keys=False, default_flow_style=False))
        (exp_dir / "selected.json").write_text(json.dumps(selected, indent=1))
        lines += ["", f"## Selected: trial {selected['trial_id']}", "",
                  "Values: " + ", ".join(f"`{k}={selected['config'].get(k)}`" for k in param_cols), "",
                  f"Configuration: `{best_yaml}`", ""]
        if "test" in selected:
            keys = [k for k in selected["test"] if cutoff is None or k.endswith(f"@{cutoff}")] or list(selected["test"])
            lines += ["Best checkpoint, evaluated once after the search (largest size):", "",
                      "| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
                      "| valid | " + " | ".join(_fmt(selected["valid"][k]) for k in keys) + " |",
                      "| test | " + " | ".join(_fmt(selected["test"][k]) for k in keys) + " |"]
            if selected.get("size_results"):
                lines += ["", f"Per size (one model), {metric}:", "", "| size | params | valid | test |",
                          "|---|---|---|---|"]
                for size, r in selected["size_results"].items():
                    lines.append(f"| {size} | {r['params']:,} | {_fmt(r['valid'][metric])} | {_fmt(r['test'][metric])} |")
    (exp_dir / "results.md").write_text("\n".join(lines) + "\n")
    return {"experiment_dir": str(exp_dir), "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
            "selected": selected, "metric": metric, "mode": mode, "search_seconds": search_seconds,
            "total_seconds": total_seconds, "results_csv": str(exp_dir / "results.csv"),
            "results_md": str(exp_dir / "results.md"),
            "best_yaml": str(exp_dir / "best.yaml") if selected else None}


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="run_recbole_fmrl.py tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="search space YAML (or a name under properties/tune/)")
    parser.add_argument("--dataset", "-d", default=None, help="dataset name (default: the space's dataset)")
    parser.add_argument("--model", "-m", default=None, help="model (default: the space's model)")
    parser.add_argument("--config_files", nargs="*", default=None, help="YAML files shared by every trial")
    parser.add_argument("--name", default=None, help="experiment name (default <model>-<dataset>-<space>)")
    parser.add_argument("--storage_path", default=None, help="experiments folder (default <fmrl_output_dir>/tune)")
    parser.add_argument("--search", choices=SEARCHES, default=None, help="override the space's search")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="override the space's scheduler")
    parser.add_argument("--num_samples", type=int, default=None, help="random: configurations; grid: repeats")
    parser.add_argument("--search_seed", type=int, default=None, help="seed of the random search's sampler")
    parser.add_argument("--cpus_per_trial", type=float, default=1)
    parser.add_argument("--gpus_per_trial", type=float, default=0, help="fractions share a GPU")
    parser.add_argument("--max_concurrent", type=int, default=None, help="trials running at once (default: as resources allow)")
    parser.add_argument("--max_failures", type=int, default=1, help="retries of a failed trial (from its last checkpoint)")
    parser.add_argument("--checkpoint_every", type=int, default=1, help="evaluations between trial checkpoints")
    parser.add_argument("--address", default=None, help="Ray cluster to attach to (e.g. auto or ray://head:10001)")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--resume", choices=("auto", "yes", "no"), default="auto",
                        help="auto: resume the experiment if its folder holds one, else start")
    parser.add_argument("--retry_errored", action="store_true", help="on resume, rerun trials that had failed")
    parser.add_argument("--no_test", action="store_true", help="skip the selected trial's test evaluation")
    parser.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress table, 2-3 every result")
    parser.add_argument("--report_every", type=float, default=30, help="seconds between progress tables")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            parser.error(f"unrecognised argument {item!r}: expected key=value")
        overrides[key] = value
    return args, overrides


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args, overrides = parse_args(argv)
    job = build_job(args.space, args.dataset, args.model, args.config_files, overrides, name=args.name,
                    storage_path=args.storage_path, search=args.search, scheduler=args.scheduler,
                    num_samples=args.num_samples, search_seed=args.search_seed, cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                    max_failures=args.max_failures, checkpoint_every=args.checkpoint_every)
    summary = run_search(job, address=args.address, num_cpus=args.num_cpus, resume=args.resume,
                         retry_errored=args.retry_errored, evaluate_test=not args.no_test, verbose=args.verbose,
                         report_every=args.report_every)
    print(Path(summary["results_md"]).read_text())
    print(f"results: {summary['results_csv']}\n         {summary['results_md']}")
    if summary["best_yaml"]:
        print(f"best:    {summary['best_yaml']}")
    return summary


if __name__ == "__main__":
    main()
