"""Deploy edges (issue 31, class 6), one test per case through the command line: result keys never
overwrite request keys, topk >= 1, a funnel that cannot return k says so, file:line for every bad
JSON-lines line, --debug for every subcommand, the manifest verifies every file it lists, and
--output never replaces the input or an existing file unless told to.
"""
import json

import pytest
from conftest import write_tiny_dataset

import run_recbole_fmrl
from recbole_fmrl.deploy import Recommender, artifact
from recbole_fmrl.deploy.export import export_sizes
from recbole_fmrl.errors import InputError
from recbole_fmrl.train.driver import run


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Exported sizes 8 and 16 of a one-epoch run on the tiny dataset (ID items, 30 items)."""
    root = tmp_path_factory.mktemp("edges")
    write_tiny_dataset(root / "data", "tiny", with_image=False)
    cfg = {"data_path": str(root / "data"), "fmrl_output_dir": str(root / "runs"), "fmrl_cache_dir": str(root / "cache"),
           "hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
           "show_progress": False, "use_gpu": False, "state": "ERROR", "topk": [5, 10], "MAX_ITEM_LIST_LENGTH": 20,
           "seed": 7, "fmrl_modality": "id"}
    result = run("FMRLRec", "tiny", config_dict=cfg, log=False)
    export_sizes(result["saved_model_file"], [8, 16], root / "art", onnx=False)
    return root / "art", result["saved_model_file"]


def cli(capsys, *argv):
    """(exit status, stdout lines, stderr lines) of ``run_recbole_fmrl.py <argv>``."""
    capsys.readouterr()
    try:
        code = run_recbole_fmrl.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), [line for line in captured.err.splitlines() if line.strip()]


def refused(capsys, *argv):
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith("error: "), (code, out, err)
    return err[0]


def jsonl(path, *lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode() for line in lines))
    return path


# ----------------------------------------------------------------------------- requests

@pytest.mark.parametrize("key", ["items", "scores", "titles", "skipped"])
def test_a_request_key_the_results_would_overwrite_is_refused(art, tmp_path, capsys, key):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]}, {"history": ["106"], key: "mine"})
    line = refused(capsys, "recommend", "--artifact", art[0], "--input", requests)
    assert line.startswith(f"error: {requests}:2: key '{key}' is a result key")  # was silently overwritten


def test_other_request_keys_are_copied(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"], "user": "u1", "items_seen": 3})
    code, out, _ = cli(capsys, "recommend", "--artifact", art[0], "--input", requests, "--topk", 2)
    result = json.loads(out[0])
    assert code == 0 and result["user"] == "u1" and result["items_seen"] == 3 and len(result["items"]) == 2


@pytest.mark.parametrize("topk", [0, -1, "x"])
def test_topk_below_one_is_refused(art, capsys, topk):
    code, out, err = cli(capsys, "recommend", "--artifact", art[0], "--history", "105", "--topk", topk)
    assert code == 2 and out == [] and "--topk" in err[-1] and "need an integer >= 1" in err[-1]  # 0 gave []


def test_topk_above_the_item_count_is_refused(art, capsys):
    line = refused(capsys, "recommend", "--artifact", art[0], "--history", "105", "--topk", 31)
    assert "topk=31: need an integer from 1 to the artifact's 30 items" in line


def test_a_size_that_is_not_nested_is_refused(art, capsys):
    line = refused(capsys, "recommend", "--artifact", art[0], "--history", "105", "--size", 12)
    assert line.startswith(f"error: size 12: not a nested size of {art[0] / 'size-16'} (its sizes: [8, 16])")  # was a traceback


def test_a_funnel_that_cannot_return_k_says_so(art, capsys):
    line = refused(capsys, "recommend", "--artifact", art[0], "--history", "105", "--topk", 10, "--funnel", "8:5,16")
    assert "funnel '8:5,16': its last shortlist keeps 5 items, fewer than topk=10" in line  # returned 5 silently


def test_the_python_api_refuses_the_same_funnel(art):
    with pytest.raises(InputError, match="fewer than topk=10"):
        Recommender.load(art[0]).recommend([["105"]], k=10, funnel="8:5,16")


def test_a_history_of_only_unknown_items_names_its_line(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]}, {"history": ["nope", "zilch"]})
    line = refused(capsys, "recommend", "--artifact", art[0], "--input", requests, "--skip-unknown")
    assert line.startswith(f"error: {requests}:2: the history holds no known item id")


def test_an_empty_history_names_its_line(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]}, b"\n", {"history": []})
    line = refused(capsys, "recommend", "--artifact", art[0], "--input", requests)
    assert line.startswith(f"error: {requests}:3: the history is empty")


def test_a_non_utf8_line_names_its_line(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]}, b'{"history": ["10\xe96"]}\n')
    line = refused(capsys, "recommend", "--artifact", art[0], "--input", requests)
    assert line.startswith(f"error: {requests}:2: not UTF-8 (byte ")


@pytest.mark.parametrize("raw, message", [(b"{not json\n", "not valid JSON"), (b'["105"]\n', "expected an object"),
                                          (b'{"history": "105"}\n', "expected an object with a 'history' list")])
def test_a_malformed_line_names_its_line(art, tmp_path, capsys, raw, message):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]}, raw)
    assert refused(capsys, "recommend", "--artifact", art[0], "--input", requests).startswith(
        f"error: {requests}:2: {message}")


def test_a_byte_order_mark_is_not_part_of_the_first_line(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", b'\xef\xbb\xbf{"history": ["105"]}\n')
    code, out, err = cli(capsys, "recommend", "--artifact", art[0], "--input", requests)
    assert code == 0 and len(json.loads(out[0])["items"]) == 10, err


# ----------------------------------------------------------------------------- outputs

def test_output_never_replaces_the_input(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]})
    before = requests.read_bytes()
    line = refused(capsys, "recommend", "--artifact", art[0], "--input", requests, "--output", requests, "--force")
    assert "is the --input file" in line and requests.read_bytes() == before


def test_output_replaces_an_existing_file_only_with_force(art, tmp_path, capsys):
    requests = jsonl(tmp_path / "in.jsonl", {"history": ["105"]})
    out = tmp_path / "recs.jsonl"
    out.write_text("earlier results\n")
    line = refused(capsys, "recommend", "--artifact", art[0], "--input", requests, "--output", out)
    assert f"--output {out}: exists; pass --force" in line and out.read_text() == "earlier results\n"
    code, _, _ = cli(capsys, "recommend", "--artifact", art[0], "--input", requests, "--output", out, "--force")
    assert code == 0 and len(json.loads(out.read_text())["items"]) == 10


# ----------------------------------------------------------------------------- manifest and --debug

def test_a_missing_file_the_manifest_lists_is_refused(art, tmp_path, capsys):
    import shutil

    folder = tmp_path / "size-8"
    shutil.copytree(art[0] / "size-8", folder)
    manifest = json.loads((folder / artifact.MANIFEST).read_text())
    manifest["files"][artifact.ONNX] = {"sha256": "0" * 64, "bytes": 10}  # listed, never written (or lost)
    (folder / artifact.MANIFEST).write_text(json.dumps(manifest))
    line = refused(capsys, "recommend", "--artifact", folder, "--history", "105")
    assert line.startswith(f"error: {folder / artifact.ONNX}: missing (listed in the manifest)")


@pytest.mark.parametrize("command", ["export", "recommend"])
def test_debug_shows_the_traceback_of_every_subcommand(art, tmp_path, command):
    argv = (["export", "--checkpoint", tmp_path / "none.pth", "--output", tmp_path / "o"] if command == "export"
            else ["recommend", "--artifact", tmp_path / "none", "--history", "1"])
    with pytest.raises(InputError):  # not swallowed into one line by the subcommand
        run_recbole_fmrl.main([str(a) for a in argv] + ["--debug"])


def test_tune_errors_are_one_line_too(tmp_path, capsys):
    bad = tmp_path / "space.yaml"
    bad.write_text("model: FMRLRec\nspace: {hidden_size: []}\n")
    line = refused(capsys, "tune", "--space", bad, "--dataset", "ml-100k")
    assert "space.hidden_size: empty list" in line
