"""RecBole atomic files (``.inter``, ``.item``, ``.item_ids``): writing them, and reading an existing ``.item``.

RecBole 1.2.1 reads atomic files with ``pandas.read_csv(sep="\\t", engine="python")`` and the
default quote character, splits ``token_seq`` fields on spaces and keeps ``token`` fields whole.
So values are written with tabs and newlines turned into spaces and CSV-quoted only when they
contain a double quote; list fields become ``token_seq`` with spaces inside an entry turned into
"_" (so "Skin Care" stays one token).
"""
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from recbole_fmrl import atomic_write
from recbole_fmrl.data import features

INTER_HEADER = ["user_id:token", "item_id:token", "timestamp:float"]

# RecBole type of each known text field in the .item file.
FIELD_TYPES = {
    "title": "token_seq",
    "price": "float",
    "brand": "token",
    "categories": "token_seq",
    "year": "token",
    "genres": "token_seq",
    "overview": "token_seq",
    "description": "token_seq",
}


def _clean_cell(value: str) -> str:
    return " ".join(str(value).split())


def _cell(value, ftype: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        # One token per entry: inner spaces would split "Skin Care" into two tokens.
        return " ".join(_clean_cell(v).replace(" ", "_") for v in value if _clean_cell(v))
    text = _clean_cell(value)
    if ftype == "float":
        try:
            return repr(float(text))
        except ValueError:
            return ""
    return text


def _tsv(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL,
                        lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def inter_text(users: Sequence[str], items: Sequence[str], times: Sequence[float]) -> str:
    lines = ["\t".join(INTER_HEADER)]
    lines.extend(f"{u}\t{i}\t{t!r}" for u, i, t in zip(users, items, times))
    return "\n".join(lines) + "\n"


def item_text_file(tokens: Sequence[str], fields_of: Dict[str, dict], field_names: List[str]) -> str:
    header = ["item_id:token"] + [f"{f}:{FIELD_TYPES.get(f, 'token_seq')}" for f in field_names]
    rows = [header]
    for tok in tokens:
        values = fields_of[tok]
        rows.append([tok] + [_cell(values.get(f), FIELD_TYPES.get(f, "token_seq")) for f in field_names])
    return _tsv(rows)


def write_if_changed(path: Path, content: str) -> bool:
    """Atomically write ``content`` unless the file already holds exactly that; True if written."""
    if path.is_file():
        try:
            if path.read_text(encoding="utf-8") == content:
                return False
        except UnicodeDecodeError:
            pass
    atomic_write.write_text(path, content)
    return True


# ------------------------------------------------------------------ existing atomic datasets

class AtomicFileError(ValueError):
    """An atomic file cannot be read; the message names file and line."""


@dataclass
class AtomicItems:
    path: Path  # the .item file read
    tokens: List[str]  # item_id tokens, file order
    fields: Dict[str, List[str]]  # field name (without type) -> raw cell per row
    types: Dict[str, str]  # field name -> RecBole type


def read_item_file(path, encoding: str = "utf-8") -> AtomicItems:
    """Read a RecBole ``.item`` file the way RecBole does (tab separated, CSV quoting)."""
    path = Path(path)
    encoding = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding  # strip a BOM
    with open(path, encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quotechar='"')
        try:
            header = next(reader)
        except StopIteration:
            raise AtomicFileError(f"{path}:1: empty file") from None
        names, types = [], {}
        for col in header:
            if ":" not in col:
                raise AtomicFileError(f"{path}:1: header column {col!r} is not 'name:type'")
            name, ftype = col.split(":", 1)
            names.append(name)
            types[name] = ftype
        if "item_id" not in names:
            raise AtomicFileError(f"{path}:1: no item_id column (header {header})")
        tokens, fields = [], {n: [] for n in names if n != "item_id"}
        seen = set()
        for lineno, row in enumerate(reader, start=2):
            if not row or row == [""]:
                continue
            if len(row) != len(names):
                raise AtomicFileError(f"{path}:{lineno}: {len(row)} columns, header has {len(names)}")
            rec = dict(zip(names, row))
            tok = rec["item_id"].strip()
            if not tok:
                raise AtomicFileError(f"{path}:{lineno}: empty item_id")
            if tok in seen:
                raise AtomicFileError(f"{path}:{lineno}: duplicate item_id {tok!r}")
            seen.add(tok)
            tokens.append(tok)
            for n in fields:
                fields[n].append(rec[n])
    return AtomicItems(path, tokens, fields, types)


def ensure_item_ids(folder, name: str, tokens: Sequence[str]) -> str:
    """Write ``<name>.item_ids`` unless it already lists exactly ``tokens``; returns its sha256.

    Rewriting an identical file would be harmless for the hash, but skipping it keeps the
    features of other modalities untouched on disk.
    """
    path = features.paths(folder, name)["item_ids"]
    content = "".join(f"{t}\n" for t in tokens)
    if path.is_file() and path.read_text(encoding="utf-8") == content:
        return features.sha256_file(path)
    return features.write_item_ids(folder, name, tokens)
