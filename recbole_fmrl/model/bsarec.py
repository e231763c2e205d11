r"""BSARec
################################################

Reference:
    Yehjin Shin, Jeongwhan Choi, Hyowon Wi, Noseong Park. "An Attentive Inductive Bias for Sequential
    Recommendation beyond the Self-Attention." AAAI 2024.

Reference code:
    https://github.com/yehjin-shin/BSARec

Beyond Self-Attention: every block mixes two views of its input x [B L H],

    BSA(x) = alpha * LN(x + Drop(low(x) + beta^2 * high(x))) + (1 - alpha) * LN(x + Drop(MHA(x)))

then a feed-forward with a residual and a post-LayerNorm, as in SASRec. ``low(x)`` keeps the c//2 + 1
lowest frequencies of x along the sequence (rfft, a rectangular low-pass, irfft) and ``high(x) = x - low(x)``
the rest; beta [H] is learned per channel (the "attentive inductive bias": a smooth, whole-window view
whose high frequencies are rescaled rather than attended). ``alpha`` (``bsarec_alpha``) and the cut-off
``c`` (``bsarec_c``) are fixed hyper-parameters; ``alpha = 0`` is a post-LN SASRec block. The attention and
feed-forward are RecBole's own layers; the next item is scored by the dot product of the last hidden
state with the item embeddings, trained with full-softmax cross-entropy on the last position of
RecBole's prefix-augmented samples (the reference's signal and loss).

Padding. The reference pads on the left, so the last item always sits at position L-1 and the
Fourier filter runs over the whole padded window (padding slots carry their position embedding). RecBole
pads on the right; the sequences are re-aligned to the left internally (as in FMLPRec), which
reproduces the original computation. The low-pass filter is not causal (position t sees t+1), so
``fmrl_train_objective: all_positions`` is refused: every position would see its own label.
"""
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import FeedForward, MultiHeadAttention
from recbole.utils import InputType
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.model.fmlprec import FMLPRec


class FrequencyLayer(nn.Module):
    """LN(x + Drop(low(x) + beta^2 * high(x))): the c//2+1 lowest frequencies kept, the rest scaled by beta^2."""

    def __init__(self, hidden_size, c, dropout, eps):
        super().__init__()
        self.n_low = c // 2 + 1  # rfft bins kept (bin 0 is the mean over the window)
        # sqrt(beta) per channel, N(0, 1) as in the reference; squared, so the scale stays non-negative
        self.sqrt_beta = nn.Parameter(torch.randn(hidden_size))
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def low_pass(self, x):  # [B L H] -> [B L H]
        spectrum = torch.fft.rfft(x, dim=1, norm="ortho")  # [B L/2+1 H]
        keep = torch.arange(spectrum.shape[1], device=x.device) < self.n_low  # [L/2+1]
        return torch.fft.irfft(spectrum * keep[None, :, None], n=x.shape[1], dim=1, norm="ortho")

    def forward(self, x):  # [B L H] -> [B L H]
        low = self.low_pass(x)
        mixed = low + self.sqrt_beta ** 2 * (x - low)
        return self.layer_norm(x + self.dropout(mixed))


class BSARecBlock(nn.Module):
    """alpha * FrequencyLayer(x) + (1 - alpha) * MHA(x) (each with its residual + LN), then the feed-forward."""

    def __init__(self, config):
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.alpha = float(config["bsarec_alpha"])
        self.filter = FrequencyLayer(hidden, int(config["bsarec_c"]), config["hidden_dropout_prob"], eps)
        self.attention = MultiHeadAttention(config["n_heads"], hidden, config["hidden_dropout_prob"],
                                            config["attn_dropout_prob"], eps)
        self.feed_forward = FeedForward(hidden, config["inner_size"], config["hidden_dropout_prob"],
                                        config["hidden_act"], eps)

    def forward(self, x, attention_mask):  # [B L H], [B 1 L L] -> [B L H]
        mixed = self.alpha * self.filter(x) + (1 - self.alpha) * self.attention(x, attention_mask)
        return self.feed_forward(mixed)


class BSARec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)

        # load parameters info
        self.n_layers = config["n_layers"]
        self.hidden_size = config["hidden_size"]
        self.hidden_dropout_prob = config["hidden_dropout_prob"]
        self.layer_norm_eps = config["layer_norm_eps"]
        self.initializer_range = config["initializer_range"]
        alpha, c = float(config["bsarec_alpha"]), int(config["bsarec_c"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"bsarec_alpha: need a weight in [0, 1], got {alpha}")
        if c < 1:
            raise ValueError(f"bsarec_c: need a cut-off of at least 1, got {c}")
        if config["loss_type"] != "CE":
            raise ValueError(f"BSARec supports loss_type CE only, got {config['loss_type']!r}")
        if config["fmrl_train_objective"] == "all_positions":
            raise ValueError("BSARec trains with fmrl_train_objective=last_position: its low-pass filter spans the "
                             "whole window, so with all_positions position t would see item t+1, its own label")

        # define layers
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.layer_norm = nn.LayerNorm(self.hidden_size, eps=self.layer_norm_eps)
        self.dropout = nn.Dropout(self.hidden_dropout_prob)
        self.blocks = nn.ModuleList(BSARecBlock(config) for _ in range(self.n_layers))

        # parameters initialization: N(0, initializer_range) for embeddings and linears (as in the
        # reference); beta keeps its own N(0, 1)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def forward(self, item_seq, item_seq_len):  # [B L], [B] -> [B L H], left-aligned (last item at L-1)
        length = item_seq.shape[1]
        item_seq = item_seq.gather(1, FMLPRec.left_align_index(item_seq_len, length))  # [B L], padding first
        position = torch.arange(length, device=item_seq.device)
        x = self.item_embedding(item_seq) + self.position_embedding(position)[None]  # [B L H]
        x = self.dropout(self.layer_norm(x))
        mask = self.get_attention_mask(item_seq)  # [B 1 L L] causal, padding keys masked
        for block in self.blocks:
            x = block(x, mask)
        return x

    def calculate_loss(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])[:, -1]  # [B H]
        table = self.item_embedding.weight[1:]  # [N H], padding excluded from the softmax
        return F.cross_entropy(hidden @ table.T, interaction[self.POS_ITEM_ID] - 1)

    def predict(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])[:, -1]  # [B H]
        return (hidden * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)  # [B]

    def full_sort_predict(self, interaction):
        hidden = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])[:, -1]  # [B H]
        return hidden @ self.item_embedding.weight.T  # [B N+1]
