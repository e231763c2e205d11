"""FMRLDataset: RecBole's SequentialDataset plus item feature tables and the all-positions signal.

Feature rows are aligned to RecBole's internal item ids through ``field2id_token`` (row 0 is the
padding item). With ``fmrl_train_objective: all_positions`` each user's training sequence becomes
windows of MAX_ITEM_LIST_LENGTH inputs with a next-item label at every position (the reference's
signal, ~8x fewer samples than RecBole's prefix augmentation on Amazon data). Sequences longer than
the window are cut from the end into consecutive windows, so no training interaction is dropped.
"""
from pathlib import Path

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.data.interaction import Interaction
from recbole.utils import FeatureSource, FeatureType

from recbole_fmrl.data import features as feature_files
from recbole_fmrl.data.modality import resolve_modality

OBJECTIVES = ("all_positions", "last_position")


class FMRLDataset(SequentialDataset):
    def __init__(self, config):
        objective = config["fmrl_train_objective"]
        if objective not in OBJECTIVES:
            raise ValueError(f"fmrl_train_objective: unknown value {objective!r}; expected one of {OBJECTIVES}")
        super().__init__(config)
        self.target_list_field = self.iid_field + "_target" + config["LIST_SUFFIX"]
        self.feature_dir = feature_files.locate(config)
        found = feature_files.available_modalities(self.feature_dir, self.dataset_name)
        self.fmrl_modality = resolve_modality(config["fmrl_modality"], found, str(self.feature_dir),
                                              Path(self.dataset_path) / f"{self.dataset_name}.item",
                                              config["fmrl_text_fields"])
        self._feature_cache = {}

    def item_features(self, parts, norm="none"):
        """Concatenated frozen features [item_num, F] (float32) in internal-id order; row 0 zero.

        ``norm`` (see ``features.normalize``) applies to each modality's table on its own.
        """
        tables = []
        for modality in parts:
            if (modality, norm) not in self._feature_cache:
                table = feature_files.read_modality(self.feature_dir, self.dataset_name, modality)
                source = feature_files.paths(self.feature_dir, self.dataset_name)[modality]
                aligned, mask = feature_files.align(table, self.field2id_token[self.iid_field], source=source)
                check_informative(aligned, mask, source)
                normed = feature_files.normalize(aligned, mask, norm)
                self._feature_cache[modality, norm] = torch.from_numpy(normed)
            tables.append(self._feature_cache[modality, norm])
        return torch.cat(tables, dim=1)

    def build(self):
        datasets = super().build()
        if self.config["fmrl_train_objective"] == "all_positions":
            datasets[0] = self._windowed(datasets[0])
        return datasets

    def _windowed(self, train):
        """One sample per window of a user's training sequence, labelled at every position."""
        feat = train.inter_feat
        uid = feat[self.uid_field].numpy()
        order = np.lexsort((feat[self.time_field].numpy(), uid)) if self.time_field in feat else np.argsort(uid, kind="stable")
        uid, first = uid[order], feat[self.item_id_list_field][order, 0].numpy()
        target = feat[self.iid_field][order].numpy()
        starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
        ends = np.r_[starts[1:], len(uid)]
        width = self.max_item_list_len
        users, inputs, labels = [], [], []
        for s, e in zip(starts, ends):
            seq = np.concatenate([[first[s]], target[s:e]])  # the full training sequence
            for stop in range(len(seq), 1, -width):  # windows cut from the end
                lo = max(0, stop - 1 - width)
                users.append(uid[s])
                inputs.append(seq[lo : stop - 1])
                labels.append(seq[lo + 1 : stop])
        n = len(inputs)
        item_list = np.zeros((n, width), dtype=np.int64)
        target_list = np.zeros((n, width), dtype=np.int64)
        lengths = np.fromiter((len(x) for x in inputs), dtype=np.int64, count=n)
        for i, (x, y) in enumerate(zip(inputs, labels)):
            item_list[i, : len(x)], target_list[i, : len(y)] = x, y
        self.set_field_property(self.target_list_field, FeatureType.TOKEN_SEQ, FeatureSource.INTERACTION, width)
        windows = Interaction({
            self.uid_field: torch.from_numpy(np.asarray(users, dtype=np.int64)),
            self.item_id_list_field: torch.from_numpy(item_list),
            self.item_list_length_field: torch.from_numpy(lengths),
            self.target_list_field: torch.from_numpy(target_list),
            self.iid_field: torch.from_numpy(target_list[np.arange(n), lengths - 1]),
        })
        self.logger.info(f"all_positions objective: {len(feat)} prefix samples -> {n} training windows")
        return train.copy(windows)


# A feature table is refused when more than this share of the items' rows equal one row, or when its
# total variance is below TINY_VARIANCE x its mean squared row norm: the items would be indistinguishable.
MAX_SHARED_ROW = 0.5
TINY_VARIANCE = 1e-8


def check_informative(aligned, mask, source, block_rows=4096):
    """Refuse (naming ``source``) a table with NaN/Inf, or whose item rows are (near-)identical.

    One pass in blocks of rows: an exact 64-bit fingerprint of each row's bytes (equal rows, equal
    keys) counts the most shared row; 8 random projections of the rows' offsets from the first row
    estimate the total variance (E[r^T C r] = trace C for Gaussian r) without a float64 copy of the table.
    """
    idx = np.flatnonzero(mask)
    if len(idx) < 2:
        return
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 2 ** 63, size=aligned.shape[1], dtype=np.uint64) | np.uint64(1)
    directions = rng.standard_normal((aligned.shape[1], 8))
    ref = aligned[idx[0]].astype(np.float64)
    keys, proj = np.empty(len(idx), np.uint64), np.empty((len(idx), 8))
    bad, squares = 0, 0.0
    for start in range(0, len(idx), block_rows):
        block = np.ascontiguousarray(aligned[idx[start: start + block_rows]], dtype=np.float32)
        bad += int((~np.isfinite(block).all(axis=1)).sum())
        keys[start: start + len(block)] = (block.view(np.uint32).astype(np.uint64) * weights).sum(axis=1)
        wide = block.astype(np.float64)
        squares += float(np.einsum("ij,ij->", wide, wide))
        proj[start: start + len(block)] = (wide - ref) @ directions
    if bad:
        raise feature_files.FeatureFileError(
            f"{source}: {bad} of {len(idx)} item rows hold NaN or Inf; rebuild the features")
    shared = int(np.unique(keys, return_counts=True)[1].max())
    variance = float(proj.var(axis=0).mean())
    if shared > MAX_SHARED_ROW * len(idx) or variance <= TINY_VARIANCE * max(squares / len(idx), 1e-30):
        raise feature_files.FeatureFileError(
            f"{source}: the items' feature rows are (near-)identical ({shared} of {len(idx)} rows equal one row, "
            f"total variance {variance:.3g}): they cannot tell items apart; rebuild the features from text that "
            f"differs per item, or set fmrl_modality=id")
