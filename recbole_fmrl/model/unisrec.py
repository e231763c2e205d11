r"""UniSRec
################################################

Reference:
    Yupeng Hou, Shanlei Mu, Wayne Xin Zhao, Yaliang Li, Bolin Ding, Ji-Rong Wen. "Towards Universal
    Sequence Representation Learning for Recommender Systems." KDD 2022.

Reference code:
    https://github.com/RUCAIBox/UniSRec

Variant built here: the paper's **transductive fine-tuned** model on the target domain alone,
"UniSRec_t+ID" (``train_stage: transductive_ft``), trained from scratch: there is no pre-training corpus,
so the adaptor and the encoder start from their initialisation, as the reference's ``finetune.py``
does without ``-p``. ``fmrl_modality: text`` gives the inductive variant (text alone, no ID table).

Items are the dataset's frozen text embeddings T [N+1 F] (the feature files FMRLRec reads,
``<name>.text.npy``), passed through a mixture-of-experts adaptor with parametric whitening:

    PW_k(t) = W_k (Drop(t) - b_k),   g(t) = softmax(t G + noise),   MoE(t) = sum_k g_k(t) PW_k(t)

(``unisrec_n_exps`` experts, W_k [D F] without bias, a learned centre b_k [F]; in training the gate
logits get Gaussian noise of std softplus(t G_noise) + 0.01). The item representation is
e_i = MoE(t_i) + E_id[i] (the ID term is what "transductive" adds). A SASRec encoder (RecBole's
post-LN ``TransformerEncoder``, causal mask, learned positions) reads e over the window; the next
item is scored by cosine similarity over a temperature,

    score(s, i) = <s / |s|, e_i / |e_i|> / tau    (``unisrec_temperature``, 0.07),

trained with full-softmax cross-entropy over every item (the padding column excluded; the reference
keeps it) on RecBole's prefix-augmented samples (``last_position``, the reference) or, causal as the
encoder is, at every position of a window (``all_positions``).
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.model.labels import labelled_states
from recbole_fmrl.model.sampled_loss import nested_softmax_loss

MODALITIES = ("text_id", "text")  # transductive (text + ID, the default) and inductive (text only)


class PWLayer(nn.Module):
    """Parametric whitening: W (Drop(x) - b), W [D F] without bias, b [F] a learned centre."""

    def __init__(self, input_size, output_size, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(input_size))
        self.lin = nn.Linear(input_size, output_size, bias=False)

    def forward(self, x):  # [... F] -> [... D]
        return self.lin(self.dropout(x) - self.bias)


class MoEAdaptor(nn.Module):
    """sum_k g_k(x) PW_k(x), the gate a softmax over x G (plus learned-scale noise while training)."""

    def __init__(self, n_experts, input_size, output_size, dropout, noise_floor=1e-2):
        super().__init__()
        self.experts = nn.ModuleList(PWLayer(input_size, output_size, dropout) for _ in range(n_experts))
        self.w_gate = nn.Parameter(torch.zeros(input_size, n_experts))  # zeros: uniform gates at first
        self.w_noise = nn.Parameter(torch.zeros(input_size, n_experts))
        self.noise_floor = noise_floor

    def gates(self, x):  # [... F] -> [... K]
        logits = x @ self.w_gate
        if self.training:
            std = F.softplus(x @ self.w_noise) + self.noise_floor
            logits = logits + torch.randn_like(logits) * std
        return F.softmax(logits, dim=-1)

    def forward(self, x):  # [... F] -> [... D]
        experts = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [... K D]
        return (self.gates(x).unsqueeze(-1) * experts).sum(-2)


class UniSRec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.hidden_size = config["hidden_size"]
        self.temperature = float(config["unisrec_temperature"])
        self.initializer_range = config["initializer_range"]
        self.loss_chunk_size = config["fmrl_loss_chunk_size"]
        self.native_loss = config["fmrl_native_loss"]
        self.train_negatives = config["fmrl_train_negatives"]  # checked by train/schema.py
        self.target_list_field = getattr(dataset, "target_list_field", None)
        self.modality = getattr(dataset, "fmrl_modality", config["fmrl_modality"])
        if self.modality not in MODALITIES:
            raise ValueError(f"UniSRec: fmrl_modality must be one of {MODALITIES} (text_id: the transductive "
                             f"text + ID variant; text: inductive), got {self.modality!r}")
        if self.temperature <= 0:
            raise ValueError(f"unisrec_temperature: need a positive temperature, got {self.temperature}")
        if config["loss_type"] != "CE":
            raise ValueError(f"UniSRec supports loss_type CE only, got {config['loss_type']!r}")
        if not hasattr(dataset, "item_features"):
            raise ValueError("UniSRec reads the item text features: build the run with recbole_fmrl.train.driver.prepare")
        # frozen text embeddings [N+1 F], row 0 padding; non-persistent: checkpoints stay small and the
        # table is rebuilt from the dataset's feature files (as FMRLRec's)
        self.register_buffer("text", dataset.item_features(["text"], config["fmrl_feature_norm"] or "none"),
                             persistent=False)
        self._table_cache = None

        # define layers
        self.adaptor = MoEAdaptor(config["unisrec_n_exps"], self.text.shape[1], self.hidden_size,
                                  config["unisrec_adaptor_dropout_prob"])
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0) \
            if self.modality == "text_id" else None
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_encoder = TransformerEncoder(
            n_layers=config["n_layers"], n_heads=config["n_heads"], hidden_size=self.hidden_size,
            inner_size=config["inner_size"], hidden_dropout_prob=config["hidden_dropout_prob"],
            attn_dropout_prob=config["attn_dropout_prob"], hidden_act=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"])
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])

        # parameters initialization: RecBole's SASRec for the encoder and the ID table, N(0, 0.02) for the
        # experts (the reference's); the gates stay zero (uniform), the whitening centres zero
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def train(self, mode=True):
        self._table_cache = None  # parameters may change: the cached evaluation table is stale
        return super().train(mode)

    def item_table(self):
        """Item representations [N+1 D]: MoE(text) (+ the ID table). In eval mode cached for as long as
        the parameters are unchanged (keyed on each one's storage and in-place version counter)."""
        if self.training:
            return self._compute_table()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._table_cache is None or self._table_cache[0] != key:
            self._table_cache = (key, self._compute_table().detach())
        return self._table_cache[1]

    def _compute_table(self):
        table = self.adaptor(self.text)  # [N+1 D]
        return table if self.item_embedding is None else table + self.item_embedding.weight

    def encode(self, item_seq, item_seq_len, table):  # [B L], [B], [N+1 D] -> [B L' D], L' = longest
        item_seq = item_seq[:, : max(1, int(item_seq_len.max()))]
        positions = torch.arange(item_seq.shape[1], device=item_seq.device).unsqueeze(0)  # [1 L']
        x = self.dropout(self.LayerNorm(table[item_seq] + self.position_embedding(positions)))
        mask = self.get_attention_mask(item_seq)  # [B 1 L' L'] causal, padding keys masked
        return self.trm_encoder(x, mask, output_all_encoded_layers=True)[-1]

    def forward(self, item_seq, item_seq_len, table=None):  # -> [B D], the state at position len - 1
        table = self.item_table() if table is None else table
        return self.gather_indexes(self.encode(item_seq, item_seq_len, table), item_seq_len - 1)

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]  # [B L], [B]
        table = self.item_table()  # [N+1 D], once per step
        states = self.encode(item_seq, item_seq_len, table)  # [B L' D]
        last = self.gather_indexes(states, item_seq_len - 1)  # [B D]
        hidden, labels = labelled_states(self, interaction, states, last,
                                         lambda targets: targets[:, : states.shape[1]])  # [P D], [P]
        hidden = F.normalize(hidden, dim=-1) / self.temperature  # cosine / tau as one dot product
        items = F.normalize(table[1:], dim=-1)  # [N D], padding excluded from the softmax
        loss = nested_softmax_loss(hidden, items, labels - 1, [self.hidden_size], self.train_negatives,
                                   chunk_size=self.loss_chunk_size, weights=hidden.new_ones(1), native=self.native_loss)
        return loss[0]

    def predict(self, interaction):
        table = self.item_table()
        hidden = F.normalize(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table), dim=-1)
        return (hidden * F.normalize(table[interaction[self.ITEM_ID]], dim=-1)).sum(-1) / self.temperature  # [B]

    def full_sort_predict(self, interaction):
        table = self.item_table()
        hidden = F.normalize(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], table), dim=-1)
        return hidden @ F.normalize(table, dim=-1).T / self.temperature  # [B N+1]
