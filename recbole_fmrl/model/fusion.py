"""Item tables: frozen text/image features fused by one linear projection (fMRLRec eq. 6-7).

The projected table E = W_p [T ; V] + b_p is both the input embedding and the output item table.
The projection is a plain (un-masked) linear: output dims are already nested, since row i of W_p
only ever feeds hidden dim i, so the size-m model uses rows [:m] of W_p and b_p.

Hybrid items (``fmrl_modality: text_id``, ``image_id``, ``text_image_id``) add a learned item-ID table:
E = W_p [T ; V] + b_p + E_id. An embedding table is nested as it is: column i of E_id only ever feeds
hidden dim i, so the size-m model's table is E_id[:, :m] (the first m dims of every item's vector).
"""
import torch
from torch import nn


class FeatureFusion(nn.Module):
    """Projects concatenated frozen features [N+1, F] to the hidden size; row 0 is padding."""

    def __init__(self, features, hidden_size, n_items=None):
        super().__init__()
        # Non-persistent: checkpoints stay small and are rebuilt from the dataset's feature files.
        self.register_buffer("features", features, persistent=False)  # [N+1 F]
        self.proj = nn.Linear(features.shape[1], hidden_size)
        self.ids = None if n_items is None else IdEmbedding(n_items, hidden_size)  # hybrid: + E_id [N+1 d]

    def forward(self, item_ids=None):  # [...] -> [... d]; None -> the whole table [N+1 d]
        feats = self.features if item_ids is None else self.features[item_ids]
        out = self.proj(feats)
        return out if self.ids is None else out + self.ids(item_ids)


class IdEmbedding(nn.Module):
    """Learned item-ID table: the paper's "w/o Lang. & Image" ablation."""

    def __init__(self, n_items, hidden_size):
        super().__init__()
        self.embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, item_ids=None):
        return self.embedding.weight if item_ids is None else self.embedding(item_ids)
