"""The item catalog a trained model needs outside training: raw ids, titles, feature files.

``item_catalog(dataset)`` captures, at training time, what an export needs so that no RecBole
Dataset has to be rebuilt later: the raw item tokens in internal-id order (row 0 is padding),
the titles from the ``.item`` file when it has a title column, and where the frozen features
live with the sha256 of every file read. ``fused_features`` rebuilds the model's input feature
table from those files alone (same alignment and normalisation as ``FMRLDataset.item_features``).
"""
from pathlib import Path

import numpy as np
import torch

from recbole_fmrl.data import features as feature_files


def title_column(header):
    """Index of the title field in a RecBole ``.item`` header (``title`` or ``*_title``), or None."""
    names = [field.split(":", 1)[0].strip().lower() for field in header.split("\t")]
    for i, name in enumerate(names):
        if name == "title" or name.endswith("_title"):
            return i
    return None


def read_titles(item_file, tokens, id_field="item_id"):
    """Titles aligned to ``tokens`` (None where an item has none); None when the file has no titles."""
    item_file = Path(item_file)
    if not item_file.is_file():
        return None
    with open(item_file, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n")
        col = title_column(header)
        names = [field.split(":", 1)[0].strip() for field in header.split("\t")]
        if col is None or id_field not in names:
            return None
        key = names.index(id_field)
        titles = {}
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if len(fields) > max(col, key):
                titles[fields[key]] = fields[col]
    return [titles.get(t) for t in tokens]


def feature_digests(feature_dir, name, parts):
    """sha256 of every file the model's features come from, keyed by file name."""
    p = feature_files.paths(feature_dir, name)
    files = [p["item_ids"], p["json"]] + [p[m] for m in parts] + [p[f"{m}_mask"] for m in parts]
    return {f.name: feature_files.sha256_file(f) for f in files if f.exists()}


def item_catalog(dataset, parts):
    """Plain-value catalog of a FMRLDataset: dataset, item_tokens, item_titles, feature_dir, feature_sha256."""
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    item_file = Path(dataset.dataset_path) / f"{dataset.dataset_name}.item"
    feature_dir = getattr(dataset, "feature_dir", None)
    return {
        "dataset": dataset.dataset_name,
        "item_tokens": tokens,
        "item_titles": read_titles(item_file, tokens, dataset.iid_field),
        "feature_dir": str(Path(feature_dir).resolve()) if parts and feature_dir else None,
        "feature_sha256": feature_digests(feature_dir, dataset.dataset_name, parts) if parts and feature_dir else {},
    }


def fused_features(feature_dir, name, parts, norm, tokens, expected_sha256=None):
    """Concatenated normalised features [len(tokens), F] in ``tokens`` order (row 0 padding, zero).

    With ``expected_sha256`` (from ``item_catalog``), files that changed since training are refused.
    """
    if expected_sha256:
        found = feature_digests(feature_dir, name, parts)
        changed = sorted(f for f, digest in expected_sha256.items() if found.get(f) != digest)
        if changed:
            raise feature_files.FeatureFileError(
                f"{feature_dir}: feature files differ from the ones the model was trained on: {', '.join(changed)}")
    tables = []
    for modality in parts:
        table = feature_files.read_modality(feature_dir, name, modality)
        source = feature_files.paths(feature_dir, name)[modality]
        aligned, mask = feature_files.align(table, tokens, source=source)
        tables.append(torch.from_numpy(np.ascontiguousarray(feature_files.normalize(aligned, mask, norm))))
    return torch.cat(tables, dim=1)
