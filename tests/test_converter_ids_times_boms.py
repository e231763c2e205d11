"""Converters write only what RecBole can read (issue 31, class 4): one test per case, through the CLI.

Policy (docs/resume-and-checks.md): an id RecBole's reader would split, unquote or read as missing
(a tab or line break, a leading double quote, ``NA``/``nan``/...) and a timestamp that is not a finite
number are *problems*: the interaction is skipped and counted in the conversion report with its
file:line, and ``--strict`` fails on the first one naming it. Nothing is escaped. A byte-order mark
in front of any input file is stripped: the conversion is byte for byte the one without it.

A refused case asserts exit status 2, the exact ``error:`` line, no dataset folder (nor lock) left
behind and the inputs byte-identical; an accepted one that the written ``.inter`` reads back through
RecBole's own reader (pandas, tab separated) as exactly the good interactions.
"""
import gzip
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from dataset_tools.cli import main as cli_main
from dataset_tools.lock import lock_path

QUIET = ["--text-encoder", "none", "--no-progress", "--quiet"]
BOM = "\ufeff"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ inputs in their real formats

def amazon_reviews(folder: Path, bad=None, bom=False) -> Path:
    """reviews_Cat_5.json (JSON lines; ``bad`` inserted as line 3) + meta_Cat.json.gz (2014 literals)."""
    folder.mkdir(parents=True)
    rows = [{"reviewerID": f"U{u}", "asin": f"B{k}", "unixReviewTime": 1_400_000_000 + 100 * k + u}
            for u in range(4) for k in range(3)]
    if bad is not None:
        rows.insert(2, bad)
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (folder / "reviews_Cat_5.json").write_text((BOM if bom else "") + text, encoding="utf-8")
    meta = [repr({"asin": a, "title": f"Item {a}"}) for a in ("B0", "B1", "B2", '"B9')]
    with gzip.open(folder / "meta_Cat.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(meta) + "\n")
    return folder


def amazon_ratings(folder: Path, bad: str = None, bom=False) -> Path:
    """ratings_Cat.csv (``user,item,rating,time``, no header; ``bad`` as line 3) + meta_Cat.json.gz."""
    folder.mkdir(parents=True)
    lines = [f"U{u},B{k},5.0,{1_400_000_000 + 100 * k + u}" for u in range(4) for k in range(3)]
    if bad is not None:
        lines.insert(2, bad)
    (folder / "ratings_Cat.csv").write_text((BOM if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(folder / "meta_Cat.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(repr({"asin": f"B{k}", "title": f"Item {k}"}) for k in range(3)) + "\n")
    return folder


def p5_folder(folder: Path, users=None, bom_seq=False, bom_maps=False) -> Path:
    """sequential_data.txt (``user item item ...``) + datamaps.json (id2user, id2item)."""
    folder.mkdir(parents=True)
    seq = "".join(f"{u} " + " ".join(str(1 + (u + k) % 3) for k in range(3)) + "\n" for u in range(1, 5))
    (folder / "sequential_data.txt").write_text((BOM if bom_seq else "") + seq, encoding="utf-8")
    id2user = {str(u): f"USER{u}" for u in range(1, 5)}
    id2user.update(users or {})
    maps = json.dumps({"id2user": id2user, "id2item": {str(i): f"ASIN{i}" for i in range(1, 4)}})
    (folder / "datamaps.json").write_text((BOM if bom_maps else "") + maps, encoding="utf-8")
    return folder


def ml100k(folder: Path, bad: str = None, bom_data=False, bom_item=False) -> Path:
    """u.data (``user\\tmovie\\trating\\ttime``; ``bad`` as line 2) + u.item (``|``-separated, 19 genre flags)."""
    folder.mkdir(parents=True)
    lines = [f"{u}\t{m}\t{1 + (u + m) % 5}\t{881_250_000 + 10 * m + u}" for u in range(1, 5) for m in range(1, 4)]
    if bad is not None:
        lines.insert(1, bad)
    (folder / "u.data").write_text((BOM if bom_data else "") + "\n".join(lines) + "\n", encoding="utf-8")
    flags = "|".join("1" if g == 1 else "0" for g in range(19))
    items = "".join(f"{m}|Movie {m} (1995)|01-Jan-1995||http://x|{flags}\n" for m in range(1, 4))
    (folder / "u.item").write_text((BOM if bom_item else "") + items, encoding="utf-8")
    return folder


def ml1m(folder: Path, bom_ratings=False, bom_movies=False, bom_overviews=False) -> Path:
    """ratings.dat + movies.dat (``::``-separated) + items_tmdb.csv (movie_id, overview)."""
    folder.mkdir(parents=True)
    lines = [f"{u}::{m}::{1 + (u + m) % 5}::{978_300_000 + 10 * m + u}" for u in range(1, 5) for m in range(1, 4)]
    (folder / "ratings.dat").write_text((BOM if bom_ratings else "") + "\n".join(lines) + "\n", encoding="utf-8")
    movies = "1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n3::Casino (1995)::Drama\n"
    (folder / "movies.dat").write_text((BOM if bom_movies else "") + movies, encoding="utf-8")
    overviews = "movie_id,overview\n1,toys come alive\n2,a heist\n3,las vegas\n"
    (folder / "items_tmdb.csv").write_text((BOM if bom_overviews else "") + overviews, encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------ running and reading back

def convert(capsys, fmt: str, inp: Path, out: Path, *extra):
    """(exit code, stderr lines) of one conversion into ``out/x``."""
    code = cli_main([fmt, "--input", str(inp), "--output", str(out), "--name", "x", "--kcore", "0", *QUIET, *extra])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def refused(capsys, fmt: str, inp: Path, out: Path, *extra) -> str:
    """The one ``error:`` line of a refused conversion; nothing written, the inputs unchanged."""
    before = snapshot(inp)
    code, err = convert(capsys, fmt, inp, out, *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (out / "x").exists() and not lock_path(out, "x").exists() and not out.exists()
    assert snapshot(inp) == before
    return err[0]


def problems(out: Path) -> dict:
    report = json.loads((out / "x" / "meta.json").read_text(encoding="utf-8"))["report"]
    return {reason: (entry["count"], entry["examples"]) for reason, entry in report["problems"].items()}


def recbole_reads(out: Path) -> list:
    """(user, item) pairs of ``x.inter`` as RecBole's reader sees them (its pandas call, every column text)."""
    df = pd.read_csv(out / "x" / "x.inter", delimiter="\t", dtype=str, engine="python")
    assert list(df.columns) == ["user_id:token", "item_id:token", "timestamp:float"]
    assert not df.isna().any().any(), df[df.isna().any(axis=1)]
    assert all(float(t) == float(t) and abs(float(t)) != float("inf") for t in df["timestamp:float"])
    return sorted(zip(df["user_id:token"], df["item_id:token"]))


GOOD_AMAZON = sorted((f"U{u}", f"B{k}") for u in range(4) for k in range(3))


# ------------------------------------------------------------------------------ ids

BAD_IDS = [  # (review at line 3, reason, the report's detail)
    ({"reviewerID": "U\tX", "asin": "B0"}, "user id with a tab or line break", "user 'U\\tX'"),
    ({"reviewerID": "U\nX", "asin": "B1"}, "user id with a tab or line break", "user 'U\\nX'"),
    ({"reviewerID": "U1", "asin": '"B9'}, "item id starting with a double quote", "item '\"B9'"),
    ({"reviewerID": "NA", "asin": "B1"}, "user id read as missing by RecBole's reader", "user 'NA'"),
    ({"reviewerID": "U1", "asin": "nan"}, "item id read as missing by RecBole's reader", "item 'nan'"),
]


@pytest.mark.parametrize("bad, reason, detail", BAD_IDS, ids=["tab", "newline", "quote", "NA", "nan"])
def test_an_id_recbole_cannot_read_is_counted_and_skipped(tmp_path, capsys, bad, reason, detail):
    """Before: written as it is (a tab split the row into 4 columns, a newline into 2 rows, a quote opened
    a quoted field, ``NA`` became padding), uncounted, exit 0."""
    inp = amazon_reviews(tmp_path / "in", {**bad, "unixReviewTime": 1_400_000_009})
    code, err = convert(capsys, "amazon", inp, tmp_path / "out")
    assert code == 0 and err == []
    assert problems(tmp_path / "out") == {reason: (1, [f"{inp / 'reviews_Cat_5.json'}:3: {detail}"])}
    assert recbole_reads(tmp_path / "out") == GOOD_AMAZON


@pytest.mark.parametrize("bad, reason, detail", BAD_IDS, ids=["tab", "newline", "quote", "NA", "nan"])
def test_strict_refuses_an_id_recbole_cannot_read_naming_file_and_line(tmp_path, capsys, bad, reason, detail):
    inp = amazon_reviews(tmp_path / "in", {**bad, "unixReviewTime": 1_400_000_009})
    line = refused(capsys, "amazon", inp, tmp_path / "out", "--strict")
    assert line == f"error: {inp / 'reviews_Cat_5.json'}:3: {reason}: {detail} (strict mode)"


def test_a_ratings_csv_id_with_a_tab_is_refused_in_strict_mode(tmp_path, capsys):
    inp = amazon_ratings(tmp_path / "in", "U\tX,B1,5.0,1400000009")
    line = refused(capsys, "amazon", inp, tmp_path / "out", "--strict")
    assert line == f"error: {inp / 'ratings_Cat.csv'}:3: user id with a tab or line break: user 'U\\tX' (strict mode)"


def test_a_p5_user_id_with_a_tab_skips_its_line_once(tmp_path, capsys):
    """datamaps.json maps user 2 to an id with a tab: its sequence line is one problem, not one per item."""
    inp = p5_folder(tmp_path / "in", users={"2": "US\tER2"})
    code, err = convert(capsys, "p5", inp, tmp_path / "out")
    assert code == 0 and err == []
    seq = inp / "sequential_data.txt"
    assert problems(tmp_path / "out") == {"user id with a tab or line break": (1, [f"{seq}:2: user 'US\\tER2'"])}
    assert {u for u, _ in recbole_reads(tmp_path / "out")} == {"USER1", "USER3", "USER4"}


def test_strict_refuses_a_p5_user_id_with_a_tab(tmp_path, capsys):
    inp = p5_folder(tmp_path / "in", users={"2": "US\tER2"})
    line = refused(capsys, "p5", inp, tmp_path / "out", "--strict")
    assert line == (f"error: {inp / 'sequential_data.txt'}:2: user id with a tab or line break: user 'US\\tER2' "
                    f"(strict mode)")


# ------------------------------------------------------------------------------ timestamps

BAD_TIMES = [(float("nan"), "non-finite timestamp", "nan"), ("inf", "non-finite timestamp", "'inf'"),
             ("-Infinity", "non-finite timestamp", "'-Infinity'"), ("abc", "unparsable timestamp", "'abc'")]


@pytest.mark.parametrize("stamp, reason, detail", BAD_TIMES, ids=["NaN", "inf", "-Infinity", "abc"])
def test_a_review_time_that_is_not_a_finite_number_is_counted(tmp_path, capsys, stamp, reason, detail):
    """Before: NaN and "inf" were written into the .inter as ``nan``/``inf``, uncounted, exit 0."""
    inp = amazon_reviews(tmp_path / "in", {"reviewerID": "U9", "asin": "B1", "unixReviewTime": stamp})
    code, err = convert(capsys, "amazon", inp, tmp_path / "out")
    assert code == 0 and err == []
    assert problems(tmp_path / "out") == {reason: (1, [f"{inp / 'reviews_Cat_5.json'}:3: {detail}"])}
    assert recbole_reads(tmp_path / "out") == GOOD_AMAZON


@pytest.mark.parametrize("stamp, reason, detail", BAD_TIMES, ids=["NaN", "inf", "-Infinity", "abc"])
def test_strict_refuses_a_review_time_that_is_not_a_finite_number(tmp_path, capsys, stamp, reason, detail):
    inp = amazon_reviews(tmp_path / "in", {"reviewerID": "U9", "asin": "B1", "unixReviewTime": stamp})
    line = refused(capsys, "amazon", inp, tmp_path / "out", "--strict")
    assert line == f"error: {inp / 'reviews_Cat_5.json'}:3: {reason}: {detail} (strict mode)"


def test_strict_refuses_a_ratings_csv_time_inf(tmp_path, capsys):
    inp = amazon_ratings(tmp_path / "in", "U9,B1,5.0,inf")
    line = refused(capsys, "amazon", inp, tmp_path / "out", "--strict")
    assert line == f"error: {inp / 'ratings_Cat.csv'}:3: non-finite timestamp: 'inf' (strict mode)"


def test_strict_refuses_a_movielens_time_inf(tmp_path, capsys):
    inp = ml100k(tmp_path / "in", bad="1\t3\t4\tinf")
    line = refused(capsys, "movielens", inp, tmp_path / "out", "--strict")
    assert line == f"error: {inp / 'u.data'}:2: malformed rating line: 1 3 4 inf (strict mode)"


# ------------------------------------------------------------------------------ byte-order marks

BOM_CASES = [  # (format, writer, the keyword that puts a BOM in front of one file)
    ("amazon", amazon_reviews, "bom"),
    ("amazon", amazon_ratings, "bom"),
    ("p5", p5_folder, "bom_seq"),
    ("p5", p5_folder, "bom_maps"),  # before: refused, "Unexpected UTF-8 BOM"
    ("movielens", ml100k, "bom_data"),  # before: line 1 lost as a malformed rating line
    ("movielens", ml100k, "bom_item"),  # before: movie 1 lost as a malformed movie line
    ("movielens", ml1m, "bom_ratings"),  # before: line 1 lost
    ("movielens", ml1m, "bom_movies"),  # before: movie 1 lost
    ("movielens", ml1m, "bom_overviews"),  # before: refused, header '\ufeffmovie_id'
]


@pytest.mark.parametrize("fmt, writer, keyword", BOM_CASES,
                         ids=["amazon-reviews", "amazon-ratings", "p5-sequences", "p5-datamaps", "ml100k-u.data",
                              "ml100k-u.item", "ml1m-ratings", "ml1m-movies", "ml1m-overviews"])
def test_a_byte_order_mark_changes_nothing(tmp_path, capsys, fmt, writer, keyword):
    """The conversion of a file with a BOM is byte for byte the one without it, with no problem counted."""
    results = {}
    for bom in (False, True):
        inp = writer(tmp_path / f"in-{bom}", **{keyword: bom})
        out = tmp_path / f"out-{bom}"
        code, err = convert(capsys, fmt, inp, out)
        assert code == 0 and err == []
        assert problems(out) == {}
        results[bom] = {name: (out / "x" / name).read_bytes() for name in ("x.inter", "x.item", "x.item_ids")}
    assert results[True] == results[False]


def test_features_reads_an_item_file_with_a_byte_order_mark(tmp_path):
    """``features`` reads the .item through read_item_file: a BOM must not become part of ``item_id``."""
    from dataset_tools.recbole_files import read_item_file

    text = "item_id:token\ttitle:token_seq\n1\tToy Story\n2\tHeat\n"
    (tmp_path / "plain.item").write_text(text, encoding="utf-8")
    (tmp_path / "bom.item").write_text(BOM + text, encoding="utf-8")
    plain, bom = read_item_file(tmp_path / "plain.item"), read_item_file(tmp_path / "bom.item")
    assert (bom.tokens, bom.fields) == (plain.tokens, plain.fields) == (["1", "2"], {"title": ["Toy Story", "Heat"]})


# ------------------------------------------------------------------------------ options and empty tables

def test_a_negative_kcore_is_refused_by_the_parser(tmp_path, capsys):
    """Before: ``--kcore -3`` silently disabled the filter."""
    inp = amazon_reviews(tmp_path / "in")
    before = snapshot(inp)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["amazon", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "x", "--kcore", "-3",
                  *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("python -m dataset_tools amazon: error: argument --kcore: '-3': need an integer >= 0 "
                       "(0 or 1 keeps every interaction)")
    assert not (tmp_path / "out").exists() and snapshot(inp) == before


def test_features_on_a_header_only_item_file_is_refused(tmp_path, capsys):
    """Before: a 0-row feature table was written, exit 0."""
    folder = tmp_path / "data" / "h"
    folder.mkdir(parents=True)
    (folder / "h.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1.0\n")
    (folder / "h.item").write_text("item_id:token\ttitle:token_seq\n")
    before = snapshot(folder)
    code = cli_main(["features", "--data-path", str(tmp_path / "data"), "--dataset", "h", "--encoder", "minilm",
                     "--no-progress", "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err == [f"error: {folder / 'h.item'}: no item rows (only a header): nothing to build features for"]
    assert snapshot(folder) == before


def test_a_converted_dataset_too_small_to_split_is_refused_before_training(tmp_path, capsys):
    """Every user has 2 reviews: the conversion succeeds, training refuses with the reason (before: an
    IndexError for a one-interaction dataset). Nothing is written: no checkpoint, the dataset unchanged."""
    import run_recbole_fmrl

    inp = tmp_path / "in"
    inp.mkdir()
    rows = [{"reviewerID": f"U{u}", "asin": f"B{(u + k) % 12}", "unixReviewTime": 1_400_000_000 + k}
            for u in range(10) for k in range(2)]
    (inp / "reviews_Cat_5.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with gzip.open(inp / "meta_Cat.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(repr({"asin": f"B{k}", "title": f"Item {k}"}) for k in range(12)) + "\n")
    code, err = convert(capsys, "amazon", inp, tmp_path / "data")
    assert code == 0 and err == []
    before = snapshot(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run_recbole_fmrl.main(["--model", "BPR", "--dataset", "x", f"data_path={tmp_path / 'data'}",
                               f"fmrl_output_dir={tmp_path / 'runs'}", "use_gpu=False", "topk=[5]",
                               "valid_metric=NDCG@5", "epochs=1", "state=ERROR"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    folder = (tmp_path / "data" / "x").resolve()
    assert err == [f"error: dataset x ({folder}) is too small to split: eval_args split LS valid_and_test holds out "
                   f"each user's last 2 sample(s), so some user needs at least 3 interactions (one left to train "
                   f"on); the most any of its 10 users has is 2 (20 interactions in all, after RecBole's filters) "
                   f"(--debug shows the traceback)"]
    assert snapshot(tmp_path / "data") == before and not (tmp_path / "runs" / "saved").exists()
