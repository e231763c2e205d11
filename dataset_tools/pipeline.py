"""From ``SourceData`` to a RecBole dataset folder with features: the steps shared by all formats.

Order of operations (each step's removals are recorded in meta.json):
1. items without metadata / without any text field   -> dropped (or placeholder text, ``keep``)
2. items whose image is missing or unreadable        -> dropped (``drop``) or zero row (``zero``)
3. chronological order per user, ties broken by file order (never by item id: sorting ties by
   id leaks the id order into the sequence and inflates metrics)
4. repeated user-item pairs collapsed to the first one (optional)
5. iterative k-core
Outputs: ``<name>.inter``, ``<name>.item``, ``<name>.item_ids``, feature tables, and
``meta.json`` last. meta.json is the dataset's commit marker: it is removed before any output
changes and records the sha256 of every file, so an interrupted run leaves no folder that
``verify_dataset`` accepts.
"""
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from recbole_fmrl import atomic_io
from recbole_fmrl.data import features

from dataset_tools import atomic, text as text_mod
from dataset_tools.encoders import ImageEncoderOptions, TextEncoderOptions
from dataset_tools.features_stage import ensure_image_features, ensure_text_features
from dataset_tools.images import check_images
from dataset_tools.kcore import kcore_mask
from dataset_tools.report import Report
from dataset_tools.source import Item, SourceData

log = logging.getLogger(__name__)

META_VERSION = 1


@dataclass
class ConvertOptions:
    output: Path  # parent folder: the dataset goes to <output>/<name>/ (RecBole's data_path)
    name: str  # dataset name: <name>.inter, <name>.item, ... and RecBole's --dataset
    kcore: int = 5  # minimum interactions per user and per item, applied until stable; <=1 disables
    missing_text: str = "drop"  # items with no text field: "drop" before k-core, or "keep" with a placeholder
    missing_image: str = "drop"  # items whose image is missing/corrupt: "drop" before k-core, or "zero" row + mask
    text_fields: Optional[List[str]] = None  # template fields in order; None: the format's default
    dedup: bool = True  # collapse repeated user-item pairs to their first (chronological) occurrence
    text_encoder: Optional[TextEncoderOptions] = None  # None: write no text features
    image_encoder: Optional[ImageEncoderOptions] = None  # None: write no image features
    progress: bool = True  # tqdm progress bars

    def __post_init__(self):
        self.output = Path(self.output)
        if self.missing_text not in ("drop", "keep"):
            raise ValueError(f"missing_text must be 'drop' or 'keep', not {self.missing_text!r}")
        if self.missing_image not in ("drop", "zero"):
            raise ValueError(f"missing_image must be 'drop' or 'zero', not {self.missing_image!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"dataset name {self.name!r} must be a plain folder name")


class DatasetIncomplete(ValueError):
    """A dataset folder whose meta.json is missing or does not match its files."""


def dataset_dir(options: ConvertOptions) -> Path:
    return options.output / options.name


def _file_entry(path: Path) -> dict:
    return {"file": path.name, "sha256": features.sha256_file(path), "bytes": path.stat().st_size}


def verify_dataset(folder, name: str) -> dict:
    """The dataset's meta.json if every file it lists is present with the recorded sha256."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DatasetIncomplete(f"{meta_path}: missing (conversion never finished)")
    import json
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for entry in meta.get("files", {}).values():
        p = folder / entry["file"]
        if not p.is_file():
            raise DatasetIncomplete(f"{p}: listed in meta.json but missing")
        if features.sha256_file(p) != entry["sha256"]:
            raise DatasetIncomplete(f"{p}: content differs from meta.json (sha256)")
    for modality in meta.get("features", {}):
        features.read_modality(folder, name, modality)
    return meta


def _drop_meta(folder: Path):
    with contextlib.suppress(FileNotFoundError):
        (folder / "meta.json").unlink()


def convert(source: SourceData, options: ConvertOptions, report: Report) -> dict:
    """Filter, write and featurize ``source`` into ``<output>/<name>/``; returns meta.json's content."""
    started = time.time()
    timings: Dict[str, float] = {}
    steps: List[dict] = []
    fields = options.text_fields or source.default_fields
    n_rows_read = len(source.users)
    if n_rows_read == 0:
        raise ValueError(f"{source.kind}: no usable interaction was read from {[str(p) for p in source.input_files]}")

    # --- 1. items without metadata or text (only items someone interacted with matter)
    used: Dict[str, str] = {}
    for tok, origin in zip(source.items, source.origins):
        used.setdefault(tok, origin)
    info = dict(source.item_info)  # placeholders for items without metadata go here, not into source
    texts: Dict[str, str] = {}
    no_text = set()
    for tok, origin in used.items():
        item = info.get(tok)
        if item is None:
            report.problem("item without metadata", origin, None, f"item {tok}")
            info[tok] = item = Item(origin=origin)
            no_text.add(tok)
        else:
            item.findings.replay(report)
        txt = text_mod.item_text(item.fields, fields)
        if not txt and tok not in no_text:
            report.problem("item without text", item.origin, None, f"item {tok}: no value for {fields}")
            no_text.add(tok)
        texts[tok] = txt or text_mod.PLACEHOLDER
    candidates = [t for t in used if not (options.missing_text == "drop" and t in no_text)]
    steps.append({"step": f"items without text ({options.missing_text})", "items_seen": len(used),
                  "items_without_text": len(no_text), "items_removed": len(used) - len(candidates)})

    # --- 2. images
    image_ok: Dict[str, bool] = {}
    image_sha: Dict[str, str] = {}
    if source.has_images:
        t0 = time.time()
        check = check_images(candidates, info, report, progress=options.progress)
        image_ok, image_sha = check.ok, check.sha256
        timings["check_images_s"] = round(time.time() - t0, 2)
        bad = [t for t in candidates if not image_ok[t]]
        if options.missing_image == "drop":
            candidates = [t for t in candidates if image_ok[t]]
        steps.append({"step": f"items without usable image ({options.missing_image})",
                      "items_without_image": len(bad),
                      "items_removed": len(bad) if options.missing_image == "drop" else 0})
    keep_items = set(candidates)

    # --- 3. interactions of kept items, chronological per user, ties by file order
    rows = np.fromiter((i for i, tok in enumerate(source.items) if tok in keep_items), dtype=np.int64)
    user_codes: Dict[str, int] = {}
    for u in source.users:
        user_codes.setdefault(u, len(user_codes))
    item_codes = {tok: i for i, tok in enumerate(candidates)}
    u_idx = np.fromiter((user_codes[source.users[r]] for r in rows), dtype=np.int64, count=len(rows))
    i_idx = np.fromiter((item_codes[source.items[r]] for r in rows), dtype=np.int64, count=len(rows))
    t_val = np.fromiter((source.times[r] for r in rows), dtype=np.float64, count=len(rows))
    # lexsort: last key is primary. File order (rows) breaks ties; the item id never does.
    order = np.lexsort((rows, t_val, u_idx))
    rows, u_idx, i_idx, t_val = rows[order], u_idx[order], i_idx[order], t_val[order]
    steps.append({"step": "interactions of kept items", "interactions_read": n_rows_read,
                  "interactions_removed": n_rows_read - len(rows)})

    # --- 4. repeated user-item pairs
    if options.dedup and len(rows):
        pair = u_idx * (len(candidates) + 1) + i_idx
        _, first = np.unique(pair, return_index=True)
        keep = np.zeros(len(rows), dtype=bool)
        keep[first] = True
        n_dup = int((~keep).sum())
        for r in rows[~keep][: report.max_examples]:
            report.repair("repeated user-item pair (first kept)", source.origins[r], None,
                          f"user {source.users[r]} item {source.items[r]}")
        if n_dup > report.max_examples:
            entry = report.reasons["repeated user-item pair (first kept)"]
            entry.count += n_dup - report.max_examples
        rows, u_idx, i_idx, t_val = rows[keep], u_idx[keep], i_idx[keep], t_val[keep]
        steps.append({"step": "repeated user-item pairs (first kept)", "interactions_removed": n_dup})

    # --- 5. k-core
    t0 = time.time()
    keep, passes = kcore_mask(u_idx, i_idx, options.kcore, progress=options.progress)
    timings["kcore_s"] = round(time.time() - t0, 2)
    steps.append({"step": f"{options.kcore}-core", "passes": passes,
                  "interactions_removed": int((~keep).sum())})
    rows, u_idx, i_idx, t_val = rows[keep], u_idx[keep], i_idx[keep], t_val[keep]
    if len(rows) == 0:
        raise ValueError(f"no interaction survives the filters ({steps})")

    final_items = [candidates[i] for i in sorted(set(i_idx.tolist()))]
    # Items keep the source's order (P5 id order, u.item order, metadata file order).
    source_rank = {tok: r for r, tok in enumerate(info)}
    final_items.sort(key=lambda t: source_rank[t])
    n_users = len(np.unique(u_idx))
    n_items = len(final_items)
    n_images = sum(1 for t in final_items if image_ok.get(t)) if source.has_images else 0
    stats = {"users": n_users, "items": n_items, "images": n_images, "interactions": int(len(rows)),
             "density": len(rows) / (n_users * n_items),
             "density_percent": round(100.0 * len(rows) / (n_users * n_items), 4),
             "avg_interactions_per_user": round(len(rows) / n_users, 2)}

    # --- write atomic files (meta.json removed first if anything will change)
    folder = dataset_dir(options)
    folder.mkdir(parents=True, exist_ok=True)
    inter = atomic.inter_text([source.users[r] for r in rows], [source.items[r] for r in rows], t_val.tolist())
    item_fields = [f for f in fields if any(f in info[t].fields for t in final_items)]
    item = atomic.item_text_file(final_items, {t: info[t].fields for t in final_items}, item_fields)
    inter_path, item_path = folder / f"{options.name}.inter", folder / f"{options.name}.item"
    # The marker goes first and comes back last: whatever happens in between, a folder without
    # meta.json is never taken for a finished dataset. Unchanged files are not rewritten.
    _drop_meta(folder)
    t0 = time.time()
    atomic.write_if_changed(inter_path, inter)
    atomic.write_if_changed(item_path, item)
    ids_before = features.paths(folder, options.name)["item_ids"]
    atomic.ensure_item_ids(folder, options.name, final_items)
    timings["write_atomic_s"] = round(time.time() - t0, 2)

    # --- features
    feature_meta = {}
    if options.text_encoder is not None:
        t0 = time.time()
        feature_meta["text"] = ensure_text_features(
            folder, options.name, [texts[t] for t in final_items], options.text_encoder,
            extra={"fields": fields}, progress=options.progress)
        timings["text_features_s"] = round(time.time() - t0, 2)
    if options.image_encoder is not None:
        if not source.has_images:
            report.note("an image encoder was given but the source has no image folder: no image features")
        else:
            t0 = time.time()
            paths = [info[t].image if image_ok.get(t) else None for t in final_items]

            def on_error(row, err):
                report.problem("corrupt image", paths[row], None, f"item {final_items[row]}: {err} (zero row)")

            feature_meta["image"] = ensure_image_features(
                folder, options.name, paths, [image_sha.get(t) for t in final_items], options.image_encoder,
                extra={"missing_image_policy": options.missing_image}, progress=options.progress,
                on_error=on_error)
            timings["image_features_s"] = round(time.time() - t0, 2)

    # --- meta.json, last
    files = {"inter": _file_entry(inter_path), "item": _file_entry(item_path),
             "item_ids": _file_entry(ids_before)}
    fpaths = features.paths(folder, options.name)
    for modality in feature_meta:
        files[modality] = _file_entry(fpaths[modality])
        if feature_meta[modality].get("mask_file"):
            files[f"{modality}_mask"] = _file_entry(fpaths[f"{modality}_mask"])
    timings["total_s"] = round(time.time() - started, 2)
    meta = {
        "meta_version": META_VERSION,
        "name": options.name,
        "source": {"format": source.kind, "inputs": [_input_entry(p) for p in source.input_files],
                   **source.details},
        "options": _options_dict(options, fields),
        "filters": steps,
        "stats": stats,
        "report": report.to_dict(),
        "files": files,
        "features": {m: {k: v for k, v in e.items() if k != "skipped"} for m, e in feature_meta.items()},
        "features_reused": {m: bool(e.get("skipped")) for m, e in feature_meta.items()},
        "timings": timings,
    }
    atomic_io.write_json(folder / "meta.json", meta)
    return meta


def _input_entry(path: Path) -> dict:
    """Provenance of one input file; hashing even multi-GB dumps costs seconds, once per run."""
    path = Path(path)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": features.sha256_file(path)}


def _options_dict(options: ConvertOptions, fields) -> dict:
    d = asdict(options)
    d["output"] = str(options.output)
    d["text_fields"] = list(fields)
    d.pop("progress", None)
    return d
