r"""FMRLRec
################################################

Reference:
    Yueqi Wang, Zhenrui Yue, Huimin Zeng, Dong Wang, Julian McAuley. "Train Once, Deploy Anywhere:
    Matryoshka Representation Learning for Multimodal Recommendation." EMNLP Findings 2024.

Frozen text/image item features are fused by one linear projection and fed through stacked
nested LRU blocks. Every weight is block lower-triangular over the sizes m_1 < ... < m_K = d, so the
first m dims of the whole network form a complete size-m model; one training with a Matryoshka
loss summed over sizes yields a model for every size.
"""
import copy

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.data.modality import has_id_table, modality_parts
from recbole_fmrl.model.distill import nested_distillation
from recbole_fmrl.model.fusion import FeatureFusion, IdEmbedding
from recbole_fmrl.model.labels import labelled_states
from recbole_fmrl.model.loss import matryoshka_logits
from recbole_fmrl.model.lru import LRULayer, Packing
from recbole_fmrl.model.nested import NestedLayerNorm, NestedLinear, check_sizes, default_sizes
from recbole_fmrl.model.sampled_loss import nested_softmax_loss


class FMRLBlock(nn.Module):
    """Pre-LN block: h = x + LRU(LN1 x); y = h + Drop(W2(SiLU(G z) * Drop(W1 z))), z = LN2 h."""

    def __init__(self, sizes, ffn_ratio, dropout, lru_dropout, r_min, r_max, scan):
        super().__init__()
        inner = [ffn_ratio * m for m in sizes]
        self.ln1 = NestedLayerNorm(sizes)
        self.lru = LRULayer(sizes, r_min=r_min, r_max=r_max, dropout=lru_dropout, scan=scan)
        self.ln2 = NestedLayerNorm(sizes)
        self.gate = NestedLinear(sizes, inner)  # up-scale d -> r*d
        self.w1 = NestedLinear(sizes, inner)
        self.w2 = NestedLinear(inner, sizes)  # down-scale r*d -> d
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, packing):  # [V d] real tokens
        h = x + self.lru(self.ln1(x), packing)
        z = self.ln2(h)
        return h + self.dropout(self.w2(F.silu(self.gate(z)) * self.dropout(self.w1(z))))


class FMRLRec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.hidden_size = config["hidden_size"]
        self.n_layers = config["n_layers"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.sizes = check_sizes(config["fmrl_sizes"] or default_sizes(self.hidden_size), self.hidden_size)
        weights = config["fmrl_size_weights"] or [1.0] * len(self.sizes)
        if isinstance(weights, dict):  # {size: weight}: unlisted sizes weigh 1, so one setting fits any d
            weights = [float(weights.get(m, weights.get(str(m), 1.0))) for m in self.sizes]
        if len(weights) != len(self.sizes) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"fmrl_size_weights: need {len(self.sizes)} non-negative weights, got {weights}")
        self.modality = dataset.fmrl_modality if hasattr(dataset, "fmrl_modality") else config["fmrl_modality"]
        self.loss_chunk_size = config["fmrl_loss_chunk_size"]
        self.native_loss = config["fmrl_native_loss"]
        self.train_negatives = config["fmrl_train_negatives"]  # keys checked by train/schema.py
        self.distill_weight, self.distill_rows = float(config["fmrl_distill_weight"]), config["fmrl_distill_rows"]
        self.target_list_field = getattr(dataset, "target_list_field", None)
        self._build_args = (config, dataset)  # to build sub-models of smaller sizes
        self._table_cache = None

        # define layers
        parts = modality_parts(self.modality)
        if parts:
            if not hasattr(dataset, "item_features"):
                raise ValueError(f"fmrl_modality={self.modality!r} needs FMRLDataset (build the run with recbole_fmrl.train.driver.prepare)")
            features = dataset.item_features(parts, config["fmrl_feature_norm"] or "none")
            ids = self.n_items if has_id_table(self.modality) else None  # text_id etc.: + a learned ID table
            self.item_encoder = FeatureFusion(features, self.hidden_size, n_items=ids)
        else:
            self.item_encoder = IdEmbedding(self.n_items, self.hidden_size)
        self.input_dropout = nn.Dropout(self.hidden_dropout_prob)
        self.blocks = nn.ModuleList(
            FMRLBlock(self.sizes, config["fmrl_ffn_ratio"], self.hidden_dropout_prob, self.attn_dropout_prob,
                      config["fmrl_ring_r_min"], config["fmrl_ring_r_max"], config["fmrl_scan"])
            for _ in range(self.n_layers))

        # parameters initialization: nested layers initialise block-wise themselves (fan-in m_k)
        self.register_buffer("size_weights", torch.tensor(weights, dtype=torch.float) / sum(weights), persistent=False)

    def train(self, mode=True):
        self._table_cache = None  # parameters may change: the cached eval item table is stale
        return super().train(mode)

    def item_table(self):
        """Projected item table [N+1 d]; computed once per step. In eval mode it is cached for as long
        as the item encoder's tensors are unchanged: keyed on each one's storage and in-place version
        counter, so an optimiser step, ``load_state_dict`` or an in-place edit recomputes it."""
        if self.training:
            return self.item_encoder()
        key = tuple((t.data_ptr(), t._version) for t in (*self.item_encoder.parameters(), *self.item_encoder.buffers()))
        if self._table_cache is None or self._table_cache[0] != key:  # evaluation only: no gradient needed
            self._table_cache = (key, self.item_encoder().detach())
        return self._table_cache[1]

    def encode(self, item_seq, item_seq_len, table=None):
        """Final hidden states of the real tokens [V d] and their Packing (padding is skipped)."""
        packing = Packing(item_seq_len)
        ids = item_seq[:, : packing.length].flatten()[packing.index]  # [V]
        x = self.item_encoder(ids) if table is None else table[ids]
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x, packing)
        return x, packing

    def forward(self, item_seq, item_seq_len, table=None):  # [B L] -> [B d], the last state
        x, packing = self.encode(item_seq, item_seq_len, table)
        return x[packing.last]

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]  # [B L], [B]
        table = self.item_table()  # [N+1 d], once for inputs and outputs of every size
        x, packing = self.encode(item_seq, item_seq_len, table)  # [V d]
        hidden, labels = labelled_states(self, interaction, x, x[packing.last], packing.gather)  # [P d], [P]
        per_size = nested_softmax_loss(hidden, table[1:], labels - 1, self.sizes, self.train_negatives,
                                       chunk_size=self.loss_chunk_size, weights=self.size_weights,
                                       native=self.native_loss)
        if self.distill_weight:  # each smaller size also matches the largest size's distribution
            per_size = per_size + self.distill_weight * nested_distillation(hidden, table[1:], self.sizes,
                                                                            self.distill_rows)
        return tuple(per_size * self.size_weights)  # RecBole sums them and logs each size

    def _last_hidden(self, interaction):
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], self.item_table())  # [B d]

    def predict(self, interaction):
        hidden = self._last_hidden(interaction)
        return (hidden * self.item_table()[interaction[self.ITEM_ID]]).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        return self.full_sort_predict_sizes(interaction)[-1]  # [B N+1], the largest size

    def full_sort_predict_sizes(self, interaction):
        """Scores of every size from one pass: [K B N+1] (column 0 is padding)."""
        return matryoshka_logits(self._last_hidden(interaction), self.item_table(), self.sizes)

    def model_args(self):
        """Plain hyper-parameters that rebuild this network without RecBole (nanoGPT-style)."""
        config = self._build_args[0]
        return {"model": "FMRLRec", "hidden_size": self.hidden_size, "sizes": list(self.sizes),
                "n_layers": self.n_layers, "ffn_ratio": int(config["fmrl_ffn_ratio"]),
                "state_ratio": self.blocks[0].lru.state_size // self.hidden_size if self.n_layers else 1,
                "layer_norm_eps": self.blocks[0].ln1.eps if self.n_layers else 1e-5,
                "modality": self.modality, "feature_norm": config["fmrl_feature_norm"] or "none",
                "n_items": int(self.n_items), "max_seq_length": int(self.max_seq_length)}

    def export_info(self):
        """What an export needs besides the weights: ``model_args`` and the item catalog (cached)."""
        if getattr(self, "_export_info", None) is None:
            from recbole_fmrl.data.catalog import item_catalog

            self._export_info = {"model_args": self.model_args(),
                                 **item_catalog(self._build_args[1], modality_parts(self.modality))}
        return self._export_info

    def nested_parameter_count(self, size=None):
        """Trainable parameters of the size-m model, counting only non-zero nested blocks."""
        model = self if size is None or size == self.hidden_size else self.submodel(size)
        nested = {m for m in model.modules() if isinstance(m, NestedLinear)}
        counted = sum(m.nested_numel() for m in nested)
        skip = {id(p) for m in nested for p in m.parameters()}
        return counted + sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in skip)

    def __str__(self):
        return (super().__str__() + "\nNested (non-zero block) parameters per size: "
                + ", ".join(f"{m}: {self.nested_parameter_count(m):,}" for m in self.sizes))

    def submodel(self, size):
        """A standalone size-m FMRLRec whose weights are the first-m slices of this model's."""
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one of the nested sizes {self.sizes}")
        with torch.random.fork_rng(devices=[]):  # building the sub-model must not consume the run's RNG
            return self._build_submodel(size)

    def _build_submodel(self, size):
        config, dataset = self._build_args
        config = copy.copy(config)
        config.final_config_dict = dict(config.final_config_dict, hidden_size=size,
                                        fmrl_sizes=self.sizes[: self.sizes.index(size) + 1])
        if config["fmrl_size_weights"] and not isinstance(config["fmrl_size_weights"], dict):
            config.final_config_dict["fmrl_size_weights"] = config["fmrl_size_weights"][: self.sizes.index(size) + 1]
        reference = next(self.parameters())
        small = type(self)(config, dataset).to(device=reference.device, dtype=reference.dtype)
        target = small.state_dict()
        small.load_state_dict({k: v[tuple(slice(0, s) for s in target[k].shape)]
                               for k, v in self.state_dict().items()})
        return small.train(self.training)
