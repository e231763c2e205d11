"""The P5/VIP5 layout that fMRLRec reads.

``sequential_data.txt``: one line per user, ``user item item ...`` with P5's 1-based numeric ids,
items in chronological order (no timestamps: the position is the time). ``datamaps.json``:
``id2user``/``id2item`` (numeric id -> reviewer id / asin). ``meta.json.gz``: Amazon 2014
metadata lines. Optional ``item2img_dict.pkl`` (asin -> image path; only the file name is used,
as VIP5 does) with a photos folder.
Tokens written to RecBole are the original reviewer ids and asins, so the same item has the same
token whether it came from P5 files or from the raw dump.
"""
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from dataset_tools import text as text_mod
from dataset_tools.amazon import iter_lines, read_meta
from dataset_tools.images import find_image
from dataset_tools.report import Report
from dataset_tools.source import SourceData


@dataclass
class P5Options:
    input: Path  # folder with sequential_data.txt, datamaps.json, meta.json.gz
    images: Optional[Path] = None  # photos folder; item2img_dict.pkl (if present) names each item's file
    raw_ids: bool = True  # tokens are reviewer ids / asins from datamaps.json; False: P5's numeric ids


class _DictOfStrings(pickle.Unpickler):
    """item2img_dict.pkl is data from the internet: allow nothing but builtin containers."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")


def read_item2img(path: Path) -> Dict[str, str]:
    with open(path, "rb") as fh:
        try:
            obj = _DictOfStrings(fh).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: not a plain pickled dict ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict asin -> image path, got {type(obj).__name__}")
    return {str(k): str(v) for k, v in obj.items()}


def read_p5(options: P5Options, report: Report, progress: bool = True) -> SourceData:
    folder = Path(options.input)
    seq_path, maps_path, meta_path = folder / "sequential_data.txt", folder / "datamaps.json", folder / "meta.json.gz"
    if not meta_path.is_file() and (folder / "meta.json").is_file():
        meta_path = folder / "meta.json"
    for p in (seq_path, maps_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found (P5 layout needs sequential_data.txt, datamaps.json, "
                                    f"meta.json.gz)")
    images = Path(options.images) if options.images else None
    if images is not None and not images.is_dir():
        raise FileNotFoundError(f"{images}: image folder not found")
    try:
        maps = json.loads(maps_path.read_text(encoding="utf-8"))
        id2item = {str(k): str(v) for k, v in maps["id2item"].items()}
        id2user = {str(k): str(v) for k, v in maps.get("id2user", {}).items()}
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{maps_path}: not a P5 datamaps file with id2item ({err})") from err
    if options.raw_ids and not id2user:
        raise ValueError(f"{maps_path}: no id2user map; use raw_ids=False (--p5-numeric-ids)")

    inputs = [seq_path, maps_path, meta_path]
    data = SourceData(kind="p5", input_files=inputs, default_fields=list(text_mod.AMAZON_FIELDS),
                      has_images=images is not None)
    seen_users = set()
    for lineno, line in iter_lines(seq_path, f"reading {seq_path.name}", progress):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not all(p.isdigit() for p in parts):
            report.problem("malformed sequence line", seq_path, lineno, line[:80])
            continue
        uid = parts[0]
        if options.raw_ids and uid not in id2user:
            report.problem("user id missing from datamaps", seq_path, lineno, f"user {uid}")
            continue
        user = id2user[uid] if options.raw_ids else uid
        if user in seen_users:
            report.problem("user listed twice (later line skipped)", seq_path, lineno, f"user {uid}")
            continue
        seen_users.add(user)
        where = f"{seq_path}:{lineno}"
        position = 0
        for iid in parts[1:]:
            if iid not in id2item:
                report.problem("item id missing from datamaps", seq_path, lineno, f"item {iid}")
                continue
            data.add(user, id2item[iid] if options.raw_ids else iid, float(position), where)
            position += 1

    img_map, img_path = {}, folder / "item2img_dict.pkl"
    if images is not None and img_path.is_file():
        img_map = read_item2img(img_path)
        inputs.append(img_path)
    by_asin = read_meta(meta_path, set(id2item.values()), report, None, progress)
    # Items in P5 id order, so row r of the features is P5 item r+1 (as the reference assumes).
    for iid in sorted(id2item, key=lambda k: (len(k), k) if k.isdigit() else (1 << 30, k)):
        asin = id2item[iid]
        item = by_asin.get(asin)
        if item is None:
            continue
        if images is not None:
            stems = [Path(img_map[asin]).name] if asin in img_map else []
            item.image = find_image(images, stems + [asin]) or images / (stems[0] if stems else f"{asin}.jpg")
            item.image_origin = f"{img_path}" if asin in img_map else item.origin
        data.item_info[asin if options.raw_ids else iid] = item
    data.details = {"layout": "P5/VIP5", "images": str(images) if images else None,
                    "ids": "reviewer ids and asins from datamaps.json" if options.raw_ids else "P5 numeric ids",
                    "timestamps": "position in sequential_data.txt (no timestamps in the P5 files)"}
    return data
