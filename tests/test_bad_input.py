"""A bad-input corpus for training (issue 13): one test per case.

Every refused case goes through the command line (``run_recbole_fmrl.main``, with dataset_tools'
feature builder) and asserts: exit status 2, exactly one line on stderr, ``error: `` naming the file,
column or key, no checkpoint written and the dataset folder byte for byte unchanged. The loss and
evaluation cases assert the numbers.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import write_tiny_dataset
from recbole.trainer import Trainer

import run_recbole_fmrl
from recbole_fmrl.data import features as feature_files
from recbole_fmrl.data.modality import item_text_columns, resolve_modality
from recbole_fmrl.model.loss import matryoshka_cross_entropy, matryoshka_cross_entropy_reference
from recbole_fmrl.train.driver import prepare

NAME = "bad"
RUN_ARGS = ["hidden_size=16", "fmrl_sizes=[8,16]", "epochs=1", "train_batch_size=16", "eval_batch_size=64",
            "show_progress=False", "use_gpu=False", "MAX_ITEM_LIST_LENGTH=20", "seed=7", "topk=[10]"]


@pytest.fixture
def case(tmp_path):
    """A fresh copy of the tiny dataset (features included) to damage, and a CLI runner for it."""
    root = tmp_path / "data"
    folder = write_tiny_dataset(root, NAME)

    class Case:
        data, dir, out = root, folder, tmp_path / "runs"

        def argv(self, *extra, state="ERROR"):
            return ["--model", "FMRLRec", "--dataset", NAME, f"data_path={root}", f"fmrl_output_dir={self.out}",
                    f"fmrl_cache_dir={tmp_path / 'cache'}", f"state={state}", *RUN_ARGS, *extra]

        def path(self, suffix):
            return folder / f"{NAME}.{suffix}"

    return Case()


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(case, capsys, *extra):
    """Run the CLI on the damaged folder; the one-line message (asserting nothing was written)."""
    before = snapshot(case.data)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_recbole_fmrl.main(case.argv(*extra))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert snapshot(case.data) == before  # nothing written into or removed from the data folder
    saved = case.out / "saved"
    assert not saved.exists() or not any(saved.iterdir())  # no checkpoint
    assert not (case.out / "log_tensorboard").exists()
    return lines[0]


def write_meta(case, **source):
    """meta.json as dataset_tools' pipeline.write_meta records it (files with sha256, stats, source)."""
    entries = {key: case.path(suffix) for key, suffix in
               (("inter", "inter"), ("item_ids", "item_ids"), ("text", "text.npy"), ("image", "image.npy"))}
    files = {key: {"file": p.name, "sha256": feature_files.sha256_file(p), "bytes": p.stat().st_size}
             for key, p in entries.items()}
    items = sum(1 for _ in open(case.path("item_ids")))
    meta = {"meta_version": 1, "name": NAME, "files": files, "stats": {"items": items},
            "source": {"format": "amazon", "inputs": [{"path": "/src/beauty/reviews_Beauty_5.json.gz"}], **source},
            "options": {"kcore": 5, "text_encoder": {"name": "minilm"}}, "features": {"text": {}, "image": {}}}
    (case.dir / "meta.json").write_text(json.dumps(meta))


def drop_features(case):
    for suffix in ("item_ids", "features.json", "text.npy", "image.npy"):
        case.path(suffix).unlink()


# ----------------------------------------------------------------------------- modality auto

@pytest.mark.parametrize("item_file", ["empty text columns", "no item file"])
def test_auto_without_text_resolves_to_id_in_one_line(case, item_file):
    drop_features(case)
    if item_file == "empty text columns":  # what a --text-encoder none --missing-text keep conversion wrote
        rows = "".join(f"{100 + i}\t\t\n" for i in range(30))
        case.path("item").write_text("item_id:token\ttitle:token_seq\tbrand:token\n" + rows)
        assert item_text_columns(case.path("item")) == []
    result = run_recbole_fmrl.main(case.argv(state="INFO"))
    log = next((case.out / "log" / "FMRLRec").glob("*.log")).read_text().splitlines()
    said = [line for line in log if "fmrl_modality=auto -> id" in line]
    assert len(said) == 1 and f"{NAME}.item" in said[0]
    assert not (case.out.parent / "cache" / "features").exists()  # no identical-row table was built
    assert result["test_result"]["ndcg@10"] > 0 and len(result["size_results"]) == 2


def test_auto_with_item_text_still_asks_for_features(case):
    drop_features(case)
    case.path("item").write_text("item_id:token\ttitle:token_seq\n100\tA Title\n")
    assert item_text_columns(case.path("item")) == ["title"]
    with pytest.raises(ValueError, match="no item features"):
        resolve_modality("auto", [], str(case.dir), case.path("item"))


def test_nan_feature_rows_are_refused_naming_the_file(case, capsys):
    table = np.load(case.path("text.npy"))
    table[3] = np.nan
    np.save(case.path("text.npy"), table)
    message = refused(case, capsys)
    assert f"{NAME}.text.npy" in message and "NaN or Inf" in message and "1 of 30" in message


def test_identical_feature_rows_are_refused_naming_the_file(case, capsys):
    table = np.load(case.path("image.npy"))
    table[:20] = table[0]  # 20 of 30 items share one row
    np.save(case.path("image.npy"), table)
    message = refused(case, capsys)
    assert f"{NAME}.image.npy" in message and "identical" in message and "20 of 30" in message


# ----------------------------------------------------------------------------- the folder and its manifest

def test_inter_changed_since_conversion_is_refused_with_the_rebuild_command(case, capsys):
    write_meta(case)
    lines = case.path("inter").read_text().splitlines(keepends=True)
    case.path("inter").write_text("".join(lines[:-100]))  # lost rows after conversion
    message = refused(case, capsys)
    assert f"{NAME}.inter: changed since the conversion" in message
    assert f"python -m dataset_tools amazon --input /src/beauty --output {case.data} --name {NAME}" in message


def test_manifest_matching_its_files_is_accepted(case):
    write_meta(case)
    from dataset_tools.pipeline import verify_dataset  # the converter's own reader accepts this manifest

    verify_dataset(case.dir, NAME)
    from recbole_fmrl.data import validate
    from recbole_fmrl.train.config import Config

    config = Config(model="FMRLRec", dataset=NAME, config_dict={"data_path": str(case.data)})
    assert "match meta.json" in validate.check_run(config)


@pytest.mark.parametrize("marker", ["lock", "encode-cache", "item_ids without features.json"])
def test_unfinished_conversion_without_manifest_is_refused(case, capsys, marker):
    if marker == "lock":
        (case.data / f".{NAME}.lock").write_text('{"pid": 1}')
        named = f".{NAME}.lock"
    elif marker == "encode-cache":
        (case.dir / ".encode-cache").mkdir()
        named = ".encode-cache"
    else:  # the converter writes .inter, .item, .item_ids, then the features, then meta.json
        case.path("item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{100 + i}\tT{i}\n" for i in range(30)))
        case.path("features.json").unlink()
        named = f"{NAME}.item_ids exists without {NAME}.features.json"
    message = refused(case, capsys)
    assert "no meta.json" in message and named in message and "python -m dataset_tools" in message


# ----------------------------------------------------------------------------- schema and configuration

def test_unknown_column_type_names_file_and_column(case, capsys):
    lines = case.path("inter").read_text().splitlines()
    case.path("inter").write_text("\n".join([lines[0] + "\tfoo:weird"] + [ln + "\tx" for ln in lines[1:]]) + "\n")
    message = refused(case, capsys)
    assert f"{NAME}.inter: column 'foo:weird' has unknown type 'weird'" in message


def test_inter_without_timestamp_names_file_and_column(case, capsys):
    lines = case.path("inter").read_text().splitlines()
    case.path("inter").write_text("\n".join(ln.rsplit("\t", 1)[0] for ln in lines) + "\n")
    message = refused(case, capsys)
    assert f"{NAME}.inter: no 'timestamp' column" in message and "user_id, item_id" in message


def test_load_col_naming_a_missing_column_is_refused(case, capsys):
    message = refused(case, capsys, "load_col={'inter':['user_id','item_id','timestamp','rating']}")
    assert f"{NAME}.inter: load_col.inter names column 'rating'" in message


def test_feature_file_one_row_short_names_the_file(case, capsys):
    np.save(case.path("text.npy"), np.load(case.path("text.npy"))[:-1])
    message = refused(case, capsys)
    assert f"{NAME}.text.npy: shape (29, 12)" in message and "30 rows" in message


def test_features_json_with_a_wrong_hash_names_the_file(case, capsys):
    manifest = json.loads(case.path("features.json").read_text())
    manifest["modalities"]["text"]["item_ids_sha256"] = "0" * 64
    case.path("features.json").write_text(json.dumps(manifest))
    message = refused(case, capsys)
    assert f"{NAME}.features.json: 'text' features were built for another item list" in message


def test_debug_shows_the_traceback(case):
    case.path("features.json").unlink()
    (case.data / f".{NAME}.lock").write_text("{}")
    from recbole_fmrl.errors import InputError

    with pytest.raises(InputError, match="unfinished conversion"):
        run_recbole_fmrl.main(case.argv("--debug"))


# ----------------------------------------------------------------------------- loss

def loss_inputs(seed=0, P=300, N=700, d=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, d, generator=g), torch.randn(N, d, generator=g), torch.randint(0, N, (P,), generator=g)


def test_single_pass_loss_supports_a_second_backward():
    hidden, items, labels = loss_inputs()
    h, e = hidden.clone().requires_grad_(), items.clone().requires_grad_()
    w = torch.tensor([0.2, 0.3, 0.5])
    loss = (matryoshka_cross_entropy(h, e, labels, [8, 16, 32], chunk_size=128, weights=w) * w).sum()
    first = torch.autograd.grad(loss, [h, e], retain_graph=True)
    second = torch.autograd.grad(loss, [h, e], retain_graph=True)  # was: TypeError (ctx.grads cleared)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    loss.backward(retain_graph=True)
    loss.backward()  # accumulates: twice the gradient
    torch.testing.assert_close(h.grad, 2 * first[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="second time"):  # a freed graph: torch's own clear error
        loss.backward()


@pytest.mark.parametrize("upstream", [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.3, 0.7, 0.0]])
def test_zero_upstream_weight_keeps_float32_precision(upstream):
    hidden, items, labels = loss_inputs(1)
    up = torch.tensor(upstream)

    def grads(fn, dtype):
        h, e = hidden.to(dtype).clone().requires_grad_(), items.to(dtype).clone().requires_grad_()
        (fn(h, e) * up.to(dtype)).sum().backward()
        return h.grad.double(), e.grad.double()

    exact = grads(lambda h, e: matryoshka_cross_entropy_reference(h, e, labels, [8, 16, 32]), torch.float64)
    plain = grads(lambda h, e: matryoshka_cross_entropy_reference(h, e, labels, [8, 16, 32]), torch.float32)
    for kw in ({"chunk_size": 128}, {"chunk_size": 128, "weights": torch.ones(3), "native": False}):
        fused = grads(lambda h, e, kw=kw: matryoshka_cross_entropy(h, e, labels, [8, 16, 32], **kw), torch.float32)
        for got, ref, base in zip(fused, exact, plain):
            error, floor = float((got - ref).norm() / ref.norm()), float((base - ref).norm() / ref.norm())
            assert error < max(4 * floor, 2e-6), (kw, error, floor)  # was 5e-4..7e-4


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture
def prepared(tiny_config):
    metrics = ["Recall", "NDCG", "ItemCoverage", "AveragePopularity", "GiniIndex", "TailPercentage"]
    return prepare("FMRLRec", "tiny", config_dict=tiny_config(metrics=metrics, epochs=1), log=False)


def test_eval_item_table_follows_parameter_changes(prepared):
    config, net, trainer, (train_data, _, test_data) = prepared
    batch = next(iter(test_data))[0]
    net.eval()
    before = net.full_sort_predict(batch)
    assert torch.equal(net.full_sort_predict(batch), before)  # cached while nothing changes
    with torch.no_grad():
        net.network.item_encoder.proj.weight.mul_(-1.5)  # an in-place edit in eval mode
    after = net.full_sort_predict(batch)
    fresh = type(net)(config, train_data._dataset)
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    assert not torch.equal(after, before) and torch.equal(after, fresh.full_sort_predict(batch))
    net.train()  # an optimiser step in train mode, then eval again without a train() call in between
    trainer.optimizer.zero_grad()
    sum(net.calculate_loss(next(iter(train_data)))).backward()
    net.eval()
    stepped = net.full_sort_predict(batch)
    trainer.optimizer.step()
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(net.full_sort_predict(batch), fresh.full_sort_predict(batch))
    assert not torch.equal(net.full_sort_predict(batch), stepped)


def test_train_statistic_metrics_match_recbole_at_the_largest_size(prepared):
    config, net, trainer, (train_data, _, test_data) = prepared
    ours = trainer.evaluate(test_data, load_best_model=False)  # per-size evaluator
    theirs = Trainer.evaluate(trainer, test_data, load_best_model=False)  # RecBole's own, largest size
    assert ours == theirs and "itemcoverage@10" in ours and "tailpercentage@10" in ours
    assert set(trainer.size_results) == {8, 16} and all("giniindex@10" in r for r in trainer.size_results.values())
    assert 0 < ours["itemcoverage@10"] <= 1


def test_missing_dataset_names_the_interaction_file(case, capsys):
    shutil.rmtree(case.dir)
    message = refused(case, capsys)
    assert f"{NAME}/{NAME}.inter: interaction file not found" in message and "python -m dataset_tools" in message
