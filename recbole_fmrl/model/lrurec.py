r"""LRURec
################################################

Reference:
    Zhenrui Yue, Yueqi Wang, Zhankui He, Huimin Zeng, Julian McAuley, Dong Wang. "Linear Recurrent
    Units for Sequential Recommendation." WSDM 2024.

Reference code:
    https://github.com/yueqirex/LRURec

ID-based LRURec with its own settings (not fMRLRec's):

- item embedding -> Dropout -> LayerNorm;
- ``n_layers`` (2) post-LN blocks: x = LN(x + LRU(x)), x = LN(x + Drop(W2 Drop(GELU(W1 x)))),
  feed-forward width ``inner_size`` (4d);
- LRU with a 2d complex state, ring radius r in [0.8, 0.99] at initialisation (the shared
  ``LRULayer`` with ``sizes=[d]``, ``state_ratio=2``; one size, so nothing is nested);
- scores X E^T + b_item (tied embedding plus a per-item bias);
- truncated-normal init (std 0.02, clipped to +-0.04) of every parameter except LayerNorms and
  the LRU log-parameters, real and imaginary parts separately;
- full-softmax cross-entropy at every position of a user window (``all_positions``) or at the
  last position (``last_position``, RecBole's prefix samples).

RecBole pads on the right, so the causal scan needs no padding mask: padding comes after the
valid items and cannot reach them; the prediction reads position ``len - 1``. Position-wise layers
run on the real tokens only (the LRU layer's ``Packing``), the scan on the batch's longest sequence.
Differences from the reference, by the benchmark's protocol: the softmax excludes the padding
column, and evaluation does not mask the history (LRURec masks every input item).
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.model.labels import labelled_states
from recbole_fmrl.model.lru import LRULayer, Packing


class LRUBlock(nn.Module):
    """Post-LN: h = LN(x + LRU(x)); y = LN(h + Drop(W2 Drop(GELU(W1 h))))."""

    def __init__(self, hidden_size, inner_size, dropout, lru_dropout, r_min, r_max, scan, state_ratio, eps):
        super().__init__()
        self.lru = LRULayer([hidden_size], r_min=r_min, r_max=r_max, dropout=lru_dropout, scan=scan,
                            bias=True, state_ratio=state_ratio)
        self.lru_layer_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.w_1 = nn.Linear(hidden_size, inner_size)
        self.w_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.ffn_layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x, packing):  # [V d] real tokens laid out by packing
        h = self.lru_layer_norm(x + self.lru(x, packing))
        return self.ffn_layer_norm(h + self.dropout(self.w_2(self.dropout(F.gelu(self.w_1(h))))))


class LRURec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.n_layers = config["n_layers"]
        self.hidden_size = config["hidden_size"]
        self.inner_size = config["inner_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        if config["loss_type"] != "CE":
            raise ValueError(f"LRURec supports loss_type CE only, got {config['loss_type']!r}")
        self.target_list_field = getattr(dataset, "target_list_field", None)

        # define layers
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.embedding_dropout = nn.Dropout(self.hidden_dropout_prob)
        self.embedding_layer_norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.blocks = nn.ModuleList(
            LRUBlock(self.hidden_size, self.inner_size, self.hidden_dropout_prob, self.attn_dropout_prob,
                     config["fmrl_ring_r_min"], config["fmrl_ring_r_max"], config["fmrl_scan"],
                     config["fmrl_lru_state_ratio"], self.layer_norm_eps)
            for _ in range(self.n_layers))
        self.item_bias = nn.Parameter(torch.zeros(self.n_items))

        # parameters initialization
        self.truncated_normal_init()

    @torch.no_grad()
    def truncated_normal_init(self):
        """N(0, std) clipped to +-2 std on every parameter but LayerNorms and LRU log-parameters."""
        std = self.initializer_range
        for name, param in self.named_parameters():
            if "layer_norm" in name or "params_log" in name:
                continue
            nn.init.trunc_normal_(param, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def encode(self, item_seq, item_seq_len):
        """Final hidden states of the real tokens [V d] and their Packing (padding is skipped)."""
        packing = Packing(item_seq_len)
        ids = item_seq[:, : packing.length].flatten()[packing.index]  # [V]
        x = self.embedding_layer_norm(self.embedding_dropout(self.item_embedding(ids)))
        for block in self.blocks:
            x = block(x, packing)
        return x, packing

    def forward(self, item_seq, item_seq_len):  # [B L], [B] -> [B d], the last state
        x, packing = self.encode(item_seq, item_seq_len)
        return x[packing.last]

    def scores(self, hidden):  # [..., d] -> [..., N+1]
        return hidden @ self.item_embedding.weight.T + self.item_bias

    def calculate_loss(self, interaction):
        x, packing = self.encode(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [V d]
        hidden, labels = labelled_states(self, interaction, x, x[packing.last], packing.gather)  # [P d], [P]
        logits = hidden @ self.item_embedding.weight[1:].T + self.item_bias[1:]  # [P N], padding excluded
        return F.cross_entropy(logits, labels - 1)

    def _last_hidden(self, interaction):
        return self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B d]

    def predict(self, interaction):
        hidden = self._last_hidden(interaction)
        item = interaction[self.ITEM_ID]
        return (hidden * self.item_embedding(item)).sum(-1) + self.item_bias[item]  # [B]

    def full_sort_predict(self, interaction):
        return self.scores(self._last_hidden(interaction))  # [B N+1]
