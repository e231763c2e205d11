"""Search spaces: YAML files under properties/tune/, their distributions and derived keys, and the job.

A search space file names the model, the search (grid or random), the scheduler (fifo or ASHA), keys
shared by every trial (``fixed``), the searched keys (``space``) and keys computed from them
(``derived``). Layering per trial, later wins: the plugin's properties -> the space's ``fixed`` ->
``--config_files`` -> ``key=value`` -> the trial's sampled values -> ``derived``. A key given in
``--config_files`` or ``key=value`` that the space searches is pinned (taken out of the search).
``seeds`` (a list of ints) trains every configuration once per seed: configurations are ranked and
selected on their mean validation score over the seeds (one lucky seed cannot win).
"""
import ast
import contextlib
import math
import operator
import os
import re
from pathlib import Path

import numpy as np
import yaml

from recbole_fmrl.errors import InputError
from recbole_fmrl.paths import properties_dir
from recbole_fmrl.train.schema import PATH_KEYS  # keys resolved against the launch folder

SEARCHES = ("grid", "random")
SCHEDULERS = ("fifo", "asha")
SPACE_KEYS = {"model", "dataset", "search", "scheduler", "num_samples", "search_seed", "asha", "fixed", "space",
              "derived", "description", "seeds"}
DISTRIBUTIONS = ("grid", "choice", "range", "uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint")
# keys each trial sets itself: never searched, never written to best.yaml
TRIAL_KEYS = ("fmrl_output_dir", "checkpoint_dir", "gpu_id", "use_gpu", "show_progress")
NOT_SEARCHABLE = set(TRIAL_KEYS) | {"model", "dataset", "valid_metric", "valid_metric_bigger", "metrics", "eval_args",
                                    "data_path", "fmrl_cache_dir", "fmrl_feature_path", "nproc", "local_rank"}

class SpaceError(InputError):
    """A search space file, or a key given with it, that cannot be searched (one line naming it)."""


class _Loader(yaml.SafeLoader):
    """Safe YAML with RecBole's float rule: 1e-4 is a float, not a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader) or {}


def find_space(space: str) -> Path:
    """A space file path, or a bare name looked up in the plugin's properties/tune/."""
    path = Path(space).expanduser()
    if path.is_file():
        return path.resolve()
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


def expand_range(args: list) -> list:
    """``{range: [start, stop, step]}``: start, start + step, ..., stop (inclusive), rounded."""
    start, stop, step = args
    if step <= 0:
        raise SpaceError(f"range {args}: step must be positive")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    values = [round(start + i * step, 10) for i in range(n)]
    return [int(v) if all(isinstance(a, int) for a in args) else v for v in values]


def check_distribution(key, spec):
    """(kind, args) of one space entry; a plain list is ``grid`` under grid search, ``choice`` under random."""
    if isinstance(spec, list):
        if not spec:
            raise SpaceError(f"space.{key}: empty list")
        return None, spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, args = next(iter(spec.items()))
        if kind in ("grid", "choice") and (not isinstance(args, list) or not args):
            raise SpaceError(f"space.{key}: {kind} needs a non-empty list")
        if kind == "range":
            return None, expand_range(args)
        if kind not in ("grid", "choice"):
            n = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3, "qloguniform": 3, "qrandint": 3}[kind]
            if not isinstance(args, list) or len(args) != n:
                raise SpaceError(f"space.{key}: {kind} needs a list of {n} numbers, got {args!r}")
        return kind, args
    raise SpaceError(f"space.{key}: expected a list or one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")


def grid_points(space: dict, search: str) -> int:
    """Configurations per sample: the product of the grid axes (random draws count once)."""
    n = 1
    for key, spec in space.items():
        kind, args = check_distribution(key, spec)
        if kind == "grid" or (kind is None and search == "grid"):
            n *= len(args)
    return n


def trial_count(job: dict) -> int:
    """Trainings the job runs: grid points x samples x seeds (Ray grids the seeds like any other axis)."""
    return grid_points(job["space"], job["search"]) * job["num_samples"] * max(1, len(job.get("seeds") or []))


def searched_keys(job: dict) -> list:
    """The keys a trial's sampled values hold: the space's, and ``seed`` when the job repeats seeds."""
    return list(job["space"]) + (["seed"] if job.get("seeds") else [])


def check_seeds(seeds, where):
    """``seeds``: None / empty (one run per configuration) or a list of distinct ints."""
    if not seeds:
        return []
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SpaceError(f"{where}: seeds must be a list of distinct integers, got {seeds!r}")
    return list(seeds)


def ray_param_space(space: dict, search: str, seeds=()) -> dict:
    from ray import tune

    out = {"seed": tune.grid_search(list(seeds))} if seeds else {}
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


def evaluate_expression(expr, values: dict):
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
                raise SpaceError(f"derived expression {expr!r}: unknown key {node.id!r}")
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise SpaceError(f"derived expression {expr!r}: only numbers, keys, + - * / // % ** and "
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


def trial_config_dict(job: dict, params: dict) -> dict:
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
              max_concurrent=None, max_failures=1, checkpoint_every=1, seeds=None) -> dict:
    """Everything a search needs, as plain JSON-able values (stored with the experiment for resume)."""
    space_file = find_space(space)
    spec = load_yaml(space_file)
    unknown = set(spec) - SPACE_KEYS
    if unknown:
        raise SpaceError(f"{space_file}: unknown top-level keys {sorted(unknown)}; expected {sorted(SPACE_KEYS)}")
    fixed = dict(spec.get("fixed") or {})
    searched = dict(spec.get("space") or {})
    derived = dict(spec.get("derived") or {})
    both = set(fixed) & (set(searched) | set(derived))
    if both:
        raise SpaceError(f"{space_file}: keys both fixed and searched/derived: {sorted(both)}")
    user = {}
    for path in config_files or []:
        user.update(load_yaml(Path(path).expanduser()))
    user.update({k: typed(v) for k, v in (overrides or {}).items()})
    model = model or user.pop("model", None) or spec.get("model") or "FMRLRec"
    dataset = dataset or user.pop("dataset", None) or spec.get("dataset")
    user.pop("model", None), user.pop("dataset", None)
    if not dataset:
        raise SpaceError("no dataset: pass --dataset NAME (or set dataset: in the space file)")
    pinned = sorted(k for k in user if k in searched or k in derived)
    for key in pinned:
        searched.pop(key, None), derived.pop(key, None)
    bad = sorted((set(searched) | set(derived)) & NOT_SEARCHABLE)
    if bad:
        raise SpaceError(f"{space_file}: these keys cannot be searched: {bad}")
    if not searched:
        raise SpaceError(f"{space_file}: nothing to search (space is empty after pinning {pinned})")
    search = search or spec.get("search", "grid")
    scheduler = scheduler or spec.get("scheduler", "fifo")
    if search not in SEARCHES:
        raise SpaceError(f"search: {search!r}, expected one of {SEARCHES}")
    if scheduler not in SCHEDULERS:
        raise SpaceError(f"scheduler: {scheduler!r}, expected one of {SCHEDULERS}")
    for key, value in searched.items():
        check_distribution(key, value)
    seeds = check_seeds(seeds if seeds is not None else spec.get("seeds"), f"{space_file}: seeds")
    if seeds and ("seed" in searched or "seed" in derived or "seed" in user):
        raise SpaceError(f"{space_file}: seed is {'given' if 'seed' in user else 'searched'} and the space repeats "
                         f"seeds {seeds}; keep one")
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
        "search": search, "scheduler": scheduler, "seeds": seeds,
        "num_samples": int(num_samples or spec.get("num_samples") or 1),
        "search_seed": int(search_seed if search_seed is not None else spec.get("search_seed", 0)),
        "asha": dict(spec.get("asha") or {}),
        "resources": {"cpu": float(cpus_per_trial), "gpu": float(gpus_per_trial)},
        "max_concurrent": max_concurrent, "max_failures": int(max_failures), "checkpoint_every": int(checkpoint_every),
    }
    trial_config_dict(job, sample_point(searched))  # derived expressions fail here, not in every trial
    return job


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


def make_config(model, dataset, config_dict):
    from recbole_fmrl.train.config import Config

    with preserved_cuda_env():
        return Config(model=model, dataset=dataset, config_dict=config_dict)
