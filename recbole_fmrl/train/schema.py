"""The typed configuration schema: every key the plugin reads, checked before anything loads or writes.

``Config`` (``train/config.py``) calls ``check_keys`` on what the user gave (config files and
``key=value`` / ``config_dict``) and ``check_values`` on the merged configuration, before RecBole
acts on it. A problem is a ``ConfigError`` (an ``InputError``: one line, exit status 2) naming the key,
its value and where it came from:

- **unknown keys** (a typo such as ``hiden_size``): refused, naming the closest known key. Known are
  RecBole's own keys (every key of its properties YAML files, model files included, and every key its
  code reads) and the plugin's (this schema and its properties files).
- **types and ranges** of the keys in ``SCHEMA``: the plugin's ``fmrl_`` keys and the RecBole keys it
  depends on (sizes, epochs, window, batch sizes, cut-offs, learning rate, dropout, ...);
- **relations** RecBole or the model would trip over later: nested sizes ending at ``hidden_size``,
  one loss weight per size, ``valid_metric`` among ``metrics`` and ``topk``, ring radii in order,
  ``hidden_size`` a multiple of ``n_heads``, ``eval_args`` RecBole can split by.

Defaults are not here: they live in the YAML files only (RecBole's, then ``properties/``). Each
entry says whether a resumed run must share it (``resume``): ``RESUME_KEYS`` is derived from that,
and ``PATH_KEYS`` from the entries that are paths.
"""
import difflib
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from recbole_fmrl.data.dataset import OBJECTIVES
from recbole_fmrl.data.features import NORMS
from recbole_fmrl.data.modality import MODALITY_CHOICES
from recbole_fmrl.errors import InputError
from recbole_fmrl.model.nested import default_sizes
from recbole_fmrl.paths import properties_dir

SELECTION_RULES = ("largest", "mean", "geomean", "per_size")  # fmrl_select_on (train/trainer.py select_score, size_best.py)
SCANS = ("dense", "doubling")  # fmrl_scan (model/lru.py SCANS; "sequential" is the tests' reference)
FMLP_FILTERS = ("global", "causal")  # fmlp_filter (model/fmlprec.py FILTERS)
LEARNERS = ("adam", "adamw", "sgd", "adagrad", "rmsprop", "sparse_adam")  # RecBole's _build_optimizer
STATES = ("info", "debug", "warning", "error", "critical")
LS_MODES = ("valid_and_test", "valid_only", "test_only")


class ConfigError(InputError):
    """A configuration key with an unknown name, a wrong type or an out-of-range value."""


# ----------------------------------------------------------------------------- value rules

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _bounds(low, high, low_open=False, high_open=False):
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _within(v, low, high, low_open, high_open):
    return ((low is None or (v > low if low_open else v >= low))
            and (high is None or (v < high if high_open else v <= high)))


def integer(low=None, high=None) -> Callable:
    need = f"an integer {_bounds(low, high)}".strip()
    return lambda v: None if _is_int(v) and _within(v, low, high, False, False) else need


def number(low=None, high=None, low_open=False, high_open=False) -> Callable:
    need = f"a number {_bounds(low, high, low_open, high_open)}".strip()
    return lambda v: None if _is_number(v) and _within(v, low, high, low_open, high_open) else need


def boolean(v):
    return None if isinstance(v, bool) else "True or False"


def text(v):
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def choice(*options, case=True) -> Callable:
    need = "one of " + ", ".join(map(str, options))

    def check(v):
        if not isinstance(v, str):
            return need
        return None if (v if case else v.lower()) in options else need
    return check


def int_list(low=None) -> Callable:
    need = f"a list of integers {_bounds(low, None)}".strip()

    def check(v):
        ok = isinstance(v, (list, tuple)) and v and all(_is_int(x) and _within(x, low, None, False, False) for x in v)
        return None if ok else need
    return check


def int_or_int_list(low=None) -> Callable:
    as_list = int_list(low)
    return lambda v: as_list([v] if _is_int(v) else v)


def str_list(v):
    ok = isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v)
    return None if ok else "a list of strings"


def str_or_str_list(v):
    return str_list([v] if isinstance(v, str) else v)


def mapping(v):
    return None if isinstance(v, dict) else "a mapping {key: value}"


def size_weights(v):
    """A list of weights (one per size) or {size: weight}; each a number >= 0."""
    if isinstance(v, dict):
        ok = all(_is_int(k) and k > 0 or isinstance(k, str) and k.isdigit() for k in v) and \
            all(_is_number(w) and w >= 0 for w in v.values())
    else:
        ok = isinstance(v, (list, tuple)) and v and all(_is_number(w) and w >= 0 for w in v)
    return None if ok else "a list of numbers >= 0 (one per size) or a mapping {size: weight}"


def native_flag(v):
    return None if v is None or isinstance(v, bool) else "True, False or null (~)"


# ----------------------------------------------------------------------------- the schema

@dataclass(frozen=True)
class Key:
    check: Callable  # value -> None, or what the key needs ("an integer >= 1")
    nullable: bool = False  # ~ / None is a valid value (the YAML default says what it means)
    resume: bool = False  # a resumed run must have the value its checkpoint was written with
    path: bool = False  # a filesystem path (tune trials resolve these against the launch folder)


POSITIVE = integer(low=1)
DROPOUT = number(low=0, high=1, high_open=True)

SCHEMA = {
    # what the run is
    "model": Key(text, resume=True),
    "dataset": Key(text, resume=True),
    "seed": Key(integer(), resume=True),
    # RecBole's environment
    "use_gpu": Key(boolean),
    "reproducibility": Key(boolean),
    "state": Key(choice(*STATES, case=False)),
    "show_progress": Key(boolean),
    "worker": Key(integer(low=0)),
    "data_path": Key(text, path=True),
    "checkpoint_dir": Key(text, nullable=True, path=True),
    "dataset_save_path": Key(text, nullable=True, path=True),
    "dataloaders_save_path": Key(text, nullable=True, path=True),
    # training
    "epochs": Key(POSITIVE),
    "train_batch_size": Key(POSITIVE, resume=True),
    "learner": Key(choice(*LEARNERS, case=False), resume=True),
    "learning_rate": Key(number(low=0, low_open=True), resume=True),
    "weight_decay": Key(number(low=0), resume=True),
    "eval_step": Key(integer(low=0), resume=True),
    "stopping_step": Key(POSITIVE, resume=True),
    "clip_grad_norm": Key(mapping, nullable=True),
    "train_neg_sample_args": Key(mapping, nullable=True),
    "loss_type": Key(text),
    # evaluation
    "eval_args": Key(mapping),
    "metrics": Key(str_or_str_list),
    "topk": Key(int_or_int_list(low=1)),
    "valid_metric": Key(text, resume=True),
    "eval_batch_size": Key(POSITIVE),
    "repeatable": Key(boolean),
    "metric_decimal_place": Key(integer(low=0)),
    # data
    "MAX_ITEM_LIST_LENGTH": Key(POSITIVE, resume=True),
    "load_col": Key(mapping, nullable=True),
    "USER_ID_FIELD": Key(text),
    "ITEM_ID_FIELD": Key(text),
    "TIME_FIELD": Key(text, nullable=True),
    "benchmark_filename": Key(str_list, nullable=True),
    # network (FMRLRec and the baselines the plugin ships; RecBole's models read the same names)
    "hidden_size": Key(POSITIVE, resume=True),
    "n_layers": Key(POSITIVE, resume=True),
    "n_heads": Key(POSITIVE),
    "inner_size": Key(POSITIVE),
    "hidden_dropout_prob": Key(DROPOUT),
    "attn_dropout_prob": Key(DROPOUT),  # FMRLRec / LRURec: dropout on the LRU output
    "layer_norm_eps": Key(number(low=0, low_open=True)),
    "initializer_range": Key(number(low=0, low_open=True)),
    "hidden_act": Key(text),
    # the plugin's keys (documented in properties/overall.yaml and properties/model/*.yaml)
    "fmrl_output_dir": Key(text, path=True),
    "fmrl_cache_dir": Key(text, nullable=True, path=True),
    "fmrl_flush_denormal": Key(boolean),
    "fmrl_lr_warmup_steps": Key(integer(low=0), resume=True),
    "fmrl_lr_decay_epochs": Key(integer(low=0), resume=True),
    "fmrl_valid_every_size": Key(boolean),
    "fmrl_select_on": Key(choice(*SELECTION_RULES), resume=True),
    "fmrl_eval_mask_history": Key(boolean),
    "fmrl_sizes": Key(int_list(low=1), nullable=True, resume=True),
    "fmrl_size_weights": Key(size_weights, nullable=True, resume=True),
    "fmrl_ffn_ratio": Key(POSITIVE),
    "fmrl_lru_state_ratio": Key(POSITIVE),
    "fmrl_ring_r_min": Key(number(low=0, high=1, high_open=True)),
    "fmrl_ring_r_max": Key(number(low=0, high=1, low_open=True)),
    "fmrl_scan": Key(choice(*SCANS)),
    "fmrl_modality": Key(choice("auto", *MODALITY_CHOICES), nullable=True, resume=True),
    "fmrl_feature_norm": Key(choice(*NORMS), nullable=True),
    "fmrl_feature_path": Key(text, nullable=True, path=True),
    "fmrl_build_text_features": Key(boolean),
    "fmrl_text_fields": Key(str_list, nullable=True),
    "fmrl_text_encoder": Key(text),
    "fmrl_train_objective": Key(choice(*OBJECTIVES), resume=True),
    "fmrl_loss_chunk_size": Key(integer(low=-1)),
    "fmrl_native_loss": Key(native_flag, nullable=True),
    "fmrl_train_negatives": Key(integer(low=0), resume=True),
    "fmrl_distill_weight": Key(number(low=0), resume=True),
    "fmrl_distill_rows": Key(integer(low=0), resume=True),
    "fmlp_filter": Key(choice(*FMLP_FILTERS)),
}

RESUME_KEYS = tuple(k for k, spec in SCHEMA.items() if spec.resume)
PATH_KEYS = tuple(k for k, spec in SCHEMA.items() if spec.path)


# ----------------------------------------------------------------------------- known keys

def _yaml_keys(folder: Path) -> set:
    keys = set()
    for path in sorted(folder.rglob("*.yaml")):
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(loaded, dict):
            keys.update(str(k) for k in loaded)
    return keys


_READS = re.compile(r"""config(?:_dict)?\s*\[\s*["']([A-Za-z_]\w*)["']\s*\]|config(?:_dict)?\.get\(\s*["']([A-Za-z_]\w*)["']""")


@functools.lru_cache(maxsize=1)
def recbole_keys() -> frozenset:
    """Every key RecBole knows: its properties files (overall, every model and dataset, quick-start) and
    every ``config[...]`` its code reads (keys such as ``nproc`` or ``enable_amp`` that no YAML lists)."""
    import recbole
    from recbole.utils import argument_list

    root = Path(recbole.__file__).parent
    keys = _yaml_keys(root / "properties")
    for source in root.rglob("*.py"):
        for match in _READS.finditer(source.read_text(encoding="utf-8", errors="replace")):
            keys.add(match.group(1) or match.group(2))
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys.update(getattr(argument_list, name))
    return frozenset(keys)


@functools.lru_cache(maxsize=1)
def plugin_keys() -> frozenset:
    props = properties_dir()
    keys = set(SCHEMA)
    for folder in ("model", "dataset", "job"):
        keys |= _yaml_keys(props / folder)
    return frozenset(keys | _yaml_keys_of(props / "overall.yaml"))


def _yaml_keys_of(path: Path) -> set:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return set(loaded) if isinstance(loaded, dict) else set()


def known_keys() -> frozenset:
    return recbole_keys() | plugin_keys()


def check_keys(given: dict, sources: dict):
    """Refuse keys neither RecBole nor the plugin reads (typos), naming the closest known key."""
    known = known_keys()
    for key in given:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see properties/overall.yaml for the plugin's keys"
        raise ConfigError(f"{key}: unknown configuration key ({sources.get(key, 'given')}); {hint}")


# ----------------------------------------------------------------------------- values

def _fail(key, value, need, sources):
    raise ConfigError(f"{key}={value!r} ({sources.get(key, 'the default')}): need {need}")


def check_values(cfg: dict, sources: dict, model_keys=frozenset()):
    """Type and range of every ``SCHEMA`` key in ``cfg``, then the relations between keys.

    ``model_keys``: the keys the model's own YAML sets (``n_heads`` only constrains models that have it).
    """
    for key, spec in SCHEMA.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if value is None and spec.nullable:
            continue
        need = "a value" if value is None else spec.check(value)
        if need:
            _fail(key, value, need + (" (or ~)" if spec.nullable else ""), sources)
    for relation in RELATIONS:
        relation(cfg, sources, model_keys)


def _nested_sizes(cfg, sources, _model_keys):
    sizes, d = cfg.get("fmrl_sizes"), cfg.get("hidden_size")
    if not sizes:
        return
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        _fail("fmrl_sizes", sizes, "strictly increasing sizes", sources)
    if d is not None and sizes[-1] != d:
        _fail("fmrl_sizes", sizes, f"sizes ending at hidden_size={d}", sources)


def _size_weights(cfg, sources, _model_keys):
    weights, d = cfg.get("fmrl_size_weights"), cfg.get("hidden_size")
    if not weights or d is None:
        return
    sizes = cfg.get("fmrl_sizes") or default_sizes(d)
    if isinstance(weights, dict):  # unlisted sizes weigh 1 (model/fmrlrec.py)
        per_size = [weights.get(m, weights.get(str(m), 1.0)) for m in sizes]
    elif len(weights) != len(sizes):
        _fail("fmrl_size_weights", weights, f"{len(sizes)} weights, one per size {list(sizes)}", sources)
    else:
        per_size = weights
    if sum(per_size) <= 0:
        _fail("fmrl_size_weights", weights, "at least one size with a weight > 0", sources)


def _ring(cfg, sources, _model_keys):
    r_min, r_max = cfg.get("fmrl_ring_r_min"), cfg.get("fmrl_ring_r_max")
    if r_min is not None and r_max is not None and not r_min < r_max:
        _fail("fmrl_ring_r_max", r_max, f"a radius above fmrl_ring_r_min={r_min}", sources)


def _heads(cfg, sources, model_keys):
    heads, d = cfg.get("n_heads"), cfg.get("hidden_size")
    if "n_heads" in model_keys and heads and d and d % heads:
        _fail("n_heads", heads, f"a divisor of hidden_size={d} (attention splits it into heads)", sources)


def _metrics(cfg, sources, _model_keys):
    from recbole.evaluator import metric_types

    metrics = cfg.get("metrics")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
    for name in metrics:
        if name.lower() not in metric_types:
            close = difflib.get_close_matches(name.lower(), sorted(metric_types), n=1)
            _fail("metrics", cfg["metrics"], f"RecBole metric names (no metric {name!r}"
                  + (f"; did you mean {close[0]}?)" if close else ")"), sources)
    valid = cfg.get("valid_metric")
    if not valid or not metrics:
        return
    name, _, k = valid.partition("@")
    if name.lower() not in [m.lower() for m in metrics]:
        _fail("valid_metric", valid, f"one of metrics {metrics}", sources)
    topk = cfg.get("topk")
    topk = [topk] if _is_int(topk) else list(topk or [])
    if k and (not k.isdigit() or int(k) not in topk):
        _fail("valid_metric", valid, f"a cut-off listed in topk {topk} (e.g. {name}@{topk[0] if topk else 10})", sources)


def _eval_args(cfg, sources, _model_keys):
    args = cfg.get("eval_args")
    if not isinstance(args, dict):
        return
    split = args.get("split")
    if split is not None:
        ok = isinstance(split, dict) and len(split) == 1 and (
            ("LS" in split and split["LS"] in LS_MODES)
            or ("RS" in split and isinstance(split["RS"], (list, tuple)) and 2 <= len(split["RS"]) <= 3
                and all(_is_number(r) and r >= 0 for r in split["RS"]) and sum(split["RS"]) > 0))
        if not ok:
            _fail("eval_args", args, f"split {{'LS': one of {', '.join(LS_MODES)}}} or {{'RS': [train, valid, test]}}",
                  sources)
    if args.get("order") not in (None, "RO", "TO"):
        _fail("eval_args", args, "order RO or TO", sources)
    if args.get("group_by") not in (None, "user", "none"):
        _fail("eval_args", args, "group_by user or none", sources)
    modes = args.get("mode")
    for mode in (modes.values() if isinstance(modes, dict) else [modes]):
        if mode is not None and not (mode in ("full", "labeled") or (
                isinstance(mode, str) and mode[:3] in ("uni", "pop") and mode[3:].isdigit() and int(mode[3:]) > 0)):
            _fail("eval_args", args, "mode full, labeled, uniN or popN (e.g. uni100)", sources)


def _sequential_order(cfg, sources, _model_keys):
    from recbole.utils import ModelType

    order = (cfg.get("eval_args") or {}).get("order")
    if cfg.get("MODEL_TYPE") == ModelType.SEQUENTIAL and order not in (None, "TO"):
        _fail("eval_args", cfg["eval_args"], f"order TO: {cfg.get('model')} is sequential (ordered by time)", sources)


def _fmlp(cfg, sources, _model_keys):
    if cfg.get("model") == "FMLPRec" and cfg.get("fmrl_train_objective") == "all_positions" \
            and cfg.get("fmlp_filter") != "causal":
        _fail("fmlp_filter", cfg.get("fmlp_filter"), "causal with fmrl_train_objective=all_positions (the global "
              "filter lets every position see the future)", sources)


def _ce_only(cfg, sources, _model_keys):
    if cfg.get("model") in ("FMRLRec", "LRURec", "FMLPRec", "SASRecAP") and cfg.get("loss_type") not in (None, "CE"):
        _fail("loss_type", cfg.get("loss_type"), f"CE ({cfg.get('model')} trains with the full-softmax cross-entropy)",
              sources)


RELATIONS = (_nested_sizes, _size_weights, _ring, _heads, _metrics, _eval_args, _sequential_order, _fmlp, _ce_only)


# ----------------------------------------------------------------------------- config files

def read_yaml(path, loader) -> dict:
    """A configuration file as a dict; a missing file, a parse error or a non-mapping is one line naming
    the file (and the line and column of a parse error)."""
    try:
        text_ = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the configuration file ({err})") from None
    try:
        loaded = yaml.load(text_, Loader=loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a configuration file holds 'key: value' lines, this one a {type(loaded).__name__}")
    return loaded

