"""dataset_tools readers, filters and atomic outputs on tiny fixtures in each real format.

Encoders are off here (see test_dataset_tools_features.py); these tests take a few seconds.
"""
import gzip
import json
import os
import shutil
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from dataset_tools import amazon, kcore, movielens, p5, pipeline
from dataset_tools.cli import main as cli_main
from dataset_tools.report import BadInputError, Report
from dataset_tools.text import item_text

FIX = Path(__file__).resolve().parent / "fixtures" / "dataset_tools"


def read_inter(folder, name):
    lines = (Path(folder) / f"{name}.inter").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    return [tuple(line.split("\t")) for line in lines[1:]]


def convert(source, tmp_path, name="ds", report=None, **kw):
    report = report or Report()
    kw.setdefault("missing_text", "drop")  # these tests pin the drop policy; without an encoder the default is keep
    opts = pipeline.ConvertOptions(output=tmp_path, name=name, progress=False, **kw)
    return pipeline.convert(source, opts, report), report


# ------------------------------------------------------------------------------ k-core

def brute_force_kcore(pairs, k):
    """Definition-level k-core: repeatedly delete any user or item with < k interactions."""
    pairs = list(pairs)
    while True:
        users, items = {}, {}
        for u, i in pairs:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        kept = [(u, i) for u, i in pairs if users[u] >= k and items[i] >= k]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


@pytest.mark.parametrize("seed,k", list(product(range(6), [1, 2, 3, 5])))
def test_kcore_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    u = rng.integers(0, rng.integers(3, 40), size=n)
    i = rng.zipf(1.6, size=n) % 50  # long tail: cascades of removals
    keep, passes = kcore.kcore_mask(u, i, k, progress=False)
    assert sorted(zip(u[keep].tolist(), i[keep].tolist())) == sorted(brute_force_kcore(zip(u.tolist(), i.tolist()), k))
    if k > 1 and keep.any():
        assert np.bincount(u[keep]).max() >= k
        assert (np.bincount(u[keep])[np.unique(u[keep])] >= k).all()
        assert (np.bincount(i[keep])[np.unique(i[keep])] >= k).all()


def test_kcore_cascade_needs_several_passes():
    # A chain u_j -> (i_j, i_j+1): the end items have one interaction each, and removing them
    # starves the next user, then the next item... so one pass would keep rows a 2-core forbids.
    u = np.repeat(np.arange(6), 2)
    i = np.stack([np.arange(6), np.arange(1, 7)], axis=1).ravel()
    keep, passes = kcore.kcore_mask(u, i, 2, progress=False)
    assert passes >= 3 and not keep.any()
    assert brute_force_kcore(zip(u, i), 2) == []
    # A 2-core block attached to the chain survives.
    u2 = np.concatenate([u, [10, 10, 11, 11]])
    i2 = np.concatenate([i, [20, 21, 20, 21]])
    keep, _ = kcore.kcore_mask(u2, i2, 2, progress=False)
    assert sorted(zip(u2[keep].tolist(), i2[keep].tolist())) == [(10, 20), (10, 21), (11, 20), (11, 21)]


# ------------------------------------------------------------------------------ report

def test_report_counts_examples_and_strict():
    r = Report(max_examples=2)
    for line in range(1, 5):
        r.problem("malformed line", "f.txt", line, "x")
    r.repair("HTML entity unescaped in title", "m.json", 3)
    d = r.to_dict()
    assert d["problems"]["malformed line"]["count"] == 4
    assert d["problems"]["malformed line"]["examples"] == ["f.txt:1: x", "f.txt:2: x"]
    assert d["repairs"]["HTML entity unescaped in title"]["count"] == 1
    assert "f.txt:1" in r.format()
    strict = Report(strict=True)
    strict.repair("HTML entity unescaped in title", "m.json", 3)  # repairs never fail
    with pytest.raises(BadInputError, match=r"f\.txt:7: malformed line"):
        strict.problem("malformed line", "f.txt", 7)


# ------------------------------------------------------------------------------ P5

def test_p5_reader_reports_bad_lines_and_keeps_order():
    report = Report()
    src = p5.read_p5(p5.P5Options(FIX / "p5"), report, progress=False)
    seq = FIX / "p5" / "sequential_data.txt"
    probs = report.to_dict()["problems"]
    assert probs["item id missing from datamaps"]["examples"] == [f"{seq}:5: item 99"]
    assert probs["malformed sequence line"]["examples"][0].startswith(f"{seq}:6:")
    assert probs["user listed twice (later line skipped)"]["examples"] == [f"{seq}:8: user 2"]
    assert probs["malformed metadata line"]["count"] == 1
    # Positions are the time; tokens are the raw reviewer ids / asins.
    first = [(u, i, t) for u, i, t in zip(src.users, src.items, src.times) if u == "AUSER01"]
    assert first == [("AUSER01", f"B0000000{k:02d}", float(p)) for p, k in enumerate([1, 2, 3, 4, 5])]
    # Items in P5 id order; item 11 has no metadata row, so it is absent here.
    assert list(src.item_info)[:3] == ["B000000001", "B000000002", "B000000003"]
    assert "B000000011" not in src.item_info


def test_p5_convert_atomic_files(tmp_path):
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    meta, report = convert(src, tmp_path, name="beauty", kcore=2)
    folder = tmp_path / "beauty"
    inter = read_inter(folder, "beauty")
    ids = (folder / "beauty.item_ids").read_text().splitlines()
    # .item_ids are exactly the item tokens of .inter, and of .item in the same order.
    assert set(ids) == {i for _, i, _ in inter}
    item_rows = (folder / "beauty.item").read_text().splitlines()
    assert item_rows[0].startswith("item_id:token\ttitle:token_seq\tprice:float\tbrand:token\tcategories:token_seq")
    assert [r.split("\t")[0] for r in item_rows[1:]] == ids
    # Item 11 has no metadata -> dropped (and reported at its first interaction).
    assert "B000000011" not in ids
    no_meta = report.to_dict()["problems"]["item without metadata"]
    assert no_meta["count"] == 1 and "sequential_data.txt:4" in no_meta["examples"][0]
    # Empty title of item 4 (used) is reported at its metadata line.
    assert report.to_dict()["problems"]["empty title"]["examples"][0].startswith(str(FIX / "p5" / "meta.json"))
    # Stats are those of the files.
    users = {u for u, _, _ in inter}
    assert meta["stats"]["users"] == len(users) and meta["stats"]["items"] == len(ids)
    assert meta["stats"]["interactions"] == len(inter)
    assert meta["stats"]["density"] == pytest.approx(len(inter) / (len(users) * len(ids)))
    # 2-core holds on the output, and equals the brute-force core of the pre-k-core interactions.
    pre = [(u, i) for u, i in zip(src.users, src.items) if i in src.item_info]
    assert sorted((u, i) for u, i, _ in inter) == sorted(brute_force_kcore(set(pre), 2))
    # Each user's rows are in time order; P5 positions survive as timestamps.
    by_user = {}
    for u, _i, t in inter:
        by_user.setdefault(u, []).append(float(t))
    assert all(ts == sorted(ts) for ts in by_user.values())
    # HTML entities unescaped; a quote in a title survives RecBole's CSV quoting.
    text = (folder / "beauty.item").read_text()
    assert "Rose Lip Balm & Tint" in text and "&amp;" not in text
    assert '"Toner ""Fresh"" 200ml"' in text
    pipeline.verify_dataset(folder, "beauty")


def test_p5_numeric_ids_and_images(tmp_path):
    import pickle

    from PIL import Image
    inp = tmp_path / "p5"
    shutil.copytree(FIX / "p5", inp)
    photos = tmp_path / "photos"
    photos.mkdir()
    mapping = {}
    for k in range(1, 11):
        asin = f"B0000000{k:02d}"
        mapping[asin] = f"beauty/img_{k}.jpg"
        if k != 3:
            Image.new("RGB", (8, 8), (k, k, k)).save(photos / f"img_{k}.jpg")
    (inp / "item2img_dict.pkl").write_bytes(pickle.dumps(mapping))
    report = Report()
    src = p5.read_p5(p5.P5Options(inp, images=photos, raw_ids=False), report, progress=False)
    meta, report = convert(src, tmp_path / "out", name="b", kcore=1, missing_image="zero", report=report)
    # img_3 is missing and item 12 has no entry in item2img_dict.pkl: the zero policy keeps both.
    assert meta["stats"]["items"] == 11 and meta["stats"]["images"] == 9
    missing = report.to_dict()["problems"]["missing image"]
    assert missing["count"] == 2 and "item 3" in missing["examples"][0]
    inter = read_inter(tmp_path / "out" / "b", "b")
    assert inter[0][:2] == ("1", "1")


def test_p5_pickle_with_code_is_refused(tmp_path):
    inp = tmp_path / "p5"
    shutil.copytree(FIX / "p5", inp)
    (inp / "item2img_dict.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    (tmp_path / "photos").mkdir()
    with pytest.raises(ValueError, match="refusing to load"):
        p5.read_p5(p5.P5Options(inp, images=tmp_path / "photos"), Report(), progress=False)


def test_p5_strict_names_file_and_line(tmp_path, capsys):
    code = cli_main(["p5", "--input", str(FIX / "p5"), "--output", str(tmp_path), "--name", "x", "--strict",
                     "--text-encoder", "none", "--no-progress", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{FIX / 'p5' / 'sequential_data.txt'}:5: item id missing from datamaps" in err
    assert not (tmp_path / "x" / "meta.json").exists()


# ------------------------------------------------------------------------------ Amazon

def test_amazon_2014_gz_ties_keep_file_order(tmp_path):
    for name in ("reviews_Tiny_5.json", "meta_Tiny.json"):
        with open(FIX / "amazon2014" / name, "rb") as src, gzip.open(tmp_path / f"{name}.gz", "wb") as dst:
            dst.write(src.read())
    report = Report()
    src = amazon.read_amazon(amazon.AmazonOptions(tmp_path / "reviews_Tiny_5.json.gz",
                                                  tmp_path / "meta_Tiny.json.gz"), report, progress=False)
    probs = report.to_dict()["problems"]
    assert probs["malformed review line"]["examples"][0].startswith(f"{tmp_path / 'reviews_Tiny_5.json.gz'}:4")
    assert probs["review without unixReviewTime"]["count"] == 1
    assert probs["malformed metadata line"]["examples"][0].startswith(f"{tmp_path / 'meta_Tiny.json.gz'}:3")
    # A Python-literal review line (loose 2014 format) was read too.
    assert len(src.users) == 39 - 2
    meta, report = convert(src, tmp_path, name="a14", kcore=1, report=report)
    inter = read_inter(tmp_path / "a14", "a14")
    tie = [i for u, i, _ in inter if u == "R14TIE"]
    # Same-second reviews stay in file order (5, 2, 4) instead of item-id order (2, 4, 5).
    assert tie == ["A14ITEM1", "A14ITEM5", "A14ITEM2", "A14ITEM4", "A14ITEM3"]
    # The repeated pair (R14USER1, A14ITEM1) keeps its first occurrence only.
    assert sum(1 for u, i, _ in inter if (u, i) == ("R14USER1", "A14ITEM1")) == 1
    d = report.to_dict()
    assert d["repairs"]["repeated user-item pair (first kept)"]["count"] == 1
    assert d["problems"]["item without metadata"]["count"] == 1  # A14NOMETA
    assert d["problems"]["empty title"]["count"] == 1  # A14ITEM4 only; A14UNUSED is never reviewed
    item = (tmp_path / "a14" / "a14.item").read_text()
    assert "Sunscreen SPF 50 & more\t15.5\tSunCo\tBeauty Skin_Care Sun" in item


def test_amazon_2018_fields():
    report = Report()
    src = amazon.read_amazon(amazon.AmazonOptions(FIX / "amazon2018" / "Tiny_5.json",
                                                  FIX / "amazon2018" / "meta_Tiny.json"), report, progress=False)
    info = src.item_info
    assert info["B18ITEM1"].fields == {"title": "Serum Vitamin C & E", "price": "12.99", "brand": "Glow",
                                       "categories": ["Beauty & Personal Care", "Skin Care", "Face"]}
    assert info["B18ITEM2"].fields["price"] == "5.99"
    assert info["B18ITEM5"].fields["price"] == "1299.0"
    assert "price" not in info["B18ITEM3"].fields and "categories" not in info["B18ITEM3"].fields
    assert "brand" not in info["B18ITEM4"].fields
    # Row 6 repeats B18ITEM1 with other values: a conflict is a problem (the first row is kept).
    assert report.to_dict()["problems"]["conflicting duplicate metadata row (first kept)"]["count"] == 1
    sink = Report()
    info["B18ITEM3"].findings.replay(sink)
    assert sink.to_dict()["problems"]["unparseable price"]["count"] == 1
    assert item_text(info["B18ITEM1"].fields, ["title", "price", "brand", "categories"]) == (
        "Title: Serum Vitamin C & E\nPrice: 12.99\nBrand: Glow\nCategories: Beauty & Personal Care, Skin Care, Face")


def test_amazon_ratings_csv_folder_detection(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(FIX / "amazon_csv" / "ratings_Tiny.csv", inp)
    shutil.copy(FIX / "amazon2014" / "meta_Tiny.json", inp)
    code = cli_main(["amazon", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "r",
                     "--kcore", "3", "--text-encoder", "none", "--no-progress", "--quiet"])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "r" / "meta.json").read_text())
    problems = meta["report"]["problems"]
    assert problems["malformed rating line"]["count"] == 1 and problems["unparsable timestamp"]["count"] == 1
    inter = read_inter(tmp_path / "out" / "r", "r")
    users = {}
    items = {}
    for u, i, _ in inter:
        users[u] = users.get(u, 0) + 1
        items[i] = items.get(i, 0) + 1
    assert min(users.values()) >= 3 and min(items.values()) >= 3


# ------------------------------------------------------------------------------ MovieLens

def test_movielens_100k_titles_overviews_and_report(tmp_path):
    report = Report()
    src = movielens.read_movielens(movielens.MovieLensOptions(FIX / "ml100k", use_posters=False), report)
    info = src.item_info
    assert info["3"].fields["title"] == "The Usual Suspects" and info["3"].fields["year"] == "1995"
    assert info["4"].fields["title"] == "La Cité des enfants perdus"
    assert info["9"].fields["title"] == "Seven (Se7en)"
    assert info["7"].fields["year"] == "1996"
    assert info["1"].fields["genres"] == ["Animation", "Children's", "Comedy"]
    assert "title" not in info["6"].fields and "genres" not in info["6"].fields
    assert info["3"].fields["overview"] == "A boat has been destroyed & criminals are dead."
    assert info["5"].fields["overview"].startswith("Obsessive")
    d = report.to_dict()
    assert d["problems"]["malformed movie line"]["examples"][0].startswith(f"{FIX / 'ml100k' / 'u.item'}:6")
    assert d["problems"]["malformed rating line"]["count"] == 2
    assert d["problems"]["conflicting duplicate overview row (first kept)"]["count"] == 1
    assert d["repairs"]["duplicate overview row (identical, skipped)"]["count"] == 1
    assert d["problems"]["overview for a movie missing from the movie file"]["count"] == 1
    meta, report = convert(src, tmp_path, name="ml", kcore=1, report=report)
    assert report.to_dict()["problems"]["empty title"]["count"] == 1  # movie 6, "unknown"
    assert report.to_dict()["problems"]["empty overview"]["count"] == 1  # movie 7
    # Movie 6 ("unknown", no date, no genre, no overview) has no text at all and is dropped.
    assert report.to_dict()["problems"]["item without text"]["examples"][0].startswith(f"{FIX / 'ml100k' / 'u.item'}:")
    assert meta["stats"]["items"] == 8 and meta["stats"]["images"] == 0
    text = item_text(src.item_info["3"].fields, ["title", "year", "genres", "overview"])
    assert text.startswith("Title: The Usual Suspects\nYear: 1995\nGenres: Crime, Thriller\nOverview: A boat")


def test_movielens_100k_tie_break_is_file_order(tmp_path):
    src = movielens.read_movielens(movielens.MovieLensOptions(FIX / "ml100k", use_posters=False,
                                                              use_overviews=False), Report())
    convert(src, tmp_path, name="ml", kcore=1)
    inter = read_inter(tmp_path / "ml", "ml")
    pos = {(u, i): n for n, (u, i) in enumerate(zip(src.users, src.items))}
    for a, b in zip(inter, inter[1:]):
        if a[0] == b[0] and float(a[2]) == float(b[2]):
            assert pos[(a[0], a[1])] < pos[(b[0], b[1])]  # never item-id order


def test_movielens_1m(tmp_path):
    report = Report()
    src = movielens.read_movielens(movielens.MovieLensOptions(FIX / "ml1m"), report)
    assert report.to_dict()["problems"]["malformed movie line"]["count"] == 1
    assert report.to_dict()["problems"]["malformed rating line"]["examples"][0].startswith(
        f"{FIX / 'ml1m' / 'ratings.dat'}:7")
    assert src.item_info["2"].fields == {"title": "Jumanji", "year": "1995",
                                         "genres": ["Adventure", "Children's", "Fantasy"]}
    meta, _ = convert(src, tmp_path, name="m1", kcore=3)
    assert meta["stats"]["interactions"] == len(read_inter(tmp_path / "m1", "m1"))


def test_missing_text_keep_policy(tmp_path):
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    meta, _ = convert(src, tmp_path, name="k", kcore=1, missing_text="keep")
    ids = (tmp_path / "k" / "k.item_ids").read_text().splitlines()
    assert "B000000011" in ids  # kept with the placeholder text


# ------------------------------------------------------------------------------ reruns and interruption

def test_rerun_rewrites_nothing(tmp_path):
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    convert(src, tmp_path, name="r", kcore=2)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "r").iterdir() if p.name != "meta.json"}
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    convert(src, tmp_path, name="r", kcore=2)
    for p, (mtime, data) in files.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    pipeline.verify_dataset(tmp_path / "r", "r")


def test_interrupted_write_leaves_no_valid_looking_output(tmp_path, monkeypatch):
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    convert(src, tmp_path, name="i", kcore=2)
    pipeline.verify_dataset(tmp_path / "i", "i")
    # Second run with other options dies half-way through writing the .item file.
    from recbole_fmrl import atomic_write
    calls = {"n": 0}
    real_write_text = atomic_write.write_text

    def write_text(target, text):
        calls["n"] += 1
        if calls["n"] == 2:  # the .item file
            with atomic_write.atomic_path(target) as tmp:
                Path(tmp).write_text(text[: len(text) // 2])
                raise KeyboardInterrupt
        return real_write_text(target, text)

    monkeypatch.setattr(atomic_write, "write_text", write_text)
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path, name="i", kcore=1)
    folder = tmp_path / "i"
    assert not (folder / "meta.json").exists()
    with pytest.raises(pipeline.DatasetIncomplete):
        pipeline.verify_dataset(folder, "i")
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    # The old .item is intact (the half-written one never replaced it).
    assert (folder / "i.item").read_text().count("\n") > 5
    monkeypatch.setattr(atomic_write, "write_text", real_write_text)
    convert(p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False), tmp_path, name="i", kcore=1)
    pipeline.verify_dataset(folder, "i")


def test_inputs_are_never_modified(tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in FIX.rglob("*") if p.is_file()}
    for fmt, extra in (("p5", []), ("movielens", ["--no-posters"])):
        inp = FIX / ("p5" if fmt == "p5" else "ml100k")
        assert cli_main([fmt, "--input", str(inp), "--output", str(tmp_path), "--name", fmt, "--kcore", "2",
                         "--text-encoder", "none", "--no-progress", "--quiet"] + extra) == 0
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in FIX.rglob("*") if p.is_file()}
    assert before == after


def test_cli_runs_as_module(tmp_path):
    import subprocess
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "dataset_tools", "movielens", "--input", str(FIX / "ml1m"),
                          "--output", str(tmp_path), "--name", "m", "--kcore", "2", "--text-encoder", "none",
                          "--no-progress"], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "malformed movie line" in out.stdout and "interactions" in out.stdout
