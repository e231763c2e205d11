"""Item tables: frozen text/image features fused by one linear projection (fMRLRec eq. 6-7).

The projected table E = W_p [T ; V] + b_p is both the input embedding and the output item table.
The projection is a plain (un-masked) linear: output dims are already nested, since row i of W_p
only ever feeds hidden dim i, so the size-m model uses rows [:m] of W_p and b_p.

Hybrid items (``fmrl_modality: text_id``, ``image_id``, ``text_image_id``) add a learned item-ID table:
E = W_p [T ; V] + b_p + E_id. An embedding table is nested as it is: column i of E_id only ever feeds
hidden dim i, so the size-m model's table is E_id[:, :m] (the first m dims of every item's vector).

An exported network holds the projected table itself (``ItemTable``): no features, no projection.
Every item module maps internal ids [...] to vectors [... d], and None to the whole table [N+1 d].
"""
import torch
from torch import nn

from recbole_fmrl.data.modality import has_id_table, modality_parts


def item_encoder(modality, n_items, hidden_size, features=None):
    """The item module of ``modality``: projected ``features`` [N+1 F] (text, image; + an ID table for
    hybrids such as text_id) or a learned ID table (id)."""
    if not modality_parts(modality):
        return IdEmbedding(n_items, hidden_size)
    if features is None:
        raise ValueError(f"modality {modality!r} needs the item feature table")
    return FeatureFusion(features, hidden_size, n_items=n_items if has_id_table(modality) else None)


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

    def resized(self, hidden_size):
        """The same kind of module at width ``hidden_size`` over the same features (weights to be loaded)."""
        return FeatureFusion(self.features, hidden_size, None if self.ids is None else self.ids.embedding.num_embeddings)


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

    def resized(self, hidden_size):
        return IdEmbedding(self.embedding.num_embeddings, hidden_size)


class ItemTable(nn.Module):
    """A fixed item table [N+1 d] (an export's projected table): looked up, never computed."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, item_ids=None):
        return self.table if item_ids is None else self.table[item_ids]

    def resized(self, hidden_size):
        return ItemTable(self.table.new_zeros(self.table.shape[0], hidden_size))
