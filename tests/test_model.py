import numpy as np
import pytest
import torch
from torch.nn import functional as F

from recbole_fmrl.data import features as feature_files
from recbole_fmrl.model.lru import Packing
from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.driver import prepare, run
from tests.conftest import write_tiny_dataset


def build(tiny_config, **overrides):
    config, net, trainer, data = prepare(model="FMRLRec", dataset="tiny", config_dict=tiny_config(**overrides), log=False)
    return config, net, trainer, data


def eval_batch(data):
    return next(iter(data[1]))[0]


@pytest.mark.parametrize("modality", ["text_image", "text", "image", "id"])
def test_every_size_equals_its_sliced_submodel(tiny_config, modality):
    config, net, _, data = build(tiny_config, hidden_size=32, fmrl_sizes=[8, 16, 32], n_layers=2,
                                 fmrl_ffn_ratio=2, fmrl_modality=modality, fmrl_ring_r_min=0.5, fmrl_ring_r_max=0.9)
    net = net.double().eval()
    with torch.no_grad():  # make every parameter, imaginary parts included, non-trivial
        for name, p in net.named_parameters():
            if "params_log" not in name:
                p.add_(torch.randn_like(p) * 0.05 * (p != 0 if p.ndim == 2 and "embedding" not in name and "proj" not in name else 1))
    interaction = eval_batch(data)
    with torch.no_grad():
        scores = net.full_sort_predict_sizes(interaction)  # [K B N+1]
        items, lengths = interaction["item_id_list"], interaction["item_length"]
        for k, m in enumerate(net.sizes):
            small = net.submodel(m).double().eval()  # the plain-torch size-m network
            assert small.args.hidden_size == m and small.sizes == net.sizes[: k + 1]
            torch.testing.assert_close(small.scores(small(items, lengths)), scores[k], rtol=1e-9, atol=1e-9)
            # its inference form (folded weights, recurrent and last-position scans) and its frozen export form
            torch.testing.assert_close(small.scores(small.infer(items, lengths)), scores[k], rtol=1e-9, atol=1e-9)
            frozen = small.frozen()
            torch.testing.assert_close(frozen.scores(frozen.infer(items, lengths, toeplitz=True)), scores[k],
                                       rtol=1e-9, atol=1e-9)


def test_loss_with_one_size_equals_plain_cross_entropy(tiny_config):
    _, net, _, data = build(tiny_config, fmrl_sizes=[16], fmrl_train_objective="last_position",
                            hidden_dropout_prob=0.0, attn_dropout_prob=0.0)
    batch = next(iter(data[0]))
    (loss,) = net.calculate_loss(batch)
    hidden = net.forward(batch["item_id_list"], batch["item_length"])
    table = net.network.item_encoder()
    ref = F.cross_entropy(hidden @ table[1:].T, batch["item_id"] - 1)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("scan", ["dense", "doubling"])
def test_all_positions_loss_averages_over_labelled_positions(tiny_config, scan):
    _, net, _, data = build(tiny_config, hidden_dropout_prob=0.0, attn_dropout_prob=0.0,
                            fmrl_size_weights=[1.0, 3.0], fmrl_scan=scan)
    batch = next(iter(data[0]))
    losses = net.calculate_loss(batch)
    table = net.network.item_encoder()
    targets = batch["item_id_target_list"]
    mask = targets > 0
    # reference: the dense [B L d] path, every padded slot computed, then the labelled ones picked
    x = table[batch["item_id_list"]]
    for block in net.network.blocks:
        x = block(x.flatten(0, 1), Packing.full(*x.shape[:2])).view(x.shape)
    out = x
    for k, m in enumerate(net.sizes):
        logits = out[mask][:, :m] @ table[1:, :m].T
        ref = F.cross_entropy(logits, targets[mask] - 1) * [0.25, 0.75][k]
        torch.testing.assert_close(losses[k], ref)


def test_windows_keep_every_training_interaction(tiny_config):
    config, net, _, (train, valid, test) = build(tiny_config, MAX_ITEM_LIST_LENGTH=7)
    ds = train._dataset
    prefix = test._dataset.inter_feat  # last sample per user: its list holds the history before the test item
    windows = ds.inter_feat
    uid = windows["user_id"].numpy()
    # rebuild each user's training sequence from the raw file (chronological), minus valid and test items
    raw = {}
    for line in (config["data_path"] + "/tiny.inter",):
        rows = [r.split("\t") for r in open(line).read().splitlines()[1:]]
    token2id = {t: i for i, t in enumerate(ds.field2id_token["item_id"])}
    user2id = {t: i for i, t in enumerate(ds.field2id_token["user_id"])}
    for u, i, t in rows:
        raw.setdefault(user2id[u], []).append((float(t), token2id[i]))
    for u, seq in raw.items():
        items = [i for _, i in sorted(seq, key=lambda p: p[0])][:-2]  # training part
        mine = np.flatnonzero(uid == u)
        labels = [int(x) for w in mine[::-1] for x in windows["item_id_target_list"][w] if x > 0]
        assert labels == items[1:], f"user {u}"
        for w in mine:
            n = int(windows["item_length"][w])
            assert n <= 7 and torch.equal(windows["item_id_list"][w, 1:n], windows["item_id_target_list"][w, : n - 1])
    assert len(prefix) == len(raw)


def test_features_align_to_recbole_ids(tiny_config):
    _, net, _, data = build(tiny_config, fmrl_modality="text_image", fmrl_feature_norm="none")
    ds = data[0]._dataset
    feats = net.network.item_encoder.features
    tokens = ds.field2id_token["item_id"]
    assert feats.shape[0] == len(tokens) and torch.all(feats[0] == 0)
    for i in range(1, len(tokens)):
        assert feats[i, 0].item() == int(tokens[i])  # text column 0 encodes the token
        assert feats[i, 12].item() == -int(tokens[i])  # image column 0 (after 12 text dims)


def test_standardized_features_match_a_numpy_reference(tiny_config):
    _, raw_net, _, _ = build(tiny_config, fmrl_modality="text_image", fmrl_feature_norm="none")
    _, net, _, _ = build(tiny_config, fmrl_modality="text_image", fmrl_feature_norm="standardize")
    raw, feats = raw_net.network.item_encoder.features.double(), net.network.item_encoder.features.double()
    for cols in (slice(0, 12), slice(12, None)):  # each modality on its own
        real = raw[1:, cols].numpy()
        std = real.std(axis=0)
        expected = (real - real.mean(axis=0)) / np.where(std > 1e-8, std, 1.0)
        np.testing.assert_allclose(feats[1:, cols].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(feats[0] == 0)  # padding row stays zero


def test_standardize_skips_placeholder_rows_and_rejects_unknown_norms():
    array = np.array([[0, 0], [1, 5], [3, 5], [9, 9]], dtype=np.float32)
    mask = np.array([False, True, True, False])
    out = feature_files.normalize(array, mask, "standardize")
    np.testing.assert_allclose(out, [[0, 0], [-1, 0], [1, 0], [0, 0]])  # dim 1 constant: centred only
    assert feature_files.normalize(array, mask, "none") is array
    with pytest.raises(ValueError, match="fmrl_feature_norm.*'pca'"):
        feature_files.normalize(array, mask, "pca")


def test_auto_modality_and_bad_values(tiny_config):
    _, net, _, _ = build(tiny_config)
    assert net.modality == "text_image"
    with pytest.raises(ValueError, match="fmrl_modality"):
        build(tiny_config, fmrl_modality="audio")
    with pytest.raises(ValueError, match="fmrl_sizes.*hidden_size"):
        build(tiny_config, fmrl_sizes=[8, 12])
    with pytest.raises(ValueError, match="strictly increasing"):
        build(tiny_config, hidden_size=16, fmrl_sizes=[16, 8, 16])
    with pytest.raises(ValueError, match="fmrl_train_objective"):
        build(tiny_config, fmrl_train_objective="every")


def test_feature_file_errors_name_the_file(tmp_path, tiny_config):
    folder = write_tiny_dataset(tmp_path, with_image=False)
    with pytest.raises(feature_files.FeatureFileError, match=r"tiny\.features\.json: no 'image' features"):
        build(tiny_config, data_path=str(tmp_path), fmrl_modality="image")
    # a changed item list invalidates the features (hash mismatch)
    ids = folder / "tiny.item_ids"
    ids.write_text(ids.read_text().replace("\n", "\n", 1) + "999\n")
    with pytest.raises(feature_files.FeatureFileError, match="another item list"):
        build(tiny_config, data_path=str(tmp_path), fmrl_modality="text")
    # an item of the dataset missing from the feature rows
    tokens = ids.read_text().splitlines()[:-1]
    feature_files.write_item_ids(folder, "tiny", tokens[1:])
    feature_files.write_modality(folder, "tiny", "text", np.zeros((len(tokens) - 1, 4)), "x", False)
    with pytest.raises(feature_files.FeatureFileError, match=r"tiny\.text\.npy: 1 of 30 dataset items"):
        build(tiny_config, data_path=str(tmp_path), fmrl_modality="text")
    (folder / "tiny.features.json").unlink()
    with pytest.raises(feature_files.FeatureFileError, match="features.json: feature manifest not found"):
        build(tiny_config, data_path=str(tmp_path), fmrl_modality="text")


def test_end_to_end_run_checkpoint_reload(tiny_config, tmp_path):
    result = run(model="FMRLRec", dataset="tiny", config_dict=tiny_config(epochs=2), log=False)
    sizes = result["size_results"]
    assert list(sizes) == [8, 16]
    assert sizes[8]["params"] < sizes[16]["params"]
    for row in sizes.values():
        assert set(row["test"]) >= {"ndcg@10", "recall@10", "ndcg@20", "recall@5"}
        assert 0 <= row["test"]["ndcg@10"] <= row["test"]["recall@10"] <= 1
    assert result["test_result"] == sizes[16]["test"]
    # the checkpoint loads weights-only and reproduces the test metrics in a fresh trainer
    state = checkpoint.load(result["saved_model_file"])
    assert state["config"]["model"] == "FMRLRec" and state["config"]["hidden_size"] == 16
    config, net, trainer, (_, _, test) = build(tiny_config, epochs=2)
    reloaded = trainer.evaluate(test, load_best_model=True, model_file=result["saved_model_file"])
    assert reloaded == result["test_result"]
    assert trainer.size_results[8] == sizes[8]["test"]


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    import os

    from recbole_fmrl import atomic_write

    atomic_write.write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_recbole_model_lookup_leaves_anomaly_detection_off():
    from recbole_fmrl.train.registry import get_model

    assert get_model("SASRec").__name__ == "SASRec"
    assert not torch.is_anomaly_enabled()


def test_submodel_and_its_parameter_count_leave_the_rng_alone(tiny_config):
    _, net, _, _ = build(tiny_config)
    state = torch.get_rng_state()
    str(net)  # logs nested parameter counts per size, which builds sub-models
    net.submodel(8)
    assert torch.equal(torch.get_rng_state(), state)


def test_prepare_sets_flush_denormal_from_config(tiny_config):
    def subnormal():
        return (torch.tensor([1e-30]) * 1e-9).item()  # 1e-39: subnormal in float32

    try:
        build(tiny_config, fmrl_flush_denormal=False)
        assert subnormal() != 0.0
        build(tiny_config)  # overall.yaml default: flush
        assert subnormal() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_default_feature_norm_is_whiten(tiny_config):
    _, raw_net, _, _ = build(tiny_config, fmrl_modality="text", fmrl_feature_norm="none")
    _, net, _, _ = build(tiny_config, fmrl_modality="text")  # the YAML default
    raw = raw_net.network.item_encoder.features[1:].numpy()
    mask = np.ones(len(raw) + 1, dtype=bool)
    mask[0] = False
    expected = feature_files.normalize(np.concatenate([np.zeros((1, raw.shape[1]), np.float32), raw]), mask, "whiten")
    np.testing.assert_allclose(net.network.item_encoder.features.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_center_removes_the_mean_and_keeps_unit_mean_row_norm():
    array = np.array([[0, 0], [1, 5], [3, 5], [5, 8], [9, 9]], dtype=np.float32)
    mask = np.array([False, True, True, True, False])
    out = feature_files.normalize(array, mask, "center")
    real = array[mask] - array[mask].mean(axis=0)
    np.testing.assert_allclose(out[mask], real / np.linalg.norm(real, axis=1).mean(), rtol=1e-6)
    assert np.linalg.norm(out[mask], axis=1).mean() == pytest.approx(1.0)
    assert not out[~mask].any()


def test_whiten_decorrelates_and_keeps_unit_mean_row_norm():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6)) * np.array([10, 3, 1, 0.3, 0.1, 0.03])
    array = np.zeros((201, 6), dtype=np.float32)
    array[1:] = rng.normal(size=(200, 6)) @ mix.T + 5  # correlated, anisotropic, off-centre
    mask = np.ones(201, dtype=bool)
    mask[0] = False
    out = feature_files.normalize(array, mask, "whiten").astype(np.float64)
    assert np.linalg.norm(out[1:], axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    cov = out[1:].T @ out[1:] / 200
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-6)  # decorrelated
    real = array[1:].astype(np.float64) - array[1:].mean(axis=0)
    lam = np.linalg.eigvalsh(real.T @ real / 200)  # ascending, the order of the output axes
    kept = lam / (lam + feature_files.WHITEN_SHRINK * lam.mean())  # equal variance, damped by the ridge
    np.testing.assert_allclose(np.diag(cov) / np.diag(cov).max(), kept / kept.max(), rtol=1e-4)
    assert kept[-1] > 0.99 and kept[0] < 0.01  # the main axis keeps its share, a near-empty one is damped
    assert not out[0].any()
