"""Shared fixtures: a tiny RecBole dataset in the real atomic format, with feature files."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from recbole_fmrl.data import features as feature_files

TEXT_DIM, IMAGE_DIM = 12, 6


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=30, seed=0, with_image=True):
    """Users with 6-70 chronological interactions; feature rows in a shuffled token order.

    Row features encode their own token (column 0 = int(token)), so alignment can be checked.
    """
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        length = int(rng.integers(6, 70))
        # a learnable pattern: mostly walk item -> item+1, with noise
        start = int(rng.integers(0, n_items))
        for t in range(length):
            item = (start + t) % n_items if rng.random() < 0.8 else int(rng.integers(0, n_items))
            lines.append(f"u{u}\t{100 + item}\t{1_000_000 + 10 * t + u % 3}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    tokens = [str(100 + i) for i in rng.permutation(n_items)]
    feature_files.write_item_ids(folder, name, tokens)
    text = rng.normal(size=(n_items, TEXT_DIM)).astype(np.float32)
    text[:, 0] = [int(t) for t in tokens]
    feature_files.write_modality(folder, name, "text", text, encoder="random-test", normalized=False)
    if with_image:
        image = rng.normal(size=(n_items, IMAGE_DIM)).astype(np.float32)
        image[:, 0] = [-int(t) for t in tokens]
        feature_files.write_modality(folder, name, "image", image, encoder="random-test", normalized=False)
    return folder


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root)
    return root


@pytest.fixture
def tiny_config(tiny_root, tmp_path):
    """config_dict for a fast run on the tiny dataset; override keys per test."""

    def make(**overrides):
        cfg = {
            "data_path": str(tiny_root), "fmrl_output_dir": str(tmp_path / "runs"),
            "fmrl_cache_dir": str(tmp_path / "cache"), "hidden_size": 16, "fmrl_sizes": [8, 16],
            "epochs": 2, "train_batch_size": 16, "eval_batch_size": 64, "show_progress": False,
            "use_gpu": False, "state": "ERROR", "topk": [5, 10, 20], "MAX_ITEM_LIST_LENGTH": 20, "seed": 7,
        }
        cfg.update(overrides)
        return cfg

    return make


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
