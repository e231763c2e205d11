"""Checkpoints that reload with ``torch.load(weights_only=True)`` (torch >= 2.6's default).

RecBole pickles its whole Config object into checkpoints, which weights-only loading refuses.
The plugin stores the configuration as plain values instead, so its own files load safely
without allow-listing classes or monkeypatching torch.load.
"""
import enum
import math

import torch

from recbole_fmrl import atomic_io


def plain(value):
    """Recursively reduce a config value to types weights-only unpickling accepts."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return plain(value.item())
    return str(value)


def save(path, *, config, state_dict, epoch, cur_step, best_valid_score, optimizer=None, other_parameter=None):
    state = {
        "config": plain(dict(config.final_config_dict)),
        "epoch": int(epoch),
        "cur_step": int(cur_step),
        "best_valid_score": float(best_valid_score),
        "state_dict": state_dict,
        "other_parameter": other_parameter,
        "optimizer": optimizer,
    }
    with atomic_io.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise RuntimeError(f"{path}: cannot load as a recbole_fmrl checkpoint ({err})") from err
