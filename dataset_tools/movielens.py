"""MovieLens 100k (``u.data``/``u.item``/``u.genre``) and 1M (``ratings.dat``/``movies.dat``, or
``sequences.txt`` with ``items.tsv``: the ml-1m-posters layout, see ``_read_1m_sequences``).

Optional extras: a posters folder (``<movie_id>.jpg``; default ``<input>/posters``) and an
overview CSV with ``movie_id`` and ``overview`` columns (default ``<input>/items_tmdb.csv``).
Item text: "Title: ...\\nYear: ...\\nGenres: ...\\nOverview: ...". Titles lose the "(1995)" suffix
(it becomes the Year line) and get their article back in front ("Usual Suspects, The" ->
"The Usual Suspects"), which is how an encoder has seen them in running text.
"""
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from dataset_tools import text as text_mod
from dataset_tools.images import find_image
from dataset_tools.input_files import iter_lines
from dataset_tools.report import InputFileError, Report
from dataset_tools.source import Item, SourceData, clean_text

# u.genre of 100k, used when the file is missing.
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western"]
_SURROGATE = re.compile("[\udc80-\udcff]")
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_ARTICLE = re.compile(r"^(?P<rest>.+), (?P<art>The|A|An|Les|La|Le|Il|El|Das|Der|Die)(?P<tail> \(.*\))?$")


@dataclass
class MovieLensOptions:
    input: Path  # folder with u.data + u.item (100k) or ratings.dat + movies.dat (1M)
    posters: Optional[Path] = None  # folder of <movie_id>.jpg; None: <input>/posters when it exists
    overviews: Optional[Path] = None  # CSV with movie_id and overview; None: <input>/items_tmdb.csv if present
    use_posters: bool = True  # False: ignore posters even when the folder exists
    use_overviews: bool = True  # False: ignore the overview CSV even when it exists


BOM_LATIN1 = "\xef\xbb\xbf"  # a UTF-8 byte-order mark, read as latin-1 (the MovieLens files' encoding)


def strip_bom(line: str, lineno: int) -> str:
    """Line 1 without a byte-order mark (an editor's, in front of the first id)."""
    return line[len(BOM_LATIN1):] if lineno == 1 and line.startswith(BOM_LATIN1) else line


def split_title(raw: str):
    """("Usual Suspects, The (1995)") -> ("The Usual Suspects", "1995")."""
    title, year = raw.strip(), None
    m = _YEAR.search(title)
    if m:
        year, title = m.group(1), title[: m.start()].strip()
    m = _ARTICLE.match(title)
    if m:
        title = f"{m.group('art')} {m.group('rest')}{m.group('tail') or ''}"
    return title, year


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def parse_rating(parts) -> Optional[Tuple[str, str, float]]:
    """(user, movie, timestamp) from ``user, movie, rating, timestamp``; None when malformed.

    Ids are integers; the rating may be written ``5`` or ``5.0`` (it is not used, but must be a
    number); the timestamp is an integer or a float.
    """
    parts = [p.strip() for p in parts]
    if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    if _number(parts[2]) is None:
        return None
    ts = _number(parts[3])
    return None if ts is None else (parts[0], parts[1], ts)


def _title_fields(item: Item, raw_title: str, path, lineno, fallback_year=None):
    title, year = split_title(clean_text(raw_title, item.findings, path, lineno, "title"))
    if title and title.lower() != "unknown":
        item.fields["title"] = title
    else:
        item.findings.problem("empty title", path, lineno, f"title {raw_title!r}")
    year = year or fallback_year
    if year:
        item.fields["year"] = year


def _read_100k(folder: Path, data: SourceData, report: Report):
    ratings, movies = folder / "u.data", folder / "u.item"
    data.input_files += [ratings, movies]
    genre_path = folder / "u.genre"
    genres = list(GENRES_100K)
    if genre_path.is_file():
        data.input_files.append(genre_path)
        text = strip_bom(genre_path.read_text(encoding="latin-1"), 1)
        pairs = [ln.rsplit("|", 1) for ln in text.splitlines() if "|" in ln]
        try:
            by_index = {int(i): g for g, i in pairs}
            genres = [by_index[i] for i in range(len(by_index))]
        except (ValueError, KeyError):
            report.problem("malformed u.genre (built-in genre list used)", genre_path)
    with open(ratings, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = strip_bom(line, lineno)
            parts = line.split("\t")
            if not line.strip():
                continue
            rating = parse_rating(parts)
            if rating is None:
                report.problem("malformed rating line", ratings, lineno, line.strip()[:80])
                continue
            data.add_checked(report, *rating, ratings, lineno)
    with open(movies, encoding="latin-1") as fh:  # MovieLens files are latin-1, not utf-8
        for lineno, line in enumerate(fh, start=1):
            line = strip_bom(line, lineno)
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) != 5 + len(genres) or not parts[0].strip().isdigit():
                report.problem("malformed movie line", movies, lineno, line[:80])
                continue
            mid = parts[0].strip()
            if mid in data.item_info:
                report.problem("movie listed twice (later line skipped)", movies, lineno, f"movie {mid}")
                continue
            item = Item(origin=f"{movies}:{lineno}")
            date_year = parts[2].strip()[-4:] if re.search(r"\d{4}$", parts[2].strip()) else None
            _title_fields(item, parts[1], movies, lineno, date_year)
            flags = parts[5:]
            names = [g for g, f in zip(genres, flags) if f.strip() == "1" and g.lower() != "unknown"]
            if names:
                item.fields["genres"] = names
            data.item_info[mid] = item


def _read_1m(folder: Path, data: SourceData, report: Report):
    ratings, movies = folder / "ratings.dat", folder / "movies.dat"
    data.input_files += [ratings, movies]
    with open(ratings, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = strip_bom(line, lineno)
            if not line.strip():
                continue
            rating = parse_rating(line.strip().split("::"))
            if rating is None:
                report.problem("malformed rating line", ratings, lineno, line.strip()[:80])
                continue
            data.add_checked(report, *rating, ratings, lineno)
    _read_movies_dat(movies, data, report)


def _read_movies_dat(movies: Path, data: SourceData, report: Report):
    with open(movies, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = strip_bom(line, lineno)
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != 3 or not parts[0].isdigit():
                report.problem("malformed movie line", movies, lineno, line[:80])
                continue
            mid = parts[0]
            if mid in data.item_info:
                report.problem("movie listed twice (later line skipped)", movies, lineno, f"movie {mid}")
                continue
            item = Item(origin=f"{movies}:{lineno}")
            _title_fields(item, parts[1], movies, lineno)
            names = [g for g in parts[2].split("|") if g.strip() and g != "(no genres listed)"]
            if names:
                item.fields["genres"] = names
            data.item_info[mid] = item


ITEMS_TSV_COLUMNS = ("movie_id", "title", "genres")  # required; dbpedia_abstract and poster_is_placeholder optional


def _read_1m_sequences(folder: Path, data: SourceData, report: Report):
    """``sequences.txt``: ``user movie movie ...`` per user in time order, no timestamps (the position is
    the time, as for P5 files); items from ``items.tsv`` (title, genres, DBpedia abstract, placeholder
    posters flagged) when present, else ``movies.dat``."""
    sequences = folder / "sequences.txt"
    data.input_files.append(sequences)
    seen = set()
    for lineno, line, bad_utf8 in iter_lines(sequences, f"reading {sequences.name}", progress=False):
        parts = line.split()
        if not parts:
            continue
        if bad_utf8 or len(parts) < 2 or not all(p.isdigit() for p in parts):
            report.problem("malformed sequence line", sequences, lineno, bad_utf8 or line[:80])
            continue
        if parts[0] in seen:
            report.problem("user listed twice (later line skipped)", sequences, lineno, f"user {parts[0]}")
            continue
        seen.add(parts[0])
        for position, movie in enumerate(parts[1:]):
            data.add(parts[0], movie, float(position), f"{sequences}:{lineno}")
    items = folder / "items.tsv"
    if items.is_file():
        _read_items_tsv(items, data, report)
    else:
        data.input_files.append(folder / "movies.dat")
        _read_movies_dat(folder / "movies.dat", data, report)


def _read_items_tsv(path: Path, data: SourceData, report: Report):
    """Movies from ``items.tsv``; ``data.placeholders`` collects those whose poster only shows the title."""
    data.input_files.append(path)
    header = None
    for lineno, line, bad_utf8 in iter_lines(path, f"reading {path.name}", progress=False):
        cells = line.split("\t")
        if header is None:
            header = {name.strip(): i for i, name in enumerate(cells)}
            missing = [c for c in ITEMS_TSV_COLUMNS if c not in header]
            if missing:
                raise InputFileError(f"{path}:1: items.tsv needs columns {', '.join(ITEMS_TSV_COLUMNS)} "
                                     f"(tab-separated); missing {', '.join(missing)}")
            continue
        if not line.strip():
            continue
        mid = cells[header["movie_id"]].strip() if len(cells) == len(header) else ""
        if bad_utf8 or not mid.isdigit():
            report.problem("malformed movie line", path, lineno, bad_utf8 or line[:80])
            continue
        if mid in data.item_info:
            report.problem("movie listed twice (later line skipped)", path, lineno, f"movie {mid}")
            continue
        item = Item(origin=f"{path}:{lineno}")
        _title_fields(item, cells[header["title"]], path, lineno)
        names = [g for g in cells[header["genres"]].split("|") if g.strip() and g != "(no genres listed)"]
        if names:
            item.fields["genres"] = names
        abstract = cells[header["dbpedia_abstract"]].strip() if "dbpedia_abstract" in header else ""
        if abstract:
            item.fields["abstract"] = clean_text(abstract, item.findings, path, lineno, "abstract")
        if "poster_is_placeholder" in header and cells[header["poster_is_placeholder"]].strip() == "1":
            data.details.setdefault("placeholder_posters", []).append(mid)
        data.item_info[mid] = item


def read_overviews(path: Path, data: SourceData, report: Report):
    # surrogateescape keeps invalid bytes visible per row, so they are counted, not silently replaced.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        id_col = next((c for c in ("movie_id", "movieId", "item_id", "id") if c in cols), None)
        if id_col is None or "overview" not in cols:
            raise InputFileError(f"{path}:1: need a movie_id and an overview column, header is {cols}")
        seen: Dict[str, str] = {}
        for rec in reader:
            lineno = reader.line_num
            mid = (rec.get(id_col) or "").strip()
            if mid.endswith(".0"):
                mid = mid[:-2]
            if not mid:
                report.problem("overview row without movie id", path, lineno)
                continue
            overview = (rec.get("overview") or "").strip()
            if _SURROGATE.search(overview):
                report.problem("non-UTF-8 bytes in overview (replaced by U+FFFD)", path, lineno, f"movie {mid}")
                overview = _SURROGATE.sub("\ufffd", overview)
            if mid in seen:
                if overview == seen[mid]:
                    report.repair("duplicate overview row (identical, skipped)", path, lineno, f"movie {mid}")
                else:
                    report.problem("conflicting duplicate overview row (first kept)", path, lineno, f"movie {mid}")
                continue
            seen[mid] = overview
            item = data.item_info.get(mid)
            if item is None:
                report.problem("overview for a movie missing from the movie file", path, lineno, f"movie {mid}")
                continue
            if overview:
                item.fields["overview"] = clean_text(overview, item.findings, path, lineno, "overview")
            else:
                item.findings.problem("empty overview", path, lineno, f"movie {mid}")


def read_movielens(options: MovieLensOptions, report: Report, progress: bool = True) -> SourceData:
    folder = Path(options.input)
    posters = Path(options.posters) if options.posters else folder / "posters"
    posters = posters if options.use_posters and posters.is_dir() else None
    if options.posters and options.use_posters and posters is None:
        raise FileNotFoundError(f"{options.posters}: posters folder not found")
    overviews = Path(options.overviews) if options.overviews else folder / "items_tmdb.csv"
    overviews = overviews if options.use_overviews and overviews.is_file() else None
    if options.overviews and options.use_overviews and overviews is None:
        raise FileNotFoundError(f"{options.overviews}: overview CSV not found")

    data = SourceData(kind="movielens", input_files=[], has_images=posters is not None,
                      default_fields=[f for f in text_mod.MOVIELENS_FIELDS if f != "overview" or overviews])
    timestamps = "rating unix time; ties in file order"
    if (folder / "u.data").is_file() and (folder / "u.item").is_file():
        _read_100k(folder, data, report)
        variant = "100k"
    elif (folder / "ratings.dat").is_file() and (folder / "movies.dat").is_file():
        _read_1m(folder, data, report)
        variant = "1m"
    elif (folder / "sequences.txt").is_file() and ((folder / "items.tsv").is_file() or (folder / "movies.dat").is_file()):
        _read_1m_sequences(folder, data, report)
        variant, timestamps = "1m (sequences)", "position in sequences.txt (no timestamps in the file)"
        if (folder / "items.tsv").is_file():
            data.default_fields = [f for f in data.default_fields if f != "overview"] + ["abstract"]
    else:
        raise FileNotFoundError(f"{folder}: neither u.data + u.item (MovieLens 100k), ratings.dat + movies.dat "
                                f"(MovieLens 1M) nor sequences.txt + items.tsv or movies.dat (MovieLens 1M in time order)")
    if overviews is not None:
        data.input_files.append(overviews)
        read_overviews(overviews, data, report)
    if posters is not None:
        attach_posters(posters, data)
    data.details.update({"variant": variant, "posters": str(posters) if posters else None,
                         "overviews": str(overviews) if overviews else None, "timestamps": timestamps})
    return data


def attach_posters(posters: Path, data: SourceData):
    """``<posters>/<movie id>.<ext>`` per movie; a placeholder poster (only the title on it) counts as none."""
    placeholders = set(data.details.get("placeholder_posters", ()))
    for mid, item in data.item_info.items():
        if mid in placeholders:
            item.image, item.image_origin = None, f"{item.origin} (placeholder poster, only the title: not used)"
            continue
        item.image = find_image(posters, [mid]) or posters / f"{mid}.jpg"
        item.image_origin = item.origin
