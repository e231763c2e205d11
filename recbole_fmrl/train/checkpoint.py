"""Checkpoints that reload with ``torch.load(weights_only=True)`` (torch >= 2.6's default).

RecBole pickles its whole Config object into checkpoints, which weights-only loading refuses.
The plugin stores the configuration as plain values instead, so its own files load safely
without allow-listing classes or monkeypatching torch.load.

Every checkpoint carries ``payload_sha256``, a sha256 over its whole content (every tensor's dtype,
shape and bytes, every plain value), checked on load: a flipped byte in a weight (which torch's
zip container does not notice) is refused with one line instead of being trained on. Checkpoints of
versions before the digest load as before.
"""
import enum
import hashlib
import math
import random
import struct
from pathlib import Path

import numpy as np
import torch

from recbole_fmrl import atomic_write
from recbole_fmrl.errors import InputError


def plain(value):
    """Recursively reduce a config value to types weights-only unpickling accepts (tensors stay tensors)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.ndim:
        return value
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
    write(path, state)


DIGEST_KEY = "payload_sha256"


def payload_sha256(state) -> str:
    """sha256 over everything in ``state`` but the digest itself, in a canonical order."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def _feed(digest, value):
    """Type-tagged, length-prefixed bytes of a value: equal content gives equal bytes, after a reload too."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(b"D" + struct.pack("<q", len(value)))
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<q", len(value)))
        for item in value:
            _feed(digest, item)
    else:  # None, bool, int, float, str (plain values only: see ``plain``)
        encoded = f"{type(value).__name__}:{value!r}".encode()
        digest.update(b"V" + struct.pack("<q", len(encoded)) + encoded)


def write(path, state):
    """Save ``state`` with its payload digest, atomically (temporary file, fsync, rename)."""
    state = {**state, DIGEST_KEY: payload_sha256(state)}
    with atomic_write.atomic_path(path) as tmp:
        torch.save(state, tmp)


def verify(state, path):
    """Refuse a checkpoint whose content does not match the digest it was saved with."""
    recorded = state.get(DIGEST_KEY) if isinstance(state, dict) else None
    if recorded is not None and recorded != payload_sha256(state):
        raise InputError(f"{path}: damaged checkpoint (its content does not match the sha256 it was saved with: "
                         f"a changed byte); use another checkpoint, or retrain")
    return state


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
    """A checkpoint's dict, its payload digest verified; every failure is one line naming the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as err:  # noqa: BLE001 - whatever torch trips over in a damaged file
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise InputError(f"{path}: cannot load as a recbole_fmrl checkpoint ({lines[0]})") from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise InputError(f"{path}: not a recbole_fmrl training checkpoint")
    return verify(state, path)


def attach(path, **fields):
    """Add plain-value fields to a saved checkpoint, atomically (e.g. the per-size results of its weights,
    which an export copies into each artifact's manifest)."""
    state = load(path)
    state.update({key: plain(value) for key, value in fields.items()})
    write(path, state)


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
