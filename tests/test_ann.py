"""The ann first stage of the funnel (deploy/ann.py): exactness with a full shortlist, recall on a 20k-item
table, the cache (reused, rebuilt when damaged), bad specs, excluded items, the Recommender and the CLI."""
import hashlib
import json
import logging
import os

import pytest
import torch
from conftest import write_tiny_dataset

import run_recbole_fmrl
from recbole_fmrl.deploy import Recommender, ann
from recbole_fmrl.deploy.export import export_sizes
from recbole_fmrl.deploy.funnel import Stage, funnel_cost, funnel_topk, parse_funnel
from recbole_fmrl.errors import InputError
from recbole_fmrl.train.driver import run

pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_FMRL_CACHE", str(tmp_path / "cache"))


def random_table(n_items, dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_items + 1, dims, generator=g), torch.randn(40, dims, generator=g)  # [N+1 M], [B M]


def padding_only(hidden, table):
    mask = torch.zeros(hidden.shape[0], table.shape[0], dtype=torch.bool)
    mask[:, 0] = True
    return mask


def test_a_shortlist_of_every_item_equals_the_exact_funnel():
    table, hidden = random_table(300, 32)
    index = ann.build(table, 16)
    rows = index.search(hidden, 300)
    assert sorted(rows[0].tolist()) == list(range(1, 301))  # the graph itself returned every item
    excluded = padding_only(hidden, table)
    for spec, k in [("ann16:300,32", 10), ("ann16:5000,24:50,32", 20)]:
        ids, scores = funnel_topk(hidden, table, parse_funnel(spec), k, excluded, index)
        ref_ids, ref_scores = funnel_topk(hidden, table, parse_funnel(spec[3:]), k, excluded)
        assert torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores)
    ids, scores = funnel_topk(hidden, table, parse_funnel("ann16:300,16"), 10, excluded, index)  # plain ANN
    ref_ids, ref_scores = funnel_topk(hidden, table, [(16, None)], 10, excluded)
    assert torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores)


def test_recall_of_the_exact_top10_on_a_20k_item_table():
    table, hidden = random_table(20_000, 64)
    index = ann.build(table, 32)
    excluded = padding_only(hidden, table)
    ids, _ = funnel_topk(hidden, table, parse_funnel("ann32:200,64"), 10, excluded, index)
    ref, _ = funnel_topk(hidden, table, parse_funnel("32:200,64"), 10, excluded)  # the same funnel, exact
    recall = sum(len(set(a) & set(b)) for a, b in zip(ids.tolist(), ref.tolist())) / ref.numel()
    assert recall >= 0.95, recall
    exact_32 = torch.topk((hidden[:, :32] @ table[:, :32].T).masked_fill(excluded, float("-inf")), 10).indices
    found = index.search(hidden, 200)
    assert sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact_32.tolist())) / exact_32.numel() >= 0.95


def test_excluded_items_are_never_returned_and_the_shortlist_stays_full():
    table, hidden = random_table(2_000, 32)
    index = ann.build(table, 16)
    excluded = padding_only(hidden, table)
    best = torch.topk(hidden[:, :16] @ table[1:, :16].T, 150).indices + 1  # what the index would return first
    excluded.scatter_(1, best, True)
    shortlist = ann.shortlist(index, hidden, table, 100, excluded)
    assert shortlist.shape == (40, 100) and not excluded.gather(1, shortlist).any()
    assert all(len(set(row)) == 100 for row in shortlist.tolist())
    ids, scores = funnel_topk(hidden, table, parse_funnel("ann16:100,32"), 10, excluded, index)
    assert not excluded.gather(1, ids).any() and torch.isfinite(scores).all()


def test_a_row_the_graph_returns_short_is_scored_exactly(monkeypatch):
    table, hidden = random_table(400, 16)
    index = ann.build(table, 8)
    excluded = padding_only(hidden, table)
    full = index.search
    monkeypatch.setattr(index, "search", lambda q, n: full(q, n).index_fill_(0, torch.tensor([3]), 0))  # row 3: nothing
    shortlist = ann.shortlist(index, hidden, table, 50, excluded)
    exact = torch.topk((hidden[3, :8] @ table[:, :8].T).masked_fill(excluded[3], float("-inf")), 50).indices
    assert torch.equal(shortlist[3], exact) and torch.equal(shortlist[4], full(hidden, 50)[4])


def test_the_cache_is_reused_and_a_damaged_file_rebuilt(tmp_path, caplog):
    table, hidden = random_table(500, 16)
    first = ann.load_or_build(table, 8, "ab" * 32)
    path = ann.cache_path("ab" * 32, 8)
    assert path.parent == tmp_path / "cache" / "ann" and path.name == f"{'ab' * 32}-s8-hnsw32-efc40.faiss"
    stamp = os.stat(path).st_mtime_ns
    again = ann.load_or_build(table, 8, "ab" * 32)
    assert os.stat(path).st_mtime_ns == stamp and torch.equal(again.search(hidden, 20), first.search(hidden, 20))
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:]):
        path.write_bytes(damage(path.read_bytes()))
        with caplog.at_level(logging.WARNING, logger="recbole_fmrl.deploy.ann"):
            caplog.clear()
            rebuilt = ann.load_or_build(table, 8, "ab" * 32)
        assert "damaged or truncated" in caplog.text and "rebuilding" in caplog.text
        assert torch.equal(rebuilt.search(hidden, 20), first.search(hidden, 20))
        assert json.loads(ann.sidecar(path).read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recbole_fmrl.deploy.ann"):
        other = ann.load_or_build(torch.cat([table, table[1:3]]), 8, "ab" * 32)  # same key, another table: not used
    assert other.n_items == 502 and "holds 500 x 8, not 502 x 8" in caplog.text


@pytest.mark.parametrize("spec,says", [
    ("32:100,ann64:10,256", "only the first stage may be approximate"), ("ann0:10,32", "stages are SIZE:KEEP"),
    ("annx:5,32", "stages are SIZE:KEEP"), ("ann32", "stages are SIZE:KEEP"), ("ann32:10,16", "sizes must increase")])
def test_bad_ann_specs_are_one_line_errors_naming_the_spec(spec, says):
    with pytest.raises(InputError) as err:
        parse_funnel(spec)
    assert f"funnel {spec!r}" in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_parse_and_cost():
    assert parse_funnel("ann32:2000,64:200,256") == [Stage(32, 2000, True), Stage(64, 200), Stage(256, None)]
    assert parse_funnel("ann256:200,256") == [Stage(256, 200, True), Stage(256, None)]  # ANN at full size
    for same in ("32:200,32", "ann16:200,32:100,32"):  # an equal size only right after the ann stage
        with pytest.raises(InputError, match="sizes must increase"):
            parse_funnel(same)
    assert funnel_cost(parse_funnel("ann32:1000,256"), 10**6, ann_distances=25_000) == 25_000 * 32 + 1000 * 256
    with pytest.raises(ValueError, match="ann_distances"):
        funnel_cost(parse_funnel("ann32:1000,256"), 10**6)


def test_missing_faiss_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name))
                        if name == "faiss" else real(name, *a, **kw))
    with pytest.raises(InputError, match=r"pip install -e \.\[serve\]"):
        ann.require_faiss()


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Exported size 16 (nested 8, 16) of a one-epoch run on the tiny dataset (ID items, 30 items)."""
    root = tmp_path_factory.mktemp("ann")
    write_tiny_dataset(root / "data", "tiny", with_image=False)
    cfg = {"data_path": str(root / "data"), "fmrl_output_dir": str(root / "runs"), "fmrl_cache_dir": str(root / "cache"),
           "hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
           "show_progress": False, "use_gpu": False, "state": "ERROR", "topk": [5, 10], "MAX_ITEM_LIST_LENGTH": 20,
           "seed": 7, "fmrl_modality": "id"}
    result = run("FMRLRec", "tiny", config_dict=cfg, log=False)
    return export_sizes(result["saved_model_file"], [16], root / "art", onnx=False)[16]


def test_recommender_and_cli_serve_an_ann_funnel(art, tmp_path, capsys):
    rec = Recommender.load(art)
    history = ["105", "106", "107"]
    exact = rec.recommend([history], k=10, exclude_seen=True, funnel="8:29,16")[0]
    approx = rec.recommend([history], k=10, exclude_seen=True, funnel="ann8:29,16")[0]
    assert approx["items"] == exact["items"] and not set(approx["items"]) & set(history)
    cached = list((tmp_path / "cache" / "ann").glob("*.faiss"))
    assert [p.name for p in cached] == [f"{rec.manifest['files']['model.pt']['sha256']}-s8-hnsw32-efc40.faiss"]
    code = run_recbole_fmrl.main(["recommend", "--artifact", str(art), "--history", *history, "--topk", "10",
                                  "--exclude-seen", "--funnel", "ann8:29,16"])
    assert code == 0 and json.loads(capsys.readouterr().out)["items"] == exact["items"]
    with pytest.raises(InputError, match="nested sizes"):
        rec.recommend([history], k=5, funnel="ann4:20,16")
