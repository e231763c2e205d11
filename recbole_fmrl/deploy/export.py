"""Training checkpoint -> one artifact folder per size (see ``artifact.py`` for the format).

Reads only the checkpoint (``torch.load(weights_only=True)``, its payload sha256 verified) and, for
feature-based models, the frozen feature files it names (refused when their sha256 changed since training): no RecBole
Dataset, no Config. Each size-m artifact keeps the first-m slices of every nested weight (stored
pre-masked), the projected size-m item table, the raw item ids and titles.
"""
import json
import subprocess
from pathlib import Path

import torch
from torch.nn import functional as F

from recbole_fmrl.deploy import artifact
from recbole_fmrl.deploy.runtime import ServingNet
from recbole_fmrl.model.nested import staircase_mask
from recbole_fmrl.train import checkpoint

SERVING_KEYS = ("n_items", "n_layers", "ffn_ratio", "state_ratio", "layer_norm_eps", "max_seq_length")
PROVENANCE_KEYS = ("modality", "feature_norm", "hidden_size")


def resolve_checkpoint(path):
    """``path`` itself, or for a folder (``runs/saved``) its newest best checkpoint (not ``*.last.pth``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted((p for p in path.glob("*.pth") if not p.name.endswith(".last.pth")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise artifact.ArtifactError(f"{path}: no checkpoint (*.pth) in this folder")
    return found[-1]


def load_checkpoint(path):
    """The checkpoint's plain-value dict; it must carry the ``export`` fields (model_args, item catalog)."""
    path = resolve_checkpoint(path)
    state = checkpoint.load(path)  # one line for a missing, damaged or foreign file
    if not state.get("export"):
        raise artifact.ArtifactError(f"{path}: the checkpoint has no export fields (saved by an older "
                                     f"recbole_fmrl or a model without model_args); retrain to export it")
    return state


def full_item_table(state, feature_dir=None):
    """The largest size's item table [N+1, d], exactly as the trained model computes it: projected
    features (``text``, ``image``), a learned ID table (``id``), or their sum (hybrids such as ``text_id``)."""
    info, weights = state["export"], state["state_dict"]
    args = info["model_args"]
    if "item_encoder.embedding.weight" in weights:  # ID items only
        return weights["item_encoder.embedding.weight"].float()
    from recbole_fmrl.data.catalog import fused_features
    from recbole_fmrl.data.modality import modality_parts

    folder = feature_dir or info["feature_dir"]
    features = fused_features(folder, info["dataset"], modality_parts(args["modality"]), args["feature_norm"],
                              info["item_tokens"], expected_sha256=info["feature_sha256"])
    table = F.linear(features, weights["item_encoder.proj.weight"].float(), weights["item_encoder.proj.bias"].float())
    ids = weights.get("item_encoder.ids.embedding.weight")
    return table if ids is None else table + ids.float()


def encoder_parameters(weights, size):
    """Trainable parameters of the size-m item encoder: projection rows [:m] and ID-table columns [:m]."""
    count = 0
    for key, value in weights.items():
        if key.startswith("item_encoder.") and key.endswith("proj.weight"):
            count += size * value.shape[1]
        elif key.startswith("item_encoder.") and key.endswith("proj.bias"):
            count += size
        elif key.startswith("item_encoder.") and key.endswith("embedding.weight"):
            count += value.shape[0] * size
    return count


def nested_boundaries(key, args):
    """(in_sizes, out_sizes) of a nested linear's weight ``key``, or None for other tensors."""
    sizes, r, s = args["sizes"], args["ffn_ratio"], args["state_ratio"]
    wide, states = [r * m for m in sizes], [s * m for m in sizes]
    table = {".gate.weight": (sizes, wide), ".w1.weight": (sizes, wide), ".w2.weight": (wide, sizes),
             ".lru.in_re.weight": (sizes, states), ".lru.in_im.weight": (sizes, states),
             ".lru.out_re.weight": (states, sizes), ".lru.out_im.weight": (states, sizes)}
    return next((v for suffix, v in table.items() if key.endswith(suffix)), None)


def size_weights(state, table, size):
    """(serving model_args, state_dict, nested parameter count) of the size-``size`` model."""
    full = state["export"]["model_args"]
    sizes = full["sizes"][: full["sizes"].index(size) + 1]
    args = {"sizes": sizes, **{k: full[k] for k in SERVING_KEYS}, **{k: full[k] for k in PROVENANCE_KEYS}}
    target = ServingNet(args).state_dict()
    weights, count = {}, 0
    for key, like in target.items():
        source = table if key == "item_table" else state["state_dict"][key]
        value = source[tuple(slice(0, n) for n in like.shape)].float().clone()
        bounds = nested_boundaries(key, args)
        if bounds is not None:
            mask = staircase_mask(*bounds)
            value = value * mask
            count += int(mask.sum())
        elif key != "item_table":
            count += value.numel()
        weights[key] = value.contiguous()
    return args, weights, count + encoder_parameters(state["state_dict"], size)


def git_commit():
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def size_metrics(state, metrics, size):
    """{"valid": {...}, "test": {...}} of one size from ``metrics`` or the checkpoint, or None."""
    table = metrics if metrics is not None else state.get("size_results")
    if not table:
        return None
    row = table.get(size, table.get(str(size)))
    return None if row is None else {k: row[k] for k in ("valid", "test") if k in row}


def export_sizes(checkpoint_path, sizes, output_dir, *, feature_dir=None, metrics=None, onnx=False, log=None,
                 force=False):
    """Write ``<output_dir>/size-<m>/`` for every m in ``sizes``; returns {m: folder}.

    Every target is checked before any work: missing, or an artifact to replace with ``force``
    (``artifact.check_target``); anything else is refused naming the path."""
    checkpoint_path = resolve_checkpoint(checkpoint_path)
    state = load_checkpoint(checkpoint_path)
    info = state["export"]
    nested = info["model_args"]["sizes"]
    bad = [m for m in sizes if m not in nested]
    if bad or not sizes:
        raise artifact.ArtifactError(f"sizes {bad or sizes}: the checkpoint's nested sizes are {nested}")
    for size in sizes:
        artifact.check_target(Path(output_dir) / f"size-{size}", force)
    table = full_item_table(state, feature_dir)
    source = {"path": str(Path(checkpoint_path).resolve()), "sha256": artifact.sha256_file(checkpoint_path),
              "epoch": state.get("epoch")}
    written = {}
    for size in sorted(set(int(m) for m in sizes)):
        written[size] = write_size(state, table, size, Path(output_dir) / f"size-{size}", source, metrics, onnx, force)
        if log:
            log(f"exported size {size} -> {written[size]}")
    return written


def write_size(state, table, size, folder, source, metrics, onnx, force=False):
    info = state["export"]
    args, weights, count = size_weights(state, table, size)
    with artifact.staging(folder, force) as tmp:
        torch.save({"model_args": args, "state_dict": weights}, tmp / artifact.WEIGHTS)
        items = {"item_ids": info["item_tokens"], "titles": info.get("item_titles")}
        (tmp / artifact.ITEMS).write_text(json.dumps(items, ensure_ascii=False) + "\n", encoding="utf-8")
        if onnx:
            from recbole_fmrl.deploy.onnx_export import write_onnx

            write_onnx(args, weights, tmp / artifact.ONNX)
        artifact.write_manifest(tmp, {
            "size": size, "sizes": args["sizes"], "model_args": args, "dataset": info["dataset"],
            "parameters": count, "item_table_values": int(weights["item_table"].numel()),
            "stored_values": int(sum(v.numel() for v in weights.values())),
            "metrics": size_metrics(state, metrics, size), "git_commit": git_commit(), "checkpoint": source})
    return folder
