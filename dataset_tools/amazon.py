"""Raw Amazon review dumps, 2014 (McAuley) and 2018 (Ni) formats.

Reviews: ``reviews_<Cat>_5.json.gz`` / ``<Cat>_5.json.gz`` (one review per line, JSON or a
Python dict literal; ``reviewerID``, ``asin``, ``unixReviewTime``) or ``ratings_<Cat>.csv``
(``user,item,rating,timestamp``, no header).
Metadata: ``meta_<Cat>.json.gz``. 2014 lines are Python dict literals (``ast.literal_eval``,
never ``eval``) with ``categories`` a list of lists and a numeric ``price``; 2018 lines are JSON
with ``category`` a flat list, ``price`` a string ("$12.99") and titles that may carry HTML.
The format is detected per line, so a mixed or re-encoded file still reads.
"""
import ast
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from dataset_tools import text as text_mod
from dataset_tools.images import find_image
from dataset_tools.input_files import iter_lines
from dataset_tools.report import Report
from dataset_tools.source import Item, SourceData, clean_text, parse_price


@dataclass
class AmazonOptions:
    reviews: Path  # reviews_<Cat>_5.json.gz, <Cat>_5.json.gz or ratings_<Cat>.csv (plain or .gz)
    meta: Path  # meta_<Cat>.json.gz (2014 or 2018 lines)
    images: Optional[Path] = None  # folder of images named <asin>.<ext> or by the image URL's file name


def parse_record(line: str):
    """A dict from a JSON line or a 2014 Python-literal line; None when it is neither."""
    try:
        rec = json.loads(line)
    except ValueError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return rec if isinstance(rec, dict) else None


def item_from_meta(rec: dict, path: Path, lineno: int, images: Optional[Path]) -> Item:
    """Item fields from one 2014 or 2018 metadata record (title, price, brand, first category path)."""
    item = Item(origin=f"{path}:{lineno}")
    sink = item.findings
    title = rec.get("title")
    title = clean_text(title, sink, path, lineno, "title") if title is not None else ""
    if title:
        item.fields["title"] = title
    else:
        sink.problem("empty title", path, lineno, f"item {rec.get('asin')}")
    price = parse_price(rec.get("price"), sink, path, lineno)
    if price is not None:
        item.fields["price"] = price
    brand = rec.get("brand")
    if brand is not None and str(brand).strip():
        item.fields["brand"] = clean_text(brand, sink, path, lineno, "brand")
    cats = rec.get("categories")
    if cats is None and rec.get("category") is not None:
        cats = [rec["category"]]  # 2018: one flat path
    if isinstance(cats, list) and cats and isinstance(cats[0], (list, tuple)):
        path0 = [clean_text(c, sink, path, lineno, "categories") for c in cats[0]]
        path0 = [c for c in path0 if c]
        if path0:
            item.fields["categories"] = path0
    elif cats not in (None, [], [[]]):
        sink.problem("malformed categories", path, lineno, repr(cats)[:80])
    if images is not None:
        urls = []
        for key in ("imageURLHighRes", "imageURL", "imUrl"):
            value = rec.get(key)
            urls.extend(value if isinstance(value, list) else [value] if value else [])
        stems = [str(rec.get("asin"))] + [str(u).rsplit("/", 1)[-1] for u in urls]
        item.image = find_image(images, stems) or images / f"{rec.get('asin')}.jpg"
        item.image_origin = f"{path}:{lineno}"
    return item


def _same_item(a: Item, b: Item) -> bool:
    return a.fields == b.fields and a.image == b.image


def read_meta(path: Path, wanted: Optional[set], report: Report, images: Optional[Path],
              progress: bool = True) -> dict:
    """Items of ``wanted`` asins (all when None) from a metadata file, in file order."""
    items = {}
    outside = 0
    for lineno, line, bad_utf8 in iter_lines(path, f"reading {path.name}", progress):
        if not line.strip():
            continue
        rec = parse_record(line)
        if rec is None:
            report.problem("malformed metadata line", path, lineno, line[:80])
            continue
        asin = rec.get("asin")
        if not isinstance(asin, str) or not asin.strip():
            report.problem("metadata line without asin", path, lineno, line[:80])
            continue
        asin = asin.strip()
        if wanted is not None and asin not in wanted:
            outside += 1
            continue
        item = item_from_meta(rec, path, lineno, images)
        if asin in items:
            if _same_item(items[asin], item):
                report.repair("duplicate metadata row (identical, skipped)", path, lineno, f"asin {asin}")
            else:
                report.problem("conflicting duplicate metadata row (first kept)", path, lineno,
                               f"asin {asin}: first at {items[asin].origin}")
            continue
        if bad_utf8:
            # Item-level: counted only if someone interacted with the item (see Deferred).
            item.findings.problem("non-UTF-8 bytes in metadata (replaced by U+FFFD)", path, lineno, bad_utf8)
        items[asin] = item
    if outside:
        report.note(f"{path.name}: {outside} metadata rows describe items with no interaction")
    return items


def _read_rating_csv(path: Path, data: SourceData, report: Report, progress: bool):
    for lineno, line, bad_utf8 in iter_lines(path, f"reading {path.name}", progress):
        if not line.strip():
            continue
        if bad_utf8:
            report.problem("non-UTF-8 bytes in rating line (replaced by U+FFFD)", path, lineno, bad_utf8)
        parts = next(csv.reader([line]))
        if len(parts) != 4:
            report.problem("malformed rating line", path, lineno, line[:80])
            continue
        user, asin, _rating, ts = (p.strip() for p in parts)
        data.add_checked(report, user, asin, ts, path, lineno)


def read_reviews(path: Path, data: SourceData, report: Report, progress: bool = True):
    if ".csv" in path.suffixes:
        _read_rating_csv(path, data, report, progress)
        return
    for lineno, line, bad_utf8 in iter_lines(path, f"reading {path.name}", progress):
        if not line.strip():
            continue
        if bad_utf8:
            report.problem("non-UTF-8 bytes in review line (replaced by U+FFFD)", path, lineno, bad_utf8)
        rec = parse_record(line)
        if rec is None:
            report.problem("malformed review line", path, lineno, line[:80])
            continue
        user, asin, ts = rec.get("reviewerID"), rec.get("asin"), rec.get("unixReviewTime")
        if not isinstance(user, str) or not isinstance(asin, str) or not user.strip() or not asin.strip():
            report.problem("review without reviewerID/asin", path, lineno, line[:80])
            continue
        if ts is None:
            report.problem("review without unixReviewTime", path, lineno, line[:80])
            continue
        data.add_checked(report, user.strip(), asin.strip(), ts, path, lineno)


def find_inputs(folder: Path) -> Tuple[Path, Path]:
    """The review/rating file and the metadata file of a category folder."""
    metas = sorted(folder.glob("meta_*.json*"))
    reviews = sorted(p for p in folder.glob("*.json*") if p not in metas) or sorted(folder.glob("ratings_*.csv*"))
    if len(metas) != 1 or len(reviews) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one meta_<Cat>.json(.gz) and one review file (reviews_<Cat>_5.json.gz, "
            f"<Cat>_5.json.gz or ratings_<Cat>.csv); found meta={[p.name for p in metas]}, "
            f"reviews={[p.name for p in reviews]}. Pass --reviews/--meta explicitly.")
    return reviews[0], metas[0]


def read_amazon(options: AmazonOptions, report: Report, progress: bool = True) -> SourceData:
    reviews, meta = Path(options.reviews), Path(options.meta)
    for p in (reviews, meta):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found")
    if options.images is not None and not Path(options.images).is_dir():
        raise FileNotFoundError(f"{options.images}: image folder not found")
    data = SourceData(kind="amazon", input_files=[reviews, meta], default_fields=list(text_mod.AMAZON_FIELDS),
                      has_images=options.images is not None)
    read_reviews(reviews, data, report, progress)
    # Reviews first, so only the metadata of reviewed items is kept (2018 meta files hold millions).
    data.item_info = read_meta(meta, set(data.items), report, Path(options.images) if options.images else None,
                               progress)
    data.details = {"reviews": str(reviews), "meta": str(meta),
                    "images": str(options.images) if options.images else None,
                    "timestamps": "unixReviewTime; ties in file order"}
    return data
