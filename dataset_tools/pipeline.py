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
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from dataset_tools import recbole_files
from dataset_tools import text as text_mod
from dataset_tools.encode_features import ensure_image_features, ensure_text_features
from dataset_tools.encoders import ImageEncoderOptions, TextEncoderOptions
from dataset_tools.images import check_images
from dataset_tools.kcore import kcore_mask
from dataset_tools.lock import output_lock
from dataset_tools.report import ConvertError, Report
from dataset_tools.source import Item, SourceData
from recbole_fmrl import atomic_write
from recbole_fmrl.data import features

log = logging.getLogger(__name__)

META_VERSION = 1


@dataclass
class ConvertOptions:
    output: Path  # parent folder: the dataset goes to <output>/<name>/ (RecBole's data_path)
    name: str  # dataset name: <name>.inter, <name>.item, ... and RecBole's --dataset
    kcore: int = 5  # minimum interactions per user and per item, applied until stable; <=1 disables
    # items with no text field: "drop" before k-core, or "keep" with a placeholder; None: "drop" when
    # a text encoder is given, else "keep" (no text asked for: missing text loses nothing)
    missing_text: Optional[str] = None
    missing_image: str = "drop"  # items whose image is missing/corrupt: "drop" before k-core, or "zero" row + mask
    text_fields: Optional[List[str]] = None  # template fields in order; None: the format's default
    dedup: bool = True  # collapse repeated user-item pairs to their first (chronological) occurrence
    text_encoder: Optional[TextEncoderOptions] = None  # None: write no text features
    image_encoder: Optional[ImageEncoderOptions] = None  # None: write no image features
    progress: bool = True  # tqdm progress bars

    def __post_init__(self):
        self.output = Path(self.output)
        if self.missing_text is None:
            self.missing_text = "drop" if self.text_encoder is not None else "keep"
        if self.missing_text not in ("drop", "keep"):
            raise ConvertError(f"missing_text must be 'drop' or 'keep', not {self.missing_text!r}")
        if self.missing_image not in ("drop", "zero"):
            raise ConvertError(f"missing_image must be 'drop' or 'zero', not {self.missing_image!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConvertError(f"dataset name {self.name!r} must be a plain folder name")
        if isinstance(self.kcore, bool) or not isinstance(self.kcore, int) or self.kcore < 0:
            raise ConvertError(f"--kcore {self.kcore}: need an integer >= 0 (0 or 1 keeps every interaction)")


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


@dataclass
class Interactions:
    """Kept interactions as parallel arrays: source row, user code, item code (into ``items``), time."""
    rows: np.ndarray
    users: np.ndarray
    items: np.ndarray
    times: np.ndarray

    def take(self, keep: np.ndarray) -> "Interactions":
        return Interactions(self.rows[keep], self.users[keep], self.items[keep], self.times[keep])


@dataclass
class Selection:
    """Items that passed the text and image checks, in first-interaction order, with their facts."""
    info: Dict[str, Item]  # item token -> record (placeholders for items without metadata)
    texts: Dict[str, str]  # item token -> template text (placeholder when none)
    candidates: List[str]  # tokens kept so far
    image_ok: Dict[str, bool] = field(default_factory=dict)
    image_sha: Dict[str, str] = field(default_factory=dict)


def check_read(source: SourceData, report: Report):
    """Refuse a source with no interaction, saying which reasons skipped what."""
    if not source.users:
        raise ConvertError(f"{source.kind}: no usable interaction was read from "
                         f"{', '.join(str(p) for p in source.input_files)}; skipped input: {report.one_line()}")


def select_text(source: SourceData, options: ConvertOptions, fields: List[str], report: Report,
                steps: List[dict]) -> Selection:
    """Step 1: items without metadata or text (only items someone interacted with matter)."""
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
        txt = text_mod.item_text(item.fields, fields) if source.has_text else ""
        if not txt and tok not in no_text and source.has_text:
            report.problem("item without text", item.origin, None, f"item {tok}: no value for {fields}")
            no_text.add(tok)
        texts[tok] = txt or text_mod.PLACEHOLDER
    candidates = [t for t in used if not (options.missing_text == "drop" and t in no_text)]
    steps.append({"step": f"items without text ({options.missing_text})", "items_seen": len(used),
                  "items_without_text": len(no_text), "items_removed": len(used) - len(candidates)})
    return Selection(info, texts, candidates)


def select_images(source: SourceData, sel: Selection, options: ConvertOptions, report: Report,
                  steps: List[dict], timings: Dict[str, float]):
    """Step 2: items whose image is missing or unreadable (only when the source has images)."""
    if not source.has_images:
        return
    t0 = time.time()
    check = check_images(sel.candidates, sel.info, report, progress=options.progress)
    sel.image_ok, sel.image_sha = check.ok, check.sha256
    timings["check_images_s"] = round(time.time() - t0, 2)
    bad = [t for t in sel.candidates if not sel.image_ok[t]]
    if options.missing_image == "drop":
        sel.candidates = [t for t in sel.candidates if sel.image_ok[t]]
    steps.append({"step": f"items without usable image ({options.missing_image})",
                  "items_without_image": len(bad),
                  "items_removed": len(bad) if options.missing_image == "drop" else 0})


def order_interactions(source: SourceData, candidates: List[str], steps: List[dict]) -> Interactions:
    """Step 3: interactions of kept items, chronological per user, ties by file order (never item id)."""
    keep_items = set(candidates)
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
    steps.append({"step": "interactions of kept items", "interactions_read": len(source.users),
                  "interactions_removed": len(source.users) - len(rows)})
    return Interactions(rows[order], u_idx[order], i_idx[order], t_val[order])


def drop_repeats(inter: Interactions, n_items: int, source: SourceData, report: Report,
                 steps: List[dict]) -> Interactions:
    """Step 4: repeated user-item pairs collapse to their first (chronological) occurrence."""
    if not len(inter.rows):
        return inter
    pair = inter.users * (n_items + 1) + inter.items
    _, first = np.unique(pair, return_index=True)
    keep = np.zeros(len(inter.rows), dtype=bool)
    keep[first] = True
    n_dup = int((~keep).sum())
    reason = "repeated user-item pair (first kept)"
    for r in inter.rows[~keep][: report.max_examples]:
        report.repair(reason, source.origins[r], None, f"user {source.users[r]} item {source.items[r]}")
    if n_dup > report.max_examples:
        report.reasons[reason].count += n_dup - report.max_examples
    steps.append({"step": "repeated user-item pairs (first kept)", "interactions_removed": n_dup})
    return inter.take(keep)


def apply_kcore(inter: Interactions, options: ConvertOptions, steps: List[dict],
                timings: Dict[str, float]) -> Interactions:
    """Step 5: iterative k-core over users and items, until stable."""
    t0 = time.time()
    keep, passes = kcore_mask(inter.users, inter.items, options.kcore, progress=options.progress)
    timings["kcore_s"] = round(time.time() - t0, 2)
    steps.append({"step": f"{options.kcore}-core", "passes": passes, "interactions_removed": int((~keep).sum())})
    inter = inter.take(keep)
    if len(inter.rows) == 0:
        raise ConvertError(f"no interaction survives the filters: {json.dumps(steps)}")
    return inter


def final_items(inter: Interactions, sel: Selection) -> List[str]:
    """Surviving items in the source's order (P5 id order, u.item order, metadata file order)."""
    items = [sel.candidates[i] for i in sorted(set(inter.items.tolist()))]
    source_rank = {tok: r for r, tok in enumerate(sel.info)}
    items.sort(key=lambda t: source_rank[t])
    return items


def table1_stats(inter: Interactions, items: List[str], sel: Selection, has_images: bool) -> dict:
    n_users, n_items, n = len(np.unique(inter.users)), len(items), int(len(inter.rows))
    return {"users": n_users, "items": n_items,
            "images": sum(1 for t in items if sel.image_ok.get(t)) if has_images else 0,
            "interactions": n, "density": n / (n_users * n_items),
            "density_percent": round(100.0 * n / (n_users * n_items), 4),
            "avg_interactions_per_user": round(n / n_users, 2)}


def write_recbole_files(folder: Path, options: ConvertOptions, source: SourceData, inter: Interactions,
                        items: List[str], sel: Selection, fields: List[str],
                        timings: Dict[str, float]) -> Dict[str, dict]:
    """``.inter``, ``.item``, ``.item_ids`` (unchanged files are not rewritten); their file entries."""
    folder.mkdir(parents=True, exist_ok=True)
    users = [source.users[r] for r in inter.rows]
    inter_text = recbole_files.inter_text(users, [source.items[r] for r in inter.rows], inter.times.tolist())
    item_fields = [f for f in fields if any(f in sel.info[t].fields for t in items)]
    item_text = recbole_files.item_text_file(items, {t: sel.info[t].fields for t in items}, item_fields)
    inter_path, item_path = folder / f"{options.name}.inter", folder / f"{options.name}.item"
    # The marker goes first and comes back last: whatever happens in between, a folder without
    # meta.json is never taken for a finished dataset.
    _drop_meta(folder)
    t0 = time.time()
    recbole_files.write_if_changed(inter_path, inter_text)
    recbole_files.write_if_changed(item_path, item_text)
    recbole_files.ensure_item_ids(folder, options.name, items)
    timings["write_atomic_s"] = round(time.time() - t0, 2)
    return {"inter": _file_entry(inter_path), "item": _file_entry(item_path),
            "item_ids": _file_entry(features.paths(folder, options.name)["item_ids"])}


def build_features(folder: Path, options: ConvertOptions, source: SourceData, items: List[str],
                   sel: Selection, fields: List[str], report: Report, timings: Dict[str, float]) -> dict:
    """Text and image tables for ``items`` (row order of ``.item_ids``); manifest entry per modality."""
    feature_meta = {}
    if options.text_encoder is not None:
        t0 = time.time()
        feature_meta["text"] = ensure_text_features(
            folder, options.name, [sel.texts[t] for t in items], options.text_encoder,
            extra={"fields": fields}, progress=options.progress)
        timings["text_features_s"] = round(time.time() - t0, 2)
    if options.image_encoder is not None and not source.has_images:
        report.note("an image encoder was given but the source has no image folder: no image features")
    elif options.image_encoder is not None:
        t0 = time.time()
        paths = [sel.info[t].image if sel.image_ok.get(t) else None for t in items]

        def on_error(row, err):
            report.problem("corrupt image", paths[row], None, f"item {items[row]}: {err} (zero row)")

        feature_meta["image"] = ensure_image_features(
            folder, options.name, paths, [sel.image_sha.get(t) for t in items], options.image_encoder,
            extra={"missing_image_policy": options.missing_image}, progress=options.progress,
            on_error=on_error)
        timings["image_features_s"] = round(time.time() - t0, 2)
    return feature_meta


def write_meta(folder: Path, options: ConvertOptions, source: SourceData, report: Report, parts: dict) -> dict:
    """meta.json, last: every file's sha256, so a folder without it (or not matching) is unfinished."""
    files, feature_meta = parts["files"], parts["features"]
    fpaths = features.paths(folder, options.name)
    for modality, entry in feature_meta.items():
        files[modality] = _file_entry(fpaths[modality])
        if entry.get("mask_file"):
            files[f"{modality}_mask"] = _file_entry(fpaths[f"{modality}_mask"])
    meta = {
        "meta_version": META_VERSION,
        "name": options.name,
        "source": {"format": source.kind, "inputs": [_input_entry(p) for p in source.input_files],
                   **source.details},
        "options": _options_dict(options, parts["fields"]),
        "filters": parts["steps"],
        "stats": parts["stats"],
        "report": report.to_dict(),
        "files": files,
        "features": {m: {k: v for k, v in e.items() if k != "skipped"} for m, e in feature_meta.items()},
        "features_reused": {m: bool(e.get("skipped")) for m, e in feature_meta.items()},
        "timings": parts["timings"],
    }
    atomic_write.write_json(folder / "meta.json", meta)
    return meta


def convert(source: SourceData, options: ConvertOptions, report: Report) -> dict:
    """Filter, write and featurize ``source`` into ``<output>/<name>/``; returns meta.json's content."""
    started = time.time()
    timings: Dict[str, float] = {}
    steps: List[dict] = []
    fields = options.text_fields or source.default_fields
    check_read(source, report)
    if not source.has_text and options.text_encoder is not None:
        raise ConvertError(f"{source.kind}: the source has no item text (ID-only); pass no text encoder")
    sel = select_text(source, options, fields, report, steps)
    select_images(source, sel, options, report, steps, timings)
    inter = order_interactions(source, sel.candidates, steps)
    if options.dedup:
        inter = drop_repeats(inter, len(sel.candidates), source, report, steps)
    inter = apply_kcore(inter, options, steps, timings)
    items = final_items(inter, sel)
    folder = dataset_dir(options)
    with output_lock(options.output, options.name):
        files = write_recbole_files(folder, options, source, inter, items, sel, fields, timings)
        feature_meta = build_features(folder, options, source, items, sel, fields, report, timings)
        timings["total_s"] = round(time.time() - started, 2)
        return write_meta(folder, options, source, report, {
            "files": files, "features": feature_meta, "fields": fields, "steps": steps, "timings": timings,
            "stats": table1_stats(inter, items, sel, source.has_images)})


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
