"""The item feature file format shared by ``dataset_tools`` (writer) and the model (reader).

In a dataset folder ``<dir>`` for dataset ``<name>``:

- ``<name>.item_ids``       one raw item token per line; line r describes row r of every table;
- ``<name>.<modality>.npy`` float32 ``[rows, dim]``, modality ``text`` or ``image``;
- ``<name>.<modality>.mask.npy`` optional bool ``[rows]``: False where the row is a zero
  placeholder (an item whose image was missing under the ``zero`` policy);
- ``<name>.features.json``  per modality: file, encoder, dim, normalized, rows and the sha256 of
  the ``.item_ids`` file the rows were built for, so features of another item set are refused.

The json is written last and is the commit marker: a table it does not describe does not exist.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from recbole_fmrl import atomic_write
from recbole_fmrl.errors import InputError

FORMAT_VERSION = 1
MODALITIES = ("text", "image")


class FeatureFileError(InputError):
    """A feature file is missing, malformed or built for another item set."""


@dataclass
class FeatureTable:
    modality: str  # "text" or "image"
    item_ids: list  # raw item tokens, row order
    array: np.ndarray  # float32 [rows, dim]
    mask: Optional[np.ndarray]  # bool [rows] or None when every row is real
    meta: dict  # the modality's entry of <name>.features.json


def paths(folder, name: str) -> dict:
    folder = Path(folder)
    return {
        "item_ids": folder / f"{name}.item_ids",
        "json": folder / f"{name}.features.json",
        **{m: folder / f"{name}.{m}.npy" for m in MODALITIES},
        **{f"{m}_mask": folder / f"{name}.{m}.mask.npy" for m in MODALITIES},
    }


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_item_ids(folder, name: str, tokens) -> str:
    """Write ``<name>.item_ids`` atomically and return its sha256."""
    tokens = [str(t) for t in tokens]
    bad = [t for t in tokens if not t or "\n" in t or t != t.strip()]
    if bad:
        raise FeatureFileError(f"item tokens must be non-empty single-line strings: {bad[:3]}")
    if len(set(tokens)) != len(tokens):
        raise FeatureFileError("item tokens must be unique")
    target = paths(folder, name)["item_ids"]
    atomic_write.write_text(target, "".join(t + "\n" for t in tokens))
    return sha256_file(target)


def read_manifest(folder, name: str) -> dict:
    p = paths(folder, name)["json"]
    if not p.exists():
        return {"format_version": FORMAT_VERSION, "modalities": {}}
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FeatureFileError(f"{p}: not valid JSON ({err})") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FeatureFileError(f"{p}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def write_modality(folder, name, modality, array, encoder, normalized, mask=None, extra=None):
    """Write one modality's table (and mask) for the current ``.item_ids``, then commit the json."""
    if modality not in MODALITIES:
        raise FeatureFileError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    p = paths(folder, name)
    ids_path = p["item_ids"]
    if not ids_path.exists():
        raise FeatureFileError(f"{ids_path}: write the item ids before the features")
    n_rows = sum(1 for _ in open(ids_path, encoding="utf-8"))
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != n_rows:
        raise FeatureFileError(f"{modality} table has shape {array.shape}; {ids_path} has {n_rows} rows")
    if not np.isfinite(array).all():
        raise FeatureFileError(f"{modality} table contains NaN or inf")
    atomic_write.write_npy(p[modality], array)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (n_rows,):
            raise FeatureFileError(f"{modality} mask has shape {mask.shape}, expected ({n_rows},)")
        atomic_write.write_npy(p[f"{modality}_mask"], mask)
    manifest = read_manifest(folder, name)
    manifest["modalities"][modality] = {
        "file": p[modality].name,
        "mask_file": p[f"{modality}_mask"].name if mask is not None else None,
        "encoder": str(encoder),
        "dim": int(array.shape[1]),
        "normalized": bool(normalized),
        "rows": int(n_rows),
        "item_ids_sha256": sha256_file(ids_path),
        **(extra or {}),
    }
    atomic_write.write_json(p["json"], manifest)
    return manifest["modalities"][modality]


def available_modalities(folder, name: str) -> list:
    """Modalities the manifest describes (without validating them)."""
    try:
        return sorted(read_manifest(folder, name)["modalities"])
    except FeatureFileError:
        return []


def read_modality(folder, name: str, modality: str) -> FeatureTable:
    """Load and validate one modality; every problem is a FeatureFileError naming the file."""
    p = paths(folder, name)
    if not p["json"].exists():
        raise FeatureFileError(f"{p['json']}: feature manifest not found (build features with dataset_tools)")
    manifest = read_manifest(folder, name)
    meta = manifest["modalities"].get(modality)
    if meta is None:
        raise FeatureFileError(
            f"{p['json']}: no '{modality}' features (has: {sorted(manifest['modalities']) or 'none'})")
    ids_path = p["item_ids"]
    if not ids_path.exists():
        raise FeatureFileError(f"{ids_path}: item id file not found")
    digest = sha256_file(ids_path)
    if digest != meta["item_ids_sha256"]:
        raise FeatureFileError(
            f"{p['json']}: '{modality}' features were built for another item list "
            f"(sha256 {meta['item_ids_sha256'][:12]}..., but {ids_path.name} has {digest[:12]}...)")
    item_ids = ids_path.read_text(encoding="utf-8").splitlines()
    table_path = Path(folder) / meta["file"]
    if not table_path.exists():
        raise FeatureFileError(f"{table_path}: feature table not found")
    try:
        array = np.load(table_path, mmap_mode="r")
    except ValueError as err:
        raise FeatureFileError(f"{table_path}: not a valid .npy file ({err})") from err
    if array.ndim != 2 or array.shape != (len(item_ids), meta["dim"]) or array.shape[0] != meta["rows"]:
        raise FeatureFileError(
            f"{table_path}: shape {array.shape}, but {ids_path.name} has {len(item_ids)} rows "
            f"and the manifest says rows={meta['rows']}, dim={meta['dim']}")
    mask = None
    if meta.get("mask_file"):
        mask_path = Path(folder) / meta["mask_file"]
        if not mask_path.exists():
            raise FeatureFileError(f"{mask_path}: availability mask not found")
        mask = np.load(mask_path)
        if mask.shape != (len(item_ids),):
            raise FeatureFileError(f"{mask_path}: shape {mask.shape}, expected ({len(item_ids)},)")
    return FeatureTable(modality, item_ids, np.asarray(array, dtype=np.float32), mask, meta)


NORMS = ("center", "whiten", "standardize", "none")
WHITEN_SHRINK = 1e-2  # ridge added to the covariance eigenvalues, as a fraction of their mean


def normalize(array, mask, norm):
    """Per-table feature normalisation before the fusion projection.

    Pretrained sentence embeddings are anisotropic: every item shares one large common direction,
    and what tells items apart is a small remainder. ``center`` removes the mean over the rows that
    hold real features (``mask``) and rescales the table so that its rows have unit mean norm (the
    scale of the encoder's L2-normalised output). ``standardize``: every dimension to zero mean
    and unit variance (rows of norm ~sqrt(dim)). ``whiten``: centred, rotated onto the principal
    axes and each axis scaled to equal variance (with a small ridge so near-empty axes are not blown
    up), then rows rescaled to unit mean norm: the projection's gradient is then equally conditioned
    in every direction. ``none``: the features as stored (the paper).
    Placeholder rows stay zero; only item content is used (no interactions), so no split leaks.
    """
    if norm not in NORMS:
        raise ValueError(f"fmrl_feature_norm: unknown value {norm!r}; expected one of {NORMS}")
    if norm == "none" or not mask.any():
        return array
    real = array[mask].astype(np.float64)
    centred = real - real.mean(axis=0)
    if norm == "whiten":
        vals, vecs = np.linalg.eigh(centred.T @ centred / len(centred))
        centred = centred @ (vecs / np.sqrt(np.clip(vals, 0, None) + WHITEN_SHRINK * max(vals.mean(), 1e-12)))
    if norm == "standardize":
        std = centred.std(axis=0)
        scale = np.where(std > 1e-8, std, 1.0)  # constant dims: centred only
    else:
        norm_mean = np.linalg.norm(centred, axis=1).mean()
        scale = norm_mean if norm_mean > 1e-12 else 1.0
    out = np.zeros_like(array, dtype=np.float32)
    out[mask] = centred / scale
    return out


def align(table, id2token, source="features"):
    """Reorder rows to RecBole's internal ids: row i <- token id2token[i]; row 0 (padding) is zero.

    Returns (features [n_ids, dim], mask [n_ids] bool). An internal item absent from the table is
    an error naming the source file: silently zero features would train a broken model.
    """
    row_of = {tok: r for r, tok in enumerate(table.item_ids)}
    tokens = list(id2token)[1:]
    missing = [t for t in tokens if t not in row_of]
    if missing:
        raise FeatureFileError(
            f"{source}: {len(missing)} of {len(tokens)} dataset items have no '{table.modality}' row "
            f"(first: {missing[:5]})")
    rows = np.fromiter((row_of[t] for t in tokens), dtype=np.int64, count=len(tokens))
    out = np.zeros((len(tokens) + 1, table.array.shape[1]), dtype=np.float32)
    out[1:] = table.array[rows]
    mask = np.zeros(len(tokens) + 1, dtype=bool)
    mask[1:] = True if table.mask is None else table.mask[rows]
    return out, mask


def cache_folder(cache_dir, name: str) -> Path:
    """Where features built for a dataset that ships none are cached (the dataset folder stays untouched)."""
    return Path(cache_dir) / "features" / name


def locate(config) -> Path:
    """A run's feature folder: ``fmrl_feature_path``, else the dataset folder when it holds features,
    else the plugin's cache (where first-use feature building writes)."""
    if config["fmrl_feature_path"]:
        return Path(config["fmrl_feature_path"])
    name, data_dir = config["dataset"], Path(config["data_path"])  # RecBole's data_path: the dataset's folder
    if available_modalities(data_dir, name):
        return data_dir
    cached = cache_folder(config["fmrl_cache_dir"], name)
    return cached if available_modalities(cached, name) else data_dir
