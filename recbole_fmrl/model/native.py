"""The compiled CPU kernel of the Matryoshka loss (``matryoshka_softmax.c``): built on first use.

PyTorch on the CPU has no fused op for "exp, row sums, and a weighted reverse cumulative sum over
K sizes"; composed from single ops it streams the ``[K, rows, N]`` logit buffer from memory about
ten times. The C kernel does that work per row while the row sits in cache (see the source). It is
compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into the plugin's cache
(``$RECBOLE_FMRL_CACHE``, else ``~/.cache/recbole_fmrl``; ``kernels/``), keyed by the source,
flags, compiler and CPU, written atomically, and loaded with ctypes. Without a compiler the loss
falls back to the pure PyTorch path (same results, slower) after one warning.

``FMRL_NATIVE=0`` disables the kernel; ``FMRL_NATIVE=require`` makes a failed build an error
(CI sets it, so a broken build cannot hide behind the fallback).
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from recbole_fmrl.paths import default_cache_dir

SOURCE = Path(__file__).with_name("matryoshka_softmax.c")
# -ffinite-math-only and re-association let gcc vectorise the max/sum reductions; not -ffast-math,
# whose start-up object would switch the whole process to flush-to-zero when the library loads.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-ffinite-math-only", "-fPIC", "-shared", "-pthread"]
MAX_SIZES = 64  # MAX_K in the source

_lock = threading.Lock()
_state = {"lib": None, "error": None, "warned": False, "cache_dir": None}


def set_cache_dir(path):
    """Build and look up kernels under ``<path>/kernels`` (the run's ``fmrl_cache_dir``)."""
    _state["cache_dir"] = Path(path) if path else None


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C compiler found (set $CC or install gcc)")


def _cpu_signature():
    """Model and feature flags: -march=native code is only valid on the CPU it was built for."""
    keep = []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "flags")):
                keep.append(line.strip())
            if len(keep) == 2:
                break
    except OSError:
        pass
    return platform.machine() + "|" + "|".join(keep)


def build():
    """Compile the kernel if its cached library is missing; return the library path."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = (_state["cache_dir"] or default_cache_dir()) / "kernels" / f"matryoshka_softmax-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} with {cc} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)  # atomic: concurrent builders race to the same content
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _mode():
    return os.environ.get("FMRL_NATIVE", "1").strip().lower()


def _disabled():
    return _mode() in ("0", "false", "no", "off")


def load():
    """The ctypes library, or None (disabled, or the build failed: the reason is ``error()``)."""
    mode = _mode()
    if _disabled():
        return None
    with _lock:
        if _state["lib"] is None and _state["error"] is None:
            try:
                lib = ctypes.CDLL(str(build()))
                fn = lib.fmrl_matryoshka_softmax
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
                fn.restype = ctypes.c_int
                _state["lib"] = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                _state["error"] = str(err)
        if _state["error"] is not None:
            if mode == "require":
                raise RuntimeError(f"FMRL_NATIVE=require but the loss kernel is unavailable: {_state['error']}")
            if not _state["warned"]:
                _state["warned"] = True
                warnings.warn(f"recbole_fmrl: compiled loss kernel unavailable, using the PyTorch path "
                              f"(slower): {_state['error']}", stacklevel=2)
    return _state["lib"]


def error():
    """Why ``load()`` returns None (None while it has not failed)."""
    if _disabled():
        return f"disabled by FMRL_NATIVE={os.environ['FMRL_NATIVE']}"
    return _state["error"]


def usable(tensor, num_sizes):
    """Whether the kernel can serve a loss on ``tensor``'s device and dtype."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and num_sizes <= MAX_SIZES
            and load() is not None)


def matryoshka_softmax(buf, weights, lse, need_grad, threads=None):
    """In place on ``buf`` [K, rows, N] (block partial logits, fp32, contiguous): per size k the
    row softmax normaliser ``lse[k]`` of the cumulative logits and, with ``need_grad``, buf[j] <-
    sum_{k >= j} weights_k * softmax_k. ``weights`` [K] and ``lse`` [K, rows] fp32 contiguous."""
    K, rows, n = buf.shape
    for name, t, shape in (("buf", buf, (K, rows, n)), ("weights", weights, (K,)), ("lse", lse, (K, rows))):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
            raise ValueError(f"{name}: need a contiguous fp32 CPU tensor of shape {shape}, got "
                             f"{t.dtype} {t.device} {tuple(t.shape)} contiguous={t.is_contiguous()}")
    lib = load()
    if lib is None:
        raise RuntimeError(f"the compiled loss kernel is unavailable: {error()}")
    rc = lib.fmrl_matryoshka_softmax(buf.data_ptr(), K, rows, n, weights.data_ptr(), lse.data_ptr(),
                                     int(bool(need_grad)), int(threads or torch.get_num_threads()))
    if rc != 0:
        raise RuntimeError(f"fmrl_matryoshka_softmax failed with code {rc} "
                           f"({'K out of range' if rc == 1 else 'out of memory'})")
