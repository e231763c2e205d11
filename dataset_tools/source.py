"""The format-independent result of reading one source: interactions in file order plus item records.

Readers (``amazon``, ``p5``, ``movielens``) fill a ``SourceData``; everything after that
(filters, k-core, writing, features) is shared, so the three formats cannot drift apart.

Every interaction enters through ``SourceData.add_checked``, the one place that decides what RecBole
can read back: an id holding a tab, a line break or a leading double quote (RecBole's pandas reader
splits or unquotes it), an empty id, or one pandas reads as missing (``NA``, ``nan``, ``null``, ...:
RecBole would turn it into padding), and a timestamp that is not a finite number, are problems:
counted per reason with their file:line, the interaction skipped (``--strict`` fails on the first).
"""
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

from dataset_tools.report import Deferred, Report

FieldValue = Union[str, List[str]]


@dataclass
class Item:
    origin: str  # "file:line" where the item was defined, for report examples
    fields: Dict[str, FieldValue] = field(default_factory=dict)  # text fields, missing ones absent
    image: Optional[Path] = None  # image file the source points to (may not exist); None: no image known
    image_origin: str = ""  # where the image reference came from, for report examples
    findings: Deferred = field(default_factory=Deferred)  # reported only if the item is used


@dataclass
class SourceData:
    kind: str  # "amazon", "p5" or "movielens"
    input_files: List[Path]  # every file read, recorded in meta.json
    users: List[str] = field(default_factory=list)  # user token per interaction, file order
    items: List[str] = field(default_factory=list)  # item token per interaction, file order
    times: List[float] = field(default_factory=list)  # timestamp per interaction
    origins: List[str] = field(default_factory=list)  # "file:line" per interaction
    item_info: Dict[str, Item] = field(default_factory=dict)  # item token -> record, source order
    default_fields: List[str] = field(default_factory=list)  # template fields used unless overridden
    has_images: bool = False  # an image folder was given: the missing-image policy applies
    has_text: bool = True  # False: the source has no item text at all (P5 without meta): ID-only
    details: dict = field(default_factory=dict)  # format-specific facts for meta.json

    def add(self, user: str, item: str, time: float, origin: str):
        self.users.append(user)
        self.items.append(item)
        self.times.append(time)
        self.origins.append(origin)

    def add_checked(self, report: Report, user, item, time, path, line) -> bool:
        """Add one interaction unless its ids or time cannot be written for RecBole (counted in ``report``)."""
        for what, token in (("user", user), ("item", item)):
            reason = id_problem(token)
            if reason:
                report.problem(f"{what} id {reason}", path, line, f"{what} {str(token)[:40]!r}")
                return False
        try:
            stamp = float(time)
        except (TypeError, ValueError):
            report.problem("unparsable timestamp", path, line, repr(time)[:40])
            return False
        if not math.isfinite(stamp):
            report.problem("non-finite timestamp", path, line, repr(time)[:40])
            return False
        self.add(str(user), str(item), stamp, f"{path}:{line}")
        return True


# pandas' default missing-value strings: RecBole reads atomic files with them, so such an id becomes NaN
PANDAS_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                  "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def id_problem(token) -> Optional[str]:
    """Why ``token`` cannot be a RecBole token id written as it is, or None."""
    if not isinstance(token, str):
        return "not a string"
    if any(c in token for c in "\t\n\r"):
        return "with a tab or line break"
    if token != token.strip():
        return "with leading or trailing whitespace"
    if token.startswith('"'):
        return "starting with a double quote"
    if token in PANDAS_MISSING:
        return "read as missing by RecBole's reader"
    return None


_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(value, report: Report, path, line, what: str) -> str:
    """Unescape HTML entities, strip tags and collapse whitespace; count each repair.

    The 2014 dumps keep entities such as ``&amp;`` and the 2018 ones sometimes carry markup; an
    encoder should read the text a person would read.
    """
    text = str(value)
    if "<" in text and _TAG.search(text):
        text = _TAG.sub(" ", text)
        report.repair(f"HTML markup removed from {what}", path, line, repr(str(value)[:80]))
    if "&" in text:
        unescaped = html.unescape(text)
        if unescaped != text:
            report.repair(f"HTML entity unescaped in {what}", path, line, repr(text[:80]))
            text = unescaped
    return _SPACE.sub(" ", text).strip()


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def parse_price(value, report: Report, path, line) -> Optional[str]:
    """A price as the reference template prints it: ``str(float)`` ("12.0"), no currency sign.

    2014 dumps hold numbers; 2018 dumps hold strings such as "$12.99" or "$5.99 - $12.99" (the
    lower bound is used) and sometimes CSS junk, which is counted and skipped.
    """
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(float(value))
    text = str(value).strip()
    match = _NUMBER.search(text)
    if not match or len(text) > 40:
        report.problem("unparseable price", path, line, repr(text[:60]))
        return None
    return str(float(match.group(0).replace(",", "")))
