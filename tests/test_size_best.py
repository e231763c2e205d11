"""Per-size selection (``fmrl_select_on: per_size``, issue 29): each size's own best epoch, against a slow
reference that keeps the whole network of every epoch."""
import copy
import json

import pytest
import torch

from recbole_fmrl.deploy import Recommender, export_sizes
from recbole_fmrl.errors import InputError
from recbole_fmrl.model.network import ModelArgs
from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.driver import fit_and_evaluate, prepare
from recbole_fmrl.train.size_best import ENTRY, SizeBests

SIZES = [4, 8, 16]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def settings(**overrides):
    return dict(hidden_size=16, fmrl_sizes=SIZES, epochs=20, stopping_step=1, learning_rate=0.01,
                fmrl_select_on="per_size", fmrl_modality="text_id", **overrides)


def train_with_snapshots(tiny_config, **overrides):
    """A per-size run, and the whole network's weights at every validated epoch (the slow reference)."""
    config, net, trainer, data = prepare(model="FMRLRec", dataset="tiny", config_dict=tiny_config(**settings(**overrides)),
                                         log=False)
    snapshots, records = {}, []

    def keep(record):
        records.append(record)
        snapshots[record["epoch"]] = copy.deepcopy(net.network.state_dict())

    result = fit_and_evaluate(config, net, trainer, data, on_evaluation=keep)
    return net, trainer, data, result, records, snapshots


def reference_best_epochs(records):
    """Each size's best epoch by RecBole's rule (a tie replaces the best: the last of equal maxima)."""
    best = {}
    for r in records:
        for m, row in r["size_results"].items():
            if m not in best or row["ndcg@10"] >= best[m][1]:
                best[m] = (r["epoch"], row["ndcg@10"])
    return {m: e for m, (e, _) in best.items()}


def reference_stops(records, patience):
    """First epoch at which every size, and at which the largest alone, has gone > ``patience``
    validations without reaching its best (RecBole's ``early_stopping`` per size)."""
    best, stale, stops = {}, {}, {}
    for r in records:
        for m, row in r["size_results"].items():
            if m not in best or row["ndcg@10"] >= best[m]:
                best[m], stale[m] = row["ndcg@10"], 0
            else:
                stale[m] += 1
        if stale[SIZES[-1]] > patience:
            stops.setdefault("largest", r["epoch"])
        if all(v > patience for v in stale.values()):
            stops.setdefault("all", r["epoch"])
    return stops.get("all"), stops.get("largest")


@pytest.fixture(scope="module")
def per_size_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("per-size")

    def tiny_config(**overrides):
        return {"data_path": str(tiny_root), "fmrl_output_dir": str(out / "runs"), "fmrl_cache_dir": str(out / "cache"),
                "train_batch_size": 16, "eval_batch_size": 64, "show_progress": False, "use_gpu": False,
                "state": "ERROR", "topk": [5, 10, 20], "MAX_ITEM_LIST_LENGTH": 20, "seed": 7, **overrides}

    return train_with_snapshots(tiny_config)


def test_each_size_keeps_its_own_best_epoch_and_training_goes_on_while_any_improves(per_size_run):
    _, trainer, _, result, records, _ = per_size_run
    expected = reference_best_epochs(records)
    assert records[-1]["size_best_epochs"] == expected
    assert len(set(expected.values())) > 1, "the fixture must make sizes peak at different epochs"
    assert records[-1]["best_epoch"] == expected[SIZES[-1]]  # the best checkpoint stays the largest size's
    stop_all, stop_largest = reference_stops(records, trainer.stopping_step)
    assert records[-1]["epoch"] == stop_all and records[-1]["finished"] == "early_stopped"
    assert stop_largest < stop_all, "the fixture must train past the epoch where the largest size alone stops"


def test_test_results_of_each_size_come_from_its_own_epoch(per_size_run, tmp_path):
    net, trainer, data, result, records, snapshots = per_size_run
    expected = reference_best_epochs(records)
    _, valid_data, test_data = data
    reference = copy.deepcopy(net)
    for m in SIZES:
        reference.network.load_state_dict(snapshots[expected[m]])  # the whole network of that epoch
        trainer_ref = copy.copy(trainer)
        trainer_ref.model, trainer_ref.best_slices = reference, {}
        trainer_ref.evaluate(test_data, load_best_model=False)
        assert result["size_results"][m]["test"]["ndcg@10"] == pytest.approx(trainer_ref.size_results[m]["ndcg@10"], abs=1e-12)
        valid = next(r for r in records if r["epoch"] == expected[m])["size_results"][m]["ndcg@10"]
        assert result["size_results"][m]["valid"]["ndcg@10"] == pytest.approx(valid, abs=1e-12)


def test_export_takes_each_size_from_its_own_epoch(per_size_run, tmp_path):
    net, _, _, result, records, snapshots = per_size_run
    expected = reference_best_epochs(records)
    written = export_sizes(result["saved_model_file"], SIZES, tmp_path)
    reference = copy.deepcopy(net.network).eval()
    histories = [[1, 2, 3], [5, 9, 2, 7, 11], [4]]
    for m in SIZES:
        rec = Recommender.load(written[m])
        assert rec.manifest["checkpoint"]["epoch"] == expected[m]
        reference.load_state_dict(snapshots[expected[m]])
        small = reference.truncate(m).eval()
        lengths = torch.tensor([len(h) for h in histories])
        items = torch.zeros(len(histories), int(lengths.max()), dtype=torch.long)
        for row, h in enumerate(histories):
            items[row, : len(h)] = torch.tensor(h)
        with torch.no_grad():
            want = small.scores(small.infer(items, lengths))
        torch.testing.assert_close(rec.scores(histories), want.float(), rtol=1e-5, atol=1e-5)


def test_a_killed_per_size_run_resumes_with_its_size_bests(per_size_run, tiny_root, tmp_path):
    """The last checkpoint carries the per-size state; a resumed run restores it unchanged."""
    _, trainer, _, result, _, _ = per_size_run
    last = checkpoint.load(checkpoint.last_path(result["saved_model_file"]))
    saved = last["resume"][ENTRY]
    restored = SizeBests(SIZES, trainer.stopping_step).load_state(saved)
    assert restored.epochs() == trainer.size_bests.epochs()
    for m, weights in trainer.size_bests.slices.items():
        for name, value in weights.items():
            torch.testing.assert_close(restored.slices[m][name], value, rtol=0, atol=0)
    best = checkpoint.load(result["saved_model_file"])  # the best file carries the same slices
    assert set(best[ENTRY]["slices"]) == {str(m) for m in SIZES[:-1]}


def test_size_slice_pasted_into_another_network_makes_its_size_m_network_equal(per_size_run):
    net = per_size_run[0].network
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    other.paste_slice(net.size_slice(8))
    for name, value in net.truncate(8).state_dict().items():
        torch.testing.assert_close(other.truncate(8).state_dict()[name], value, rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(other.truncate(16).parameters(), net.truncate(16).parameters()))
    assert ModelArgs.from_dict(net.args.to_dict()) == net.args


def test_per_size_refuses_models_without_nested_sizes(tiny_config):
    with pytest.raises(InputError, match=r"fmrl_select_on=per_size: SASRec has no nested sizes"):
        prepare(model="SASRec", dataset="tiny", config_dict=tiny_config(fmrl_select_on="per_size", train_neg_sample_args=None),
                log=False)


def test_manifest_metrics_of_a_per_size_export_are_its_own_epochs(per_size_run, tmp_path):
    _, _, _, result, _, _ = per_size_run
    written = export_sizes(result["saved_model_file"], [SIZES[0]], tmp_path)
    manifest = json.loads((written[SIZES[0]] / "manifest.json").read_text())
    assert manifest["metrics"]["test"]["ndcg@10"] == pytest.approx(result["size_results"][SIZES[0]]["test"]["ndcg@10"])
