"""The P5/VIP5 layout that fMRLRec reads.

``sequential_data.txt`` (``sequential.txt`` in RDRec's copy): one line per user,
``user item item ...`` with P5's 1-based numeric ids, items in chronological order (no timestamps:
the position is the time). ``datamaps.json``: ``id2user``/``id2item`` (numeric id -> reviewer id /
asin). ``meta.json.gz``: Amazon 2014 metadata lines (optional when no text is wanted: the dataset is
then ID-only). Optional ``item2img_dict.pkl`` (asin -> image path; only the file name is used, as
VIP5 does) with a photos folder. ``keyphrases`` (``--keyphrases``): a TSV ``p5_item_id, asin,
keyphrase`` whose derived keyphrase (a few words generated from the item's text by another system,
e.g. IDGenRec's; not the real title) is the item text instead of meta.json.gz, for sets such as Toys
whose metadata is not available.
Tokens written to RecBole are the original reviewer ids and asins, so the same item has the same
token whether it came from P5 files or from the raw dump.
"""
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from dataset_tools import text as text_mod
from dataset_tools.amazon import read_meta
from dataset_tools.images import find_image
from dataset_tools.input_files import iter_lines
from dataset_tools.report import InputFileError, Report
from dataset_tools.source import Item, SourceData, id_problem


@dataclass
class P5Options:
    input: Path  # folder with sequential_data.txt, datamaps.json, meta.json.gz
    images: Optional[Path] = None  # photos folder; item2img_dict.pkl (if present) names each item's file
    raw_ids: bool = True  # tokens are reviewer ids / asins from datamaps.json; False: P5's numeric ids
    require_meta: bool = True  # False: without meta.json.gz the dataset is ID-only (no item text)
    keyphrases: Optional[Path] = None  # TSV p5_item_id, asin, keyphrase: derived text instead of meta.json.gz


class _DictOfStrings(pickle.Unpickler):
    """item2img_dict.pkl is data from the internet: allow nothing but builtin containers."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a pickle")


def read_item2img(path: Path) -> Dict[str, str]:
    with open(path, "rb") as fh:
        try:
            obj = _DictOfStrings(fh).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, MemoryError) as err:
            raise InputFileError(f"{path}: not a plain pickled dict ({err})") from None
    if not isinstance(obj, dict):
        raise InputFileError(f"{path}: expected a dict asin -> image path, got {type(obj).__name__}")
    return {str(k): str(v) for k, v in obj.items()}


SEQUENCE_FILES = ("sequential_data.txt", "sequential.txt")  # P5/VIP5, RDRec (same format)


def find_layout(folder: Path, require_meta: bool):
    """(sequence file, datamaps.json, metadata file or None); one-line errors for a wrong layout."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: P5 input folder not found")
    seq = next((folder / n for n in SEQUENCE_FILES if (folder / n).is_file()), None)
    if seq is None:
        raise FileNotFoundError(f"{folder}: no sequential_data.txt (P5/VIP5) or sequential.txt (RDRec) "
                                f"in the P5 layout")
    maps = folder / "datamaps.json"
    if not maps.is_file():
        raise FileNotFoundError(f"{maps}: not found (the P5 layout needs it to map ids to users and items)")
    meta = next((folder / n for n in ("meta.json.gz", "meta.json") if (folder / n).is_file()), None)
    if meta is None and require_meta:
        raise FileNotFoundError(f"{folder / 'meta.json.gz'}: not found; item text needs it (pass "
                                f"--text-encoder none for an ID-only dataset)")
    return seq, maps, meta


def read_maps(maps_path: Path, raw_ids: bool):
    """(id2item, id2user) from datamaps.json, as strings."""
    try:
        maps = json.loads(maps_path.read_text(encoding="utf-8-sig"))
        id2item = {str(k): str(v) for k, v in maps["id2item"].items()}
        id2user = {str(k): str(v) for k, v in maps.get("id2user", {}).items()}
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise InputFileError(f"{maps_path}: not a P5 datamaps file with id2item ({err})") from None
    if raw_ids and not id2user:
        raise InputFileError(f"{maps_path}: no id2user map; use raw_ids=False (--p5-numeric-ids)")
    return id2item, id2user


def read_sequences(seq_path: Path, id2item, id2user, raw_ids: bool, data: SourceData, report: Report,
                   progress: bool):
    """One user per line; the position in the line is the time."""
    seen_users = set()
    for lineno, line, bad_utf8 in iter_lines(seq_path, f"reading {seq_path.name}", progress):
        parts = line.split()
        if not parts:
            continue
        if bad_utf8 or len(parts) < 2 or not all(p.isdigit() for p in parts):
            report.problem("malformed sequence line", seq_path, lineno, bad_utf8 or line[:80])
            continue
        uid = parts[0]
        if raw_ids and uid not in id2user:
            report.problem("user id missing from datamaps", seq_path, lineno, f"user {uid}")
            continue
        user = id2user[uid] if raw_ids else uid
        if user in seen_users:
            report.problem("user listed twice (later line skipped)", seq_path, lineno, f"user {uid}")
            continue
        seen_users.add(user)
        if id_problem(user):  # once per line, not once per item
            report.problem(f"user id {id_problem(user)}", seq_path, lineno, f"user {user[:40]!r}")
            continue
        position = 0
        for iid in parts[1:]:
            if iid not in id2item:
                report.problem("item id missing from datamaps", seq_path, lineno, f"item {iid}")
                continue
            if data.add_checked(report, user, id2item[iid] if raw_ids else iid, position, seq_path, lineno):
                position += 1


def _p5_order(id2item):
    return sorted(id2item, key=lambda k: (len(k), k) if k.isdigit() else (1 << 30, k))


def attach_items(options: P5Options, id2item, by_asin, maps_path: Path, data: SourceData):
    """Item records in P5 id order (row r of the features is P5 item r+1, as the reference assumes)."""
    folder, images = Path(options.input), Path(options.images) if options.images else None
    img_map, img_path = {}, folder / "item2img_dict.pkl"
    if images is not None and img_path.is_file():
        img_map = read_item2img(img_path)
        data.input_files.append(img_path)
    for iid in _p5_order(id2item):
        asin = id2item[iid]
        item = by_asin.get(asin) if by_asin is not None else Item(origin=f"{maps_path}")
        if item is None:
            continue
        if images is not None:
            stems = [Path(img_map[asin]).name] if asin in img_map else []
            item.image = find_image(images, stems + [asin]) or images / (stems[0] if stems else f"{asin}.jpg")
            item.image_origin = f"{img_path}" if asin in img_map else item.origin
        data.item_info[asin if options.raw_ids else iid] = item


KEYPHRASE_COLUMNS = ("asin", "keyphrase")  # required header names; p5_item_id, when present, is checked


def read_keyphrases(path: Path, id2item, report: Report, progress: bool) -> Dict[str, Item]:
    """asin -> Item with one text field ``keyphrase``, from a TSV with a header naming its columns.

    A row whose asin is not in datamaps.json, whose p5_item_id names another asin, or whose asin came
    before, is counted and skipped; an empty keyphrase leaves the item without text (``--missing-text``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: keyphrase file not found")
    asins = set(id2item.values())
    items, header = {}, None
    for lineno, line, bad_utf8 in iter_lines(path, f"reading {path.name}", progress):
        cells = line.split("\t")
        if header is None:
            header = {name.strip(): i for i, name in enumerate(cells)}
            missing = [c for c in KEYPHRASE_COLUMNS if c not in header]
            if missing:
                raise InputFileError(f"{path}:1: keyphrase header needs columns {', '.join(KEYPHRASE_COLUMNS)} "
                                     f"(tab-separated); missing {', '.join(missing)}")
            continue
        if not line.strip():
            continue
        if bad_utf8 or len(cells) < len(header):
            report.problem("malformed keyphrase line", path, lineno, bad_utf8 or line[:80])
            continue
        asin, phrase = cells[header["asin"]].strip(), cells[header["keyphrase"]].strip()
        pid = cells[header["p5_item_id"]].strip() if "p5_item_id" in header else None
        if asin not in asins:
            report.problem("keyphrase for an asin not in datamaps", path, lineno, asin)
        elif pid is not None and id2item.get(pid) != asin:
            report.problem("p5_item_id and asin disagree with datamaps", path, lineno, f"{pid} {asin}")
        elif asin in items:
            report.problem("asin listed twice (later line skipped)", path, lineno, asin)
        else:
            items[asin] = Item(origin=f"{path}:{lineno}", fields={"keyphrase": phrase} if phrase else {})
    return items


def read_p5(options: P5Options, report: Report, progress: bool = True) -> SourceData:
    folder = Path(options.input)
    keyphrases = Path(options.keyphrases) if options.keyphrases else None
    seq_path, maps_path, meta_path = find_layout(folder, options.require_meta and keyphrases is None)
    images = Path(options.images) if options.images else None
    if images is not None and not images.is_dir():
        raise FileNotFoundError(f"{images}: image folder not found")
    id2item, id2user = read_maps(maps_path, options.raw_ids)
    if keyphrases is not None:
        if meta_path is not None:
            report.note(f"{meta_path}: not read; the item text is the derived keyphrases of {keyphrases}")
        meta_path = None
    text_file = keyphrases or meta_path
    data = SourceData(kind="p5", input_files=[seq_path, maps_path] + ([text_file] if text_file else []),
                      default_fields=["keyphrase"] if keyphrases else list(text_mod.AMAZON_FIELDS),
                      has_images=images is not None, has_text=text_file is not None)
    read_sequences(seq_path, id2item, id2user, options.raw_ids, data, report, progress)
    if keyphrases is not None:
        by_asin = read_keyphrases(keyphrases, id2item, report, progress)
        report.note(f"item text: derived keyphrases from {keyphrases.name} (generated words, not real titles)")
    else:
        by_asin = read_meta(meta_path, set(id2item.values()), report, None, progress) if meta_path else None
    if text_file is None:
        report.note(f"{folder}: no meta.json.gz, an ID-only dataset (no item text)")
    attach_items(options, id2item, by_asin, maps_path, data)
    data.details = {"layout": "P5/VIP5" if seq_path.name == SEQUENCE_FILES[0] else "RDRec (sequential.txt)",
                    "images": str(images) if images else None,
                    "meta": str(meta_path) if meta_path else None,
                    "text": (f"derived keyphrases ({keyphrases}), not real titles" if keyphrases else
                             "Amazon metadata" if meta_path else None),
                    "ids": "reviewer ids and asins from datamaps.json" if options.raw_ids else "P5 numeric ids",
                    "timestamps": f"position in {seq_path.name} (no timestamps in the P5 files)"}
    return data
