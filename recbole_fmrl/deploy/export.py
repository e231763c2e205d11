"""Training checkpoint -> one artifact folder per size (see ``artifact.py`` for the format).

Reads only the checkpoint (``torch.load(weights_only=True)``, its payload sha256 verified) and, for
feature-based models, the frozen feature files it names (refused when their sha256 changed since
training): no RecBole Dataset, no Config. The checkpoint's network (``model/network.py``) is rebuilt,
truncated to each size m and frozen: the artifact keeps the first-m slices of every nested weight
(stored pre-masked), the projected size-m item table, the raw item ids and titles. A checkpoint of
per-size selection (``fmrl_select_on: per_size``) gives size m the weights of its own best epoch.
"""
import copy
import json
import subprocess
from pathlib import Path

import torch

from recbole_fmrl.data.catalog import fused_features
from recbole_fmrl.data.modality import modality_parts
from recbole_fmrl.deploy import artifact
from recbole_fmrl.model.fusion import item_encoder
from recbole_fmrl.model.network import FMRLNet, ModelArgs, network_state_dict
from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.size_best import slices_of


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


def checkpoint_network(state, feature_dir=None):
    """The trained network of a checkpoint (eval mode, float32), its item module rebuilt as in training:
    projected features (``text``, ``image``), a learned ID table (``id``), or their sum (hybrids such as ``text_id``)."""
    info = state["export"]
    args = ModelArgs.from_dict(info["model_args"])
    features = None
    if modality_parts(args.modality):
        features = fused_features(feature_dir or info["feature_dir"], info["dataset"], modality_parts(args.modality),
                                  args.feature_norm, info["item_tokens"], expected_sha256=info["feature_sha256"])
    net = FMRLNet(args, item_encoder(args.modality, args.n_items, args.hidden_size, features))
    net.load_state_dict(network_state_dict(state["state_dict"]))
    return net.float().eval()


def size_artifact(net, size):
    """(model_args, pre-masked state_dict, nested parameter count) of the size-``size`` network, its item
    table computed once: what ``model.pt`` holds."""
    small = net.truncate(size)
    frozen = small.frozen()
    weights = {k: v.detach().float().contiguous() for k, v in frozen.premasked_state_dict().items()}
    return frozen.args.to_dict(), weights, small.nested_parameter_count()


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
    net = checkpoint_network(state, feature_dir)
    source = {"path": str(Path(checkpoint_path).resolve()), "sha256": artifact.sha256_file(checkpoint_path),
              "epoch": state.get("epoch")}
    written, slices = {}, slices_of(state)
    for size in sorted(set(int(m) for m in sizes)):
        size_net, size_source = net, source
        if size in slices and slices[size][0] != state.get("epoch"):  # per-size selection: its own best epoch
            size_net, size_source = copy.deepcopy(net).paste_slice(slices[size][1]), {**source, "epoch": slices[size][0]}
        written[size] = write_size(state, size_net, size, Path(output_dir) / f"size-{size}", size_source, metrics, onnx,
                                   force)
        if log:
            log(f"exported size {size} -> {written[size]}")
    return written


def write_size(state, net, size, folder, source, metrics, onnx, force=False):
    info = state["export"]
    args, weights, count = size_artifact(net, size)
    with artifact.staging(folder, force) as tmp:
        torch.save({"model_args": args, "state_dict": weights}, tmp / artifact.WEIGHTS)
        items = {"item_ids": info["item_tokens"], "titles": info.get("item_titles")}
        (tmp / artifact.ITEMS).write_text(json.dumps(items, ensure_ascii=False) + "\n", encoding="utf-8")
        if onnx:
            from recbole_fmrl.deploy.onnx_export import write_onnx

            write_onnx(args, weights, tmp / artifact.ONNX)
        artifact.write_manifest(tmp, {
            "size": size, "sizes": args["sizes"], "model_args": args, "dataset": info["dataset"],
            "parameters": count, "item_table_values": int(weights[artifact.ITEM_TABLE].numel()),
            "stored_values": int(sum(v.numel() for v in weights.values())),
            "metrics": size_metrics(state, metrics, size), "git_commit": git_commit(), "checkpoint": source})
    return folder
