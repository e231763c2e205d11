r"""FMRLRec
################################################

Reference:
    Yueqi Wang, Zhenrui Yue, Huimin Zeng, Dong Wang, Julian McAuley. "Train Once, Deploy Anywhere:
    Matryoshka Representation Learning for Multimodal Recommendation." EMNLP Findings 2024.

The RecBole face of the plain-torch network in ``network.py``: this class reads the config once
(``model_args``, the training settings), builds the item table from the dataset's features and
trains the network with a Matryoshka loss summed over the nested sizes, so that one training
yields a model for every size.

RecBole key names are kept where RecBole users expect them; for FMRLRec they mean:
``hidden_size`` the largest nested size d, ``hidden_dropout_prob`` the dropout on the input
embeddings and inside the feed-forward, ``attn_dropout_prob`` (there is no attention) the dropout
on the LRU output, ``MAX_ITEM_LIST_LENGTH`` the input window.
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_fmrl.data.modality import modality_parts
from recbole_fmrl.model.distill import nested_distillation
from recbole_fmrl.model.fusion import item_encoder
from recbole_fmrl.model.labels import labelled_states
from recbole_fmrl.model.loss import matryoshka_logits
from recbole_fmrl.model.network import PREFIX, FMRLNet, ModelArgs
from recbole_fmrl.model.sampled_loss import nested_softmax_loss


def model_args(config, modality, n_items, window) -> ModelArgs:
    """The network's arguments from a RecBole config: where FMRLRec reads its architecture keys."""
    return ModelArgs(
        hidden_size=config["hidden_size"], n_items=int(n_items), sizes=config["fmrl_sizes"],
        n_layers=config["n_layers"], ffn_ratio=int(config["fmrl_ffn_ratio"]), dropout=config["hidden_dropout_prob"],
        lru_dropout=config["attn_dropout_prob"], ring_r_min=config["fmrl_ring_r_min"],
        ring_r_max=config["fmrl_ring_r_max"], scan=config["fmrl_scan"], modality=modality,
        feature_norm=config["fmrl_feature_norm"] or "none", max_seq_length=int(window))


def size_weights(weights, sizes):
    """``fmrl_size_weights`` as a tensor summing to 1: a list (one per size), a mapping {size: weight}
    (unlisted sizes weigh 1, so one setting fits any d) or None (uniform)."""
    weights = weights or [1.0] * len(sizes)
    if isinstance(weights, dict):
        weights = [float(weights.get(m, weights.get(str(m), 1.0))) for m in sizes]
    if len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"fmrl_size_weights: need {len(sizes)} non-negative weights, got {weights}")
    return torch.tensor(weights, dtype=torch.float) / sum(weights)


def _legacy_keys(state_dict, prefix, *_):
    """Checkpoints written before the network moved under ``network.`` keep loading."""
    for key in [k for k in state_dict if k.startswith(prefix + "item_encoder.") or k.startswith(prefix + "blocks.")]:
        state_dict[prefix + PREFIX + key[len(prefix):]] = state_dict.pop(key)


class FMRLRec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        modality = dataset.fmrl_modality if hasattr(dataset, "fmrl_modality") else config["fmrl_modality"]
        self.args = model_args(config, modality, self.n_items, self.max_seq_length)
        self.sizes, self.hidden_size, self.modality = self.args.sizes, self.args.hidden_size, modality
        # training settings
        self.register_buffer("size_weights", size_weights(config["fmrl_size_weights"], self.sizes), persistent=False)
        self.loss_chunk_size = config["fmrl_loss_chunk_size"]
        self.native_loss = config["fmrl_native_loss"]
        self.train_negatives = config["fmrl_train_negatives"]  # keys checked by train/schema.py
        self.distill_weight, self.distill_rows = float(config["fmrl_distill_weight"]), config["fmrl_distill_rows"]
        self.target_list_field = getattr(dataset, "target_list_field", None)
        self._dataset, self._export_info = dataset, None  # the item catalog, for exports

        features = None
        if modality_parts(modality):
            if not hasattr(dataset, "item_features"):
                raise ValueError(f"fmrl_modality={modality!r} needs FMRLDataset (build the run with recbole_fmrl.train.driver.prepare)")
            features = dataset.item_features(modality_parts(modality), self.args.feature_norm)
        # nested layers initialise block-wise themselves (fan-in m_k)
        self.network = FMRLNet(self.args, item_encoder(modality, self.n_items, self.hidden_size, features))
        self._register_load_state_dict_pre_hook(_legacy_keys)

    def item_table(self):
        return self.network.item_table()  # [N+1 d]

    def forward(self, item_seq, item_seq_len, table=None):  # [B L] -> [B d], the last state
        return self.network(item_seq, item_seq_len, table)

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]  # [B L], [B]
        table = self.item_table()  # [N+1 d], once for inputs and outputs of every size
        x, packing = self.network.encode(item_seq, item_seq_len, table)  # [V d]
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

    def export_info(self):
        """What an export needs besides the weights: the network's arguments and the item catalog (cached)."""
        if self._export_info is None:
            from recbole_fmrl.data.catalog import item_catalog

            self._export_info = {"model_args": self.args.to_dict(),
                                 **item_catalog(self._dataset, modality_parts(self.modality))}
        return self._export_info

    def submodel(self, size):
        """The standalone size-m network (plain torch): the first-m slices of this model's weights."""
        return self.network.truncate(size)

    def nested_parameter_count(self, size=None):
        """Trainable parameters of the size-m network, counting only non-zero nested blocks."""
        return self.network.truncate(size or self.hidden_size).nested_parameter_count()

    def __str__(self):
        return (super().__str__() + "\nNested (non-zero block) parameters per size: "
                + ", ".join(f"{m}: {self.nested_parameter_count(m):,}" for m in self.sizes))
