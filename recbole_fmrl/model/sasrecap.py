r"""SASRecAP
################################################

Reference:
    Wang-Cheng Kang, Julian McAuley. "Self-Attentive Sequential Recommendation." ICDM 2018.

    Anton Klenitskiy, Alexey Vasilev. "Turning Dross Into Gold Loss: is BERT4Rec really better than
    SASRec?" RecSys 2023 (SASRec trained with full-softmax cross-entropy at every position, "SASRec+").

SASRec at every position (AP): RecBole's SASRec network (item + learned position embeddings ->
LayerNorm -> Dropout -> RecBole's post-LN ``TransformerEncoder`` with a causal attention mask,
scores against the tied item embedding) trained the way the strongest published SASRec numbers
were: a full-softmax cross-entropy over all items at *every* position of a user window
(``fmrl_train_objective: all_positions``, the windows FMRLRec and LRURec train on), not only at the
last position of RecBole's prefix-augmented samples (``last_position`` still works). With
``fmrl_train_negatives: n`` the softmax at each position covers the label and n uniformly drawn items
(eSASRec's "SASRec+SS", n = 256) instead of every item.

RecBole pads on the right, so position ids count from the first real item and the batch is cut
to its longest sequence (trailing padding is masked anyway). The softmax excludes the padding
column (as LRURec and FMRLRec); evaluation does not mask the history.
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder
from recbole.utils import InputType
from torch import nn

from recbole_fmrl.model.labels import labelled_states
from recbole_fmrl.model.sampled_loss import nested_softmax_loss


class SASRecAP(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.n_layers = config["n_layers"]
        self.n_heads = config["n_heads"]
        self.hidden_size = config["hidden_size"]
        self.inner_size = config["inner_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.attn_dropout_prob = config["attn_dropout_prob"]
        self.hidden_act = config["hidden_act"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        self.loss_chunk_size = config["fmrl_loss_chunk_size"]
        self.native_loss = config["fmrl_native_loss"]
        self.train_negatives = config["fmrl_train_negatives"]  # checked by train/schema.py
        if config["loss_type"] != "CE":
            raise ValueError(f"SASRecAP supports loss_type CE only, got {config['loss_type']!r}")
        self.target_list_field = getattr(dataset, "target_list_field", None)

        # define layers
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = TransformerEncoder(
            n_layers=self.n_layers, n_heads=self.n_heads, hidden_size=self.hidden_size,
            inner_size=self.inner_size, hidden_dropout_prob=self.hidden_dropout_prob,
            attn_dropout_prob=self.attn_dropout_prob, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)

        # parameters initialization (RecBole's SASRec: N(0, initializer_range), LayerNorm 1/0)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def encode(self, item_seq, item_seq_len):  # [B L], [B] -> [B L' d], every position, L' = longest
        item_seq = item_seq[:, : max(1, int(item_seq_len.max()))]
        positions = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0)  # [1 L']
        x = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        mask = self.get_attention_mask(item_seq)  # [B 1 L' L'] causal, padding keys masked
        return self.trm_encoder(x, mask, output_all_encoded_layers=True)[-1]

    def forward(self, item_seq, item_seq_len):  # [B L], [B] -> [B d], the state at position len - 1
        return self.gather_indexes(self.encode(item_seq, item_seq_len), item_seq_len - 1)

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]  # [B L], [B]
        states = self.encode(item_seq, item_seq_len)  # [B L' d]
        last = self.gather_indexes(states, item_seq_len - 1)  # [B d]
        hidden, labels = labelled_states(self, interaction, states, last,
                                         lambda targets: targets[:, : states.shape[1]])  # [P d], [P]
        table = self.item_embedding.weight[1:]  # [N d], padding excluded from the softmax
        loss = nested_softmax_loss(hidden, table, labels - 1, [self.hidden_size], self.train_negatives,
                                   chunk_size=self.loss_chunk_size, weights=hidden.new_ones(1), native=self.native_loss)
        return loss[0]

    def predict(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B d]
        return (hidden * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B d]
        return hidden @ self.item_embedding.weight.T  # [B N+1]
