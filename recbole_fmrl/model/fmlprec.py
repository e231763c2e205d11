r"""FMLPRec
################################################

Reference:
    Kun Zhou, Hui Yu, Wayne Xin Zhao, Ji-Rong Wen. "Filter-enhanced MLP is All You Need for
    Sequential Recommendation." WWW 2022.

Reference code:
    https://github.com/Woeee/FMLP-Rec

An all-MLP sequential recommender: item + position embeddings, then blocks of a learnable
frequency-domain filter (rfft along the sequence, elementwise product with a learned complex
weight per frequency and channel, irfft) and a GELU feed-forward, each with a residual and a
post-LayerNorm. The next item is scored by the dot product of the last hidden state with the item
embeddings, trained with full-softmax cross-entropy (the original uses BCE with one sampled
negative; CE is RecBole's default for its sequential baselines).

Padding. The original pads on the left, so the last item always sits at position L-1 and the
circular filter wraps it onto the padding. RecBole pads on the right; the model re-aligns every
sequence to the left internally, which reproduces the original computation exactly.

Training objectives (``fmrl_train_objective``, see FMRLDataset):

- ``last_position`` (default): RecBole's prefix-augmented samples, CE on the next item.
- ``all_positions``: one window per user with a label at every position. The original global
  filter is a circular convolution over the whole window, so position t would see item t+1 --
  its own label. ``fmlp_filter: causal`` (required for this objective) restricts the learned
  filter to a causal kernel: the frequency response is taken on a 2L grid, its impulse response is
  cut to lags 0..L-1, and the convolution is linear (zero-padded), not circular.
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.model.labels import labelled_states

FILTERS = ("global", "causal")


class FilterLayer(nn.Module):
    """LN(x + Drop(irfft(rfft(x) * W))) with a learned complex W [F H] (F frequencies)."""

    def __init__(self, max_len, hidden_size, dropout, eps, causal=False):
        super().__init__()
        self.max_len, self.causal = max_len, causal
        n_freq = (2 * max_len if causal else max_len) // 2 + 1
        # [F H 2]: real/imaginary parts, N(0, 0.02) as in the reference
        self.complex_weight = nn.Parameter(torch.randn(n_freq, hidden_size, 2) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def kernel(self):
        """Causal mode: the impulse response of the learned filter, cut to lags 0..L-1 [L H]."""
        response = torch.view_as_complex(self.complex_weight)
        return torch.fft.irfft(response, n=2 * self.max_len, dim=0, norm="ortho")[: self.max_len]

    def forward(self, x):  # [B L H] -> [B L H]
        length = x.shape[1]
        if self.causal:  # linear convolution with a causal kernel: y_t = sum_{s<=t} k_{t-s} x_s
            n = 2 * length
            k_f = torch.fft.rfft(self.kernel()[:length], n=n, dim=0)  # [n/2+1 H]
            y = torch.fft.irfft(torch.fft.rfft(x, n=n, dim=1) * k_f, n=n, dim=1)[:, :length]
        else:  # the original circular (global) filter
            x_f = torch.fft.rfft(x, dim=1, norm="ortho")  # [B L/2+1 H]
            y = torch.fft.irfft(x_f * torch.view_as_complex(self.complex_weight), n=length, dim=1, norm="ortho")
        return self.layer_norm(self.dropout(y) + x)


class FeedForward(nn.Module):
    """LN(x + Drop(W2 GELU(W1 x))), inner size ``inner_size``."""

    def __init__(self, hidden_size, inner_size, dropout, eps):
        super().__init__()
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x):  # [B L H] -> [B L H]
        return self.layer_norm(self.dropout(self.dense_2(F.gelu(self.dense_1(x)))) + x)


class FMLPRec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.n_layers = config["n_layers"]
        self.hidden_size = config["hidden_size"]
        self.inner_size = config["inner_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        self.filter = config["fmlp_filter"] or "global"
        if self.filter not in FILTERS:
            raise ValueError(f"fmlp_filter: unknown value {self.filter!r}; expected one of {FILTERS}")
        if config["loss_type"] != "CE":
            raise ValueError(f"FMLPRec supports loss_type CE only, got {config['loss_type']!r}")
        self.target_list_field = getattr(dataset, "target_list_field", None)
        if config["fmrl_train_objective"] == "all_positions" and self.filter != "causal":
            raise ValueError("FMLPRec with fmrl_train_objective=all_positions needs fmlp_filter=causal: the global "
                             "(circular) filter lets position t see item t+1, its own training label")

        # define layers and loss
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.layer_norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                FilterLayer(self.max_seq_length, self.hidden_size, self.hidden_dropout_prob, self.layer_norm_eps,
                            causal=self.filter == "causal"),
                FeedForward(self.hidden_size, self.inner_size, self.hidden_dropout_prob, self.layer_norm_eps),
            )
            for _ in range(self.n_layers))

        # parameters initialization: N(0, initializer_range) for embeddings and linears (as in the
        # reference); the filter weights keep their own N(0, 0.02) init
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @staticmethod
    def left_align_index(item_seq_len, length):
        """Gather index [B L] moving right-padded sequences to the left-padded layout."""
        steps = torch.arange(length, device=item_seq_len.device)
        return (steps[None, :] + item_seq_len[:, None]) % length

    def forward(self, item_seq, item_seq_len):  # [B L], [B] -> [B L H], left-aligned (last item at L-1)
        length = item_seq.shape[1]
        index = self.left_align_index(item_seq_len, length)
        item_seq = item_seq.gather(1, index)  # [B L], padding first
        position = torch.arange(length, device=item_seq.device)
        x = self.item_embedding(item_seq) + self.position_embedding(position)[None]  # [B L H]
        x = self.dropout(self.layer_norm(x))
        for block in self.blocks:
            x = block(x)
        return x

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        out = self.forward(item_seq, item_seq_len)  # [B L H], left-aligned
        table = self.item_embedding.weight[1:]  # [N H], padding excluded from the softmax
        def left_aligned(targets):  # [B L] right-padded like the inputs, 0 = no label
            return targets.gather(1, self.left_align_index(item_seq_len, targets.shape[1]))

        hidden, labels = labelled_states(self, interaction, out, out[:, -1], left_aligned)  # [P H], [P]
        return F.cross_entropy(hidden @ table.T, labels - 1)

    def predict(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])[:, -1]  # [B H]
        return (hidden * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])[:, -1]  # [B H]
        return hidden @ self.item_embedding.weight.T  # [B N+1]
