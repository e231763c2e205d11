"""Checkpoints that reload with ``torch.load(weights_only=True)`` (torch >= 2.6's default).

RecBole pickles its whole Config object into checkpoints, which weights-only loading refuses.
The plugin stores the configuration as plain values instead, so its own files load safely
without allow-listing classes or monkeypatching torch.load.
"""
import enum
import math
import random
from pathlib import Path

import numpy as np
import torch

from recbole_fmrl import atomic_write
from recbole_fmrl.errors import InputError


def plain(value):
    """Recursively reduce a config value to types weights-only unpickling accepts."""
    if value is None:
        return None
    for kind in (bool, int, str):  # numpy subclasses (np.str_, ...) -> the builtin
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, float):  # np.float64 is a float: stored as the builtin
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return plain(value.item())
    return str(value)


def save(path, *, config, state_dict, epoch, cur_step, best_valid_score, optimizer=None, other_parameter=None,
         export=None, **extra):
    """``export``: plain values an export needs without a Dataset (model_args, item catalog; issue 12);
    ``extra``: more entries (a last checkpoint's ``resume`` state), tensors and plain values only."""
    state = {
        "config": plain(dict(config.final_config_dict)),
        "epoch": int(epoch),
        "cur_step": int(cur_step),
        "best_valid_score": float(best_valid_score),
        "state_dict": state_dict,
        "other_parameter": other_parameter,
        "optimizer": optimizer,
        "export": plain(export) if export is not None else None,
        **extra,
    }
    with atomic_write.atomic_path(path) as tmp:
        torch.save(state, tmp)


LAST_SUFFIX = ".last.pth"


def last_path(best_file) -> Path:
    """The last checkpoint beside a best one: ``FMRLRec-<time>.pth`` -> ``FMRLRec-<time>.last.pth``."""
    best_file = Path(best_file)
    return best_file.with_name(best_file.name[: -len(".pth")] + LAST_SUFFIX if best_file.name.endswith(".pth")
                               else best_file.name + LAST_SUFFIX)


def best_path(last_file) -> Path:
    last_file = Path(last_file)
    return last_file.with_name(last_file.name[: -len(LAST_SUFFIX)] + ".pth")


def find_last(where, model=None) -> Path:
    """The last checkpoint to resume from: ``where`` itself (a ``*.last.pth``), the one beside a best
    checkpoint, or the newest ``<model>-*.last.pth`` in a run folder (its ``saved/``) or checkpoint folder."""
    where = Path(where).expanduser()
    if where.is_file():
        candidate = where if where.name.endswith(LAST_SUFFIX) else last_path(where)
        if candidate.is_file():
            return candidate
        raise InputError(f"{where}: not a last checkpoint and no {candidate.name} beside it (only runs of this "
                         f"version write one per epoch)")
    if not where.is_dir():
        raise InputError(f"--resume {where}: no such run folder or checkpoint")
    pattern = f"{model}-*{LAST_SUFFIX}" if model else "*" + LAST_SUFFIX
    found = sorted((p for d in (where, where / "saved") if d.is_dir() for p in d.glob(pattern)),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"--resume {where}: no {pattern} checkpoint in it or in {where / 'saved'}")
    return found[-1]


def load(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as err:
        raise InputError(f"{path}: cannot load as a recbole_fmrl checkpoint ({str(err).strip().splitlines()[0]})") from err


def attach(path, **fields):
    """Add plain-value fields to a saved checkpoint, atomically (e.g. the per-size results of its weights,
    which an export copies into each artifact's manifest)."""
    state = load(path)
    state.update({key: plain(value) for key, value in fields.items()})
    with atomic_write.atomic_path(path) as tmp:
        torch.save(state, tmp)


def rng_state(train_data=None):
    """Every random generator a training epoch draws from, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    generator = getattr(train_data, "generator", None)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state() if generator is not None else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "random": [version, torch.tensor(mt, dtype=torch.int64), gauss],
    }


def set_rng_state(state, train_data=None):
    """Restore what ``rng_state`` captured (the CUDA part only on a machine with as many GPUs)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(train_data, "generator", None)
    if state["loader"] is not None and generator is not None:
        generator.set_state(state["loader"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, mt, gauss = state["random"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
