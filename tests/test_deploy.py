"""Deploy: export per size, artifact equality with FMRLRec, streaming, funnel, bad artifacts, CLI."""
import json
import shutil

import pytest
import torch

from recbole_fmrl.deploy import artifact, export_sizes
from recbole_fmrl.deploy.command import export_main, recommend_main
from recbole_fmrl.deploy.funnel import funnel_cost, funnel_topk, parse_funnel
from recbole_fmrl.deploy.recommender import Recommender, UnknownItemError
from recbole_fmrl.deploy.streaming import run_recurrent
from recbole_fmrl.errors import InputError
from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.driver import prepare
from tests.conftest import write_tiny_dataset

SIZES = [8, 16, 32]
WINDOW = 20


def perturb(net):
    """Make every parameter non-trivial (imaginary LRU parts, LayerNorm affine) as training would."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "params_log" in name:
                p[0].copy_(torch.log(torch.rand_like(p[0]) * 0.3 + 0.02))  # |lambda| in 0.74..0.98: memory past W
            else:
                p.add_(torch.randn_like(p) * 0.05 * ((p != 0) if p.ndim == 2 and "proj" not in name and "embedding" not in name else 1))


def write_titles(folder, name, n_items=30):
    lines = ["item_id:token\ttitle:token_seq\tyear:token"] + [f"{100 + i}\tItem number {i}\t{1990 + i}" for i in range(n_items)]
    (folder / f"{name}.item").write_text("\n".join(lines) + "\n")


def build_and_save(root, out, modality="text_image", **overrides):
    config = {
        "data_path": str(root), "fmrl_output_dir": str(out / "runs"), "fmrl_cache_dir": str(out / "cache"),
        "hidden_size": 32, "fmrl_sizes": SIZES, "n_layers": 2, "fmrl_ffn_ratio": 2, "fmrl_modality": modality,
        "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64, "show_progress": False, "use_gpu": False,
        "state": "ERROR", "MAX_ITEM_LIST_LENGTH": WINDOW, "seed": 7, "topk": [5, 10, 20], **overrides}
    _, net, trainer, data = prepare(model="FMRLRec", dataset="tinyt", config_dict=config, log=False)
    perturb(net)
    trainer._save_checkpoint(0, verbose=False)
    return net.eval(), trainer.saved_model_file, data


@pytest.fixture(scope="module", params=["text_image", "id", "text_id"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy-data")
    folder = write_tiny_dataset(root, name="tinyt")
    write_titles(folder, "tinyt")
    out = tmp_path_factory.mktemp(f"deploy-{request.param}")
    net, ckpt, data = build_and_save(root, out, request.param)
    written = export_sizes(ckpt, SIZES, out / "artifacts")
    return net, ckpt, data, written, out / "artifacts"


def eval_batch(data):
    return next(iter(data[2]))[0]  # the test split


def internal_histories(interaction):
    seqs, lengths = interaction["item_id_list"], interaction["item_length"]
    return [seqs[i, : lengths[i]].tolist() for i in range(len(lengths))]


def test_artifact_scores_equal_the_full_models_size_m_scores(exported):
    net, _, data, written, root = exported
    interaction = eval_batch(data)
    with torch.no_grad():
        reference = net.full_sort_predict_sizes(interaction)  # [K B N+1]
    histories = internal_histories(interaction)
    for k, size in enumerate(SIZES):
        rec = Recommender.load(written[size])
        assert rec.size == size and rec.manifest["parameters"] == net.nested_parameter_count(size)
        scores = rec.scores(histories)
        assert scores.dtype == torch.float32
        assert (scores - reference[k]).abs().max() <= 1e-5
        # the largest artifact serves every nested size too (first-m slices)
        assert (Recommender.load(root).at_size(size).scores(histories) - reference[k]).abs().max() <= 1e-5


def test_artifact_holds_only_the_size_m_weights_and_loads_weights_only(exported):
    net, _, _, written, _ = exported
    folder = written[8]
    weights = torch.load(folder / artifact.WEIGHTS, weights_only=True)
    assert weights["model_args"]["sizes"] == [8]
    n_items = net.n_items
    for key, value in weights["state_dict"].items():
        assert max(value.shape) <= max(2 * 8, n_items), key  # ffn_ratio 2: widest nested dim is 16
    assert weights["state_dict"][artifact.ITEM_TABLE].shape == (n_items, 8)
    assert not any("proj" in k or "embedding" in k or "features" in k for k in weights["state_dict"])
    manifest = json.loads((folder / artifact.MANIFEST).read_text())
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["dataset"] == "tinyt"
    assert set(manifest["files"]) == {artifact.WEIGHTS, artifact.ITEMS}
    assert all(artifact.sha256_file(folder / f) == meta["sha256"] for f, meta in manifest["files"].items())
    assert sum(p.stat().st_size for p in written[8].iterdir()) < sum(p.stat().st_size for p in written[32].iterdir())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_recommend_raw_ids_titles_exclude_seen_unknown(exported):
    _, _, _, _, root = exported
    rec = Recommender.load(root)
    history = ["105", "106", "107", "108"]
    out = rec.recommend([history], k=30)[0]
    assert len(out["items"]) == 30 and set(out["items"]) == {str(100 + i) for i in range(30)}
    assert out["titles"][0] == f"Item number {int(out['items'][0]) - 100}"
    assert out["scores"] == sorted(out["scores"], reverse=True)
    unseen = rec.recommend([history], k=30, exclude_seen=True)[0]
    assert not set(unseen["items"]) & set(history) and len(unseen["items"]) == 26
    assert unseen["items"] == [i for i in out["items"] if i not in history]
    with pytest.raises(UnknownItemError, match="unknown item id"):
        rec.recommend([history + ["nope"]], k=5)
    skipped = rec.recommend([history + ["nope", "x"]], k=5, skip_unknown=True)[0]
    assert skipped["skipped"] == 2 and skipped["items"] == out["items"][:5]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_streaming_equals_the_parallel_forward_also_past_the_window(exported, dtype, tol):
    _, _, _, _, root = exported
    rec = Recommender.load(root)
    rec.net.to(dtype)
    torch.manual_seed(0)
    events = [str(100 + int(i)) for i in torch.randint(0, 30, (3 * WINDOW + 5,))]
    full, window = rec.init_state("full"), rec.init_state("window")
    ids = [rec.internal(e) for e in events]
    for t, event in enumerate(events):
        full, full_scores = rec.step(full, event)
        window, window_scores = rec.step(window, event)
        seq = torch.tensor([ids[: t + 1]])
        with torch.no_grad():
            parallel_full = rec.net.scores(rec.net.infer(seq, torch.tensor([t + 1])))[0]  # untruncated history
            parallel_window = rec.net.scores(rec.net.infer(seq[:, -WINDOW:], torch.tensor([min(t + 1, WINDOW)])))[0]
        assert (full_scores - parallel_full).abs().max() <= tol
        assert (window_scores - parallel_window).abs().max() <= tol
    assert (rec.scores([ids], context="full")[0] - full_scores).abs().max() <= tol
    assert (rec.scores([ids], context="window")[0] - window_scores).abs().max() <= tol
    assert (full_scores - window_scores).abs().max() > 1e3 * tol  # the two contexts do differ past W


def test_recurrent_batch_equals_parallel_with_ragged_lengths(exported):
    _, _, _, _, root = exported
    net = Recommender.load(root).net.double()
    lengths = torch.tensor([1, 7, 45, 30])
    items = torch.randint(1, 31, (4, 45)) * (torch.arange(45)[None] < lengths[:, None])
    with torch.no_grad():
        parallel = net.infer(items, lengths)
        assert (run_recurrent(net, items, lengths) - parallel).abs().max() <= 1e-10
        assert (net(items, lengths) - parallel).abs().max() <= 1e-10  # the packed training schedule
        # the ONNX graph's every-position scan: a causal Toeplitz product
        assert (net.infer(items, lengths, toeplitz=True) - parallel).abs().max() <= 1e-10
        short = items[:, :10], lengths.clamp(max=10)
        assert (net.infer(*short, toeplitz=True) - run_recurrent(net, *short)).abs().max() <= 1e-10


def brute_force_funnel(rec, histories, stages, k, excluded):
    """Per user: score every item with each stage's own truncated network, filter stage by stage."""
    out = []
    for row, history in enumerate(histories):
        candidates = [i for i in range(len(rec.item_ids)) if not excluded[row, i]]
        for size, keep, _ in stages:
            scores = rec.at_size(size).scores([history])[0]
            candidates = sorted(candidates, key=lambda i: -float(scores[i]))[: keep or k]
        out.append((candidates, [float(scores[i]) for i in candidates]))
    return out


def test_funnel_matches_a_brute_force_cascade(exported):
    _, _, data, _, root = exported
    rec = Recommender.load(root)
    rec.net.double()
    histories = internal_histories(eval_batch(data))[:12]
    for spec, k in [("8:20,32", 5), ("8:25,16:12,32", 10), ("16:3,32", 5)]:
        stages = parse_funnel(spec)
        excluded = rec.excluded(histories, exclude_seen=True)
        ids, scores = funnel_topk(rec.hidden(histories), rec.net.item_table(), stages, k, excluded)
        for row, (ref_ids, ref_scores) in enumerate(brute_force_funnel(rec, histories, stages, k, excluded)):
            assert ids[row].tolist() == ref_ids
            assert torch.allclose(scores[row], torch.tensor(ref_scores, dtype=scores.dtype), atol=1e-10)
    assert funnel_cost(parse_funnel("32:200,256"), 12101) == 12101 * 32 + 200 * 256
    everything = rec.recommend([["105", "106"]], k=10, funnel="8:31,32")[0]
    plain = rec.recommend([["105", "106"]], k=10)[0]  # a shortlist of every item changes nothing
    assert everything["items"] == plain["items"]
    assert torch.allclose(torch.tensor(everything["scores"]), torch.tensor(plain["scores"]), atol=1e-12)
    for bad in ["64", "12:5,32", "32:10", "16:5,8", "8:5,16:10,32", "a:b,c"]:
        with pytest.raises(ValueError):
            rec.recommend([["105"]], k=3, funnel=bad)


def run_cli(main, argv, capsys):
    """(exit status, stdout, stderr) as the command line would show them (through ``cli.main``)."""
    from recbole_fmrl import cli

    command = {export_main: "export", recommend_main: "recommend"}[main]
    try:
        code = cli.main([command, *(str(a) for a in argv)])
        message = ""
    except SystemExit as exc:  # errors: "error: ..." on stderr, status 2
        code, message = exc.code, ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err + message


def test_cli_export_recommend_and_batch(exported, tmp_path, capsys):
    import shutil
    import time

    _, ckpt, _, _, _ = exported
    saved = tmp_path / "saved"  # a run folder: the best checkpoint and a newer "last" one (no export fields)
    saved.mkdir()
    shutil.copy(ckpt, saved / "FMRLRec-best.pth")
    time.sleep(0.01)
    (saved / "FMRLRec-best.last.pth").write_bytes(b"not this one")
    code, _, err = run_cli(export_main, ["--checkpoint", saved, "--sizes", 8, 32, "--output", tmp_path / "a"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["size-32", "size-8"]
    code, out, err = run_cli(recommend_main, ["--artifact", tmp_path / "a", "--history", "105", "106", "--topk", 3,
                                              "--exclude-seen"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines[0]["items"]) == 3 and not {"105", "106"} & set(lines[0]["items"])
    histories = [{"history": ["105", "106"]}, {"user": "u1", "history": ["110", "zzz"]}]
    (tmp_path / "h.jsonl").write_text("".join(json.dumps(h) + "\n" for h in histories))
    argv = ["--artifact", tmp_path / "a" / "size-32", "--input", tmp_path / "h.jsonl", "--output", tmp_path / "r.jsonl",
            "--topk", 4, "--skip-unknown", "--funnel", "8:10,32"]
    code, _, err = run_cli(recommend_main, argv, capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [0, 1] and recs[1]["user"] == "u1" and len(recs[0]["items"]) == 4
    code, _, err = run_cli(recommend_main, argv[:-3] + ["--funnel", "8:10,32"], capsys)  # no --skip-unknown
    assert code == 2 and err.strip().startswith(f"error: {tmp_path / 'h.jsonl'}:2: 1 unknown item id(s) ['zzz']")
    assert not (tmp_path / "r.jsonl").read_text() == ""  # the earlier output is untouched


def damage(folder, how):
    if how == "truncated":
        data = (folder / artifact.WEIGHTS).read_bytes()
        (folder / artifact.WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "wrong hash":
        data = bytearray((folder / artifact.WEIGHTS).read_bytes())
        data[-100] ^= 0xFF
        (folder / artifact.WEIGHTS).write_bytes(bytes(data))
    elif how == "format version":
        manifest = json.loads((folder / artifact.MANIFEST).read_text())
        manifest["format_version"] = 99
        (folder / artifact.MANIFEST).write_text(json.dumps(manifest))
    elif how == "truncated manifest":
        text = (folder / artifact.MANIFEST).read_text()
        (folder / artifact.MANIFEST).write_text(text[: len(text) // 2])


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated or damaged"), ("wrong hash", "sha256 mismatch"),
    ("format version", "unknown format version 99"), ("truncated manifest", "damaged manifest"),
    ("unknown ids", "unknown item id")])
def test_bad_artifacts_give_a_one_line_error(exported, tmp_path, capsys, how, message):
    _, ckpt, _, _, _ = exported
    export_sizes(ckpt, [8], tmp_path)
    damage(tmp_path / "size-8", how)
    history = ["105", "no-such-item"] if how == "unknown ids" else ["105"]
    code, out, err = run_cli(recommend_main, ["--artifact", tmp_path / "size-8", "--history", *history], capsys)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_export_refuses_changed_features_and_unknown_sizes(exported, tmp_path):
    net, ckpt, _, _, _ = exported
    with pytest.raises(artifact.ArtifactError, match="nested sizes"):
        export_sizes(ckpt, [12], tmp_path)
    if net.modality == "id":
        return
    state = torch.load(ckpt, weights_only=True)
    state["export"]["feature_sha256"] = {k: "0" * 64 for k in state["export"]["feature_sha256"]}
    checkpoint.write(tmp_path / "changed.pth", state)  # a consistent checkpoint whose features moved on
    with pytest.raises(ValueError, match="differ from the ones the model was trained on"):
        export_sizes(tmp_path / "changed.pth", [8], tmp_path / "out")
    assert not (tmp_path / "out" / "size-8").exists()


def test_onnx_export_runs_under_onnxruntime_with_torchs_scores(exported, tmp_path, capsys):
    """Needs the ``deploy`` extra (onnx, onnxruntime): without it this test fails, it does not skip."""
    from recbole_fmrl.deploy.onnx_export import OnnxScorer, artifact_to_onnx

    _, ckpt, data, written, _ = exported
    code, _, err = run_cli(export_main, ["--checkpoint", ckpt, "--sizes", 16, "--output", tmp_path, "--onnx"], capsys)
    assert code == 0, err
    histories = internal_histories(eval_batch(data))
    lengths = torch.tensor([len(h) for h in histories])
    items = torch.zeros(len(histories), int(lengths.max()), dtype=torch.long)
    for row, h in enumerate(histories):
        items[row, : len(h)] = torch.tensor(h)
    in_artifact = Recommender.load(tmp_path / "size-16")
    assert artifact.ONNX in in_artifact.manifest["files"]
    cases = [(OnnxScorer(tmp_path / "size-16" / artifact.ONNX), in_artifact),
             (OnnxScorer(artifact_to_onnx(written[32], tmp_path / "32.onnx")), Recommender.load(written[32]))]
    for scorer, rec in cases:
        assert abs(scorer(items, lengths) - rec.scores(histories).numpy()).max() <= 1e-4
        short = scorer(items[:1, :3], torch.tensor([3]))  # another batch size and length
        assert abs(short - rec.scores([histories[0][:3]]).numpy()).max() <= 1e-4
        assert scorer.max_length == WINDOW
        with pytest.raises(InputError, match=f"22 steps, but this ONNX graph covers at most {WINDOW}"):
            scorer(torch.ones(1, WINDOW + 2, dtype=torch.long), torch.tensor([WINDOW + 2]))  # not a MatMul error


def test_command_line_error_is_one_line_with_a_failing_status(exported, tmp_path):
    """Through the real entry point: a damaged artifact -> exit status 1, one line on stderr."""
    import subprocess
    import sys
    from pathlib import Path

    _, ckpt, _, _, _ = exported
    export_sizes(ckpt, [8], tmp_path)
    damage(tmp_path / "size-8", "wrong hash")
    script = Path(__file__).resolve().parents[1] / "run_recbole_fmrl.py"
    done = subprocess.run([sys.executable, str(script), "recommend", "--artifact", str(tmp_path / "size-8"),
                           "--history", "105"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'size-8' / artifact.WEIGHTS}: "
                                                f"sha256 mismatch with the manifest (damaged or modified) "
                                                f"(--debug shows the traceback)"]


def test_checkpoint_carries_what_export_needs(exported):
    net, ckpt, _, _, _ = exported
    info = torch.load(ckpt, weights_only=True)["export"]
    assert info["model_args"] == net.args.to_dict() and info["dataset"] == "tinyt"
    assert info["item_tokens"][0] == "[PAD]" and len(info["item_tokens"]) == net.n_items
    assert info["item_titles"][1] == f"Item number {int(info['item_tokens'][1]) - 100}"
    parts = [p for p in net.modality.split("_") if p != "id"]
    assert set(info["feature_sha256"]) == ({"tinyt.item_ids", "tinyt.features.json"} | {f"tinyt.{p}.npy" for p in parts}
                                           if parts else set())


def test_a_finished_run_leaves_its_per_size_metrics_for_the_manifest(tmp_path):
    """driver.run -> the best checkpoint carries size_results -> export copies them into each manifest."""
    from recbole_fmrl.train.driver import run

    root = tmp_path / "data"
    write_tiny_dataset(root, name="tinyr", n_users=25)
    config = {"data_path": str(root), "fmrl_output_dir": str(tmp_path / "runs"), "fmrl_cache_dir": str(tmp_path / "c"),
              "hidden_size": 16, "fmrl_sizes": [8, 16], "epochs": 1, "train_batch_size": 16, "eval_batch_size": 64,
              "show_progress": False, "use_gpu": False, "state": "ERROR", "MAX_ITEM_LIST_LENGTH": 10, "seed": 3,
              "topk": [5, 10, 20]}
    result = run(model="FMRLRec", dataset="tinyr", config_dict=config, log=False)
    written = export_sizes(tmp_path / "runs" / "saved", [8, 16], tmp_path / "art")
    for size in (8, 16):
        metrics = Recommender.load(written[size]).manifest["metrics"]
        assert metrics["test"]["ndcg@10"] == result["size_results"][size]["test"]["ndcg@10"]
        assert metrics["valid"]["recall@10"] == result["size_results"][size]["valid"]["recall@10"]


def test_a_version_1_artifact_still_loads_with_the_same_scores(exported, tmp_path):
    """Artifacts exported before the one network (format 1: table under ``item_table``, the trained d as
    ``hidden_size``) are upgraded on load, not refused."""
    net, _, data, written, _ = exported
    size = SIZES[0]
    old = tmp_path / f"size-{size}"
    shutil.copytree(written[size], old)
    weights = torch.load(old / artifact.WEIGHTS, weights_only=True)
    state = dict(weights["state_dict"])
    state["item_table"] = state.pop(artifact.ITEM_TABLE)
    args = dict(weights["model_args"], hidden_size=SIZES[-1])
    torch.save({"model_args": args, "state_dict": state}, old / artifact.WEIGHTS)
    manifest = json.loads((old / artifact.MANIFEST).read_text())
    manifest.update(format_version=1, files=artifact.file_table(old))
    (old / artifact.MANIFEST).write_text(json.dumps(manifest))
    histories = internal_histories(eval_batch(data))
    expected = Recommender.load(written[size]).scores(histories)
    assert torch.equal(Recommender.load(old).scores(histories), expected)
