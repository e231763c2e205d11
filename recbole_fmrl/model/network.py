"""The FMRLRec network in plain torch, built from ``ModelArgs`` alone (nanoGPT-style; no RecBole).

Reference: Yueqi Wang, Zhenrui Yue, Huimin Zeng, Dong Wang, Julian McAuley. "Train Once, Deploy
Anywhere: Matryoshka Representation Learning for Multimodal Recommendation." EMNLP Findings 2024.

An item table (projected frozen features, a learned ID table or both; ``fusion.py``) feeds stacked
pre-LN blocks of a nested LRU and a gated feed-forward. Every weight is block lower-triangular over
the sizes m_1 < ... < m_K = d, so the first m dims of the whole network form the size-m network:
``truncate(m)`` is that network, ``frozen()`` the same with its item table computed once (what an
export stores), ``premasked_state_dict()`` its weights with the staircase zeros applied.

One network, three schedules of the same weights (tests hold them equal at every size):
- ``forward`` / ``encode``: the real tokens of a right-padded batch packed to [V d] (``Packing``),
  dropout in training mode. Training, RecBole's evaluation and the sub-models run it.
- ``infer``: right-padded [B L] ids, from weights folded once per parameter version (LayerNorm
  affines into the next linear, gamma into B, gate and W1 as one matrix, lambda powers cached); the
  last block computes each sequence's last position only. Serving and the ONNX graph run it.
- ``step``: one event per sequence through the LRU's recurrent form (streaming).
"""
import itertools
from dataclasses import asdict, dataclass, fields, replace
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from recbole_fmrl.model.fusion import ItemTable
from recbole_fmrl.model.lru import LRULayer, Packing, causal_kernels, lambda_powers, recurrence_step, scan_last, scan_recurrent, scan_toeplitz
from recbole_fmrl.model.nested import NestedLayerNorm, NestedLinear, check_sizes, default_sizes

PREFIX = "network."  # where FMRLRec (the RecBole model) keeps this network in its state_dict


def corner(shape):
    """Index of a tensor's leading corner of ``shape``: where a nested size's weights live."""
    return tuple(slice(0, n) for n in shape)


@dataclass
class ModelArgs:
    """Everything that shapes the network. A checkpoint's ``export`` and an artifact's ``model.pt`` carry it."""

    hidden_size: int  # d, the largest nested size
    n_items: int  # item-table rows, padding (row 0) included
    sizes: Optional[List[int]] = None  # nested sizes m_1 < ... < m_K = d; None: powers of two from 8
    n_layers: int = 1
    ffn_ratio: int = 1  # feed-forward width / hidden size
    state_ratio: int = 1  # LRU state size / hidden size
    dropout: float = 0.2  # on the input embeddings and inside the feed-forward
    lru_dropout: float = 0.2  # on the LRU output
    ring_r_min: float = 0.0  # LRU eigenvalue radii at initialisation
    ring_r_max: float = 0.1
    scan: str = "dense"  # training scan: dense (Toeplitz GEMM) or doubling (log2 L steps)
    layer_norm_eps: float = 1e-5
    modality: str = "id"  # where the item table comes from (data/modality.py)
    feature_norm: str = "none"  # how the frozen features were normalised (data/features.py)
    max_seq_length: int = 50  # the input window the network was trained on

    def __post_init__(self):
        self.sizes = check_sizes(self.sizes or default_sizes(self.hidden_size), self.hidden_size)

    @classmethod
    def from_dict(cls, values):
        """From ``to_dict()`` output; other keys (a model name, say) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self):
        return asdict(self)

    def at_size(self, size):
        """The arguments of the nested size-``size`` network."""
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one of the nested sizes {self.sizes}")
        return replace(self, hidden_size=size, sizes=self.sizes[: self.sizes.index(size) + 1])


def network_state_dict(state_dict):
    """The network's weights in a training checkpoint's ``state_dict`` (FMRLRec keeps them under ``network.``;
    checkpoints written before that keep them at the top level)."""
    if any(k.startswith(PREFIX) for k in state_dict):
        return {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    return dict(state_dict)


class FMRLBlock(nn.Module):
    """Pre-LN block: h = x + LRU(LN1 x); y = h + Drop(W2(SiLU(G z) * Drop(W1 z))), z = LN2 h."""

    def __init__(self, args):
        super().__init__()
        sizes, inner = args.sizes, [args.ffn_ratio * m for m in args.sizes]
        self.ln1 = NestedLayerNorm(sizes, args.layer_norm_eps)
        self.lru = LRULayer(sizes, r_min=args.ring_r_min, r_max=args.ring_r_max, dropout=args.lru_dropout,
                            scan=args.scan, state_ratio=args.state_ratio)
        self.ln2 = NestedLayerNorm(sizes, args.layer_norm_eps)
        self.gate = NestedLinear(sizes, inner)  # up-scale d -> r*d
        self.w1 = NestedLinear(sizes, inner)
        self.w2 = NestedLinear(inner, sizes)  # down-scale r*d -> d
        self.dropout = nn.Dropout(args.dropout)
        self.window = args.max_seq_length
        self._plan = (None, None)

    def forward(self, x, packing):  # [V d] real tokens
        h = x + self.lru(self.ln1(x), packing)
        z = self.ln2(h)
        return h + self.dropout(self.w2(F.silu(self.gate(z)) * self.dropout(self.w1(z))))

    # -- inference: the same weights, folded once ----------------------------------------------
    def plan(self):
        """Inference tensors derived from the weights, rebuilt whenever a parameter changes (keyed on each
        one's storage and in-place version counter: an optimiser step, ``load_state_dict``, ``.to()``)."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._plan[0] != key:
            with torch.no_grad():
                self._plan = (key, self._build_plan())
        return self._plan[1]

    def _build_plan(self):
        w_in, b_in, w_out, b_out = self.lru.projections()
        log_mod, phase = self.lru.log_lambda()
        gw = torch.cat([self.gate.masked_weight(), self.w1.masked_weight()])
        lam_r, lam_i = lambda_powers(log_mod, phase, torch.ones(1, dtype=torch.long, device=w_in.device), torch.float64)
        return {"w_in": w_in * self.ln1.weight, "b_in": w_in @ self.ln1.bias + b_in, "w_out": w_out, "b_out": b_out,
                "log_mod": log_mod, "phase": phase, "lam_a": torch.cat([lam_r, lam_r], -1),
                "lam_b": torch.cat([-lam_i, lam_i], -1), "w_gw": gw * self.ln2.weight,
                "b_gw": gw @ self.ln2.bias + torch.cat([self.gate.bias, self.w1.bias]), "w2": self.w2.masked_weight(),
                "b2": self.w2.bias, "averaging": self.ln1.averaging()}

    def powers(self, length):
        """lambda^k for k < max(length, window), cached in the plan: (real, imaginary) [K S]."""
        plan = self.plan()
        if "powers" not in plan or plan["powers"][0].shape[0] < length:
            steps = torch.arange(max(length, self.window), device=plan["phase"].device)
            plan["powers"] = lambda_powers(plan["log_mod"], plan["phase"], steps, torch.float64)
            plan.pop("kernels", None)
        return plan["powers"]

    def kernels(self, length):
        """Causal Toeplitz kernels [S K K] (K >= length), cached in the plan."""
        pr, pi = self.powers(length)
        plan = self.plan()
        if "kernels" not in plan:
            with torch.no_grad():
                plan["kernels"] = causal_kernels(pr, pi)
        return plan["kernels"]

    def feed_forward(self, h, plan):
        gate, inner = F.linear(self.ln2.standardize(h, plan["averaging"]), plan["w_gw"], plan["b_gw"]).chunk(2, -1)
        return h + F.linear(F.silu(gate) * inner, plan["w2"], plan["b2"])

    def infer(self, x, lengths, last_only=False, toeplitz=False):
        """x [B L d] -> [B L d], or [B d] at each sequence's last position when ``last_only``; the
        every-position scan is the recurrence (fastest on a CPU) or, ``toeplitz``, a causal Toeplitz product."""
        plan = self.plan()
        z = F.linear(self.ln1.standardize(x), plan["w_in"], plan["b_in"])  # [B L 2S]
        if last_only:
            rows = torch.arange(x.shape[0], device=x.device)
            states = scan_last(z, lengths, *self.powers(x.shape[1]))  # [B 2S]
            h = x[rows, lengths - 1] + F.linear(states, plan["w_out"], plan["b_out"])
        else:
            states = scan_toeplitz(z, *self.kernels(x.shape[1])) if toeplitz else \
                scan_recurrent(z, plan["lam_a"], plan["lam_b"])
            h = x + F.linear(states, plan["w_out"], plan["b_out"])
        return self.feed_forward(h, plan)

    def step(self, x, state):
        """One event: x [B d], state [B 2S] (real | imaginary) -> (output [B d], new state)."""
        plan = self.plan()
        z = F.linear(self.ln1.standardize(x, plan["averaging"]), plan["w_in"], plan["b_in"])
        new = recurrence_step(z, state, plan["lam_a"], plan["lam_b"])  # lambda * h + z
        return self.feed_forward(x + F.linear(new, plan["w_out"], plan["b_out"]), plan), new


class FMRLNet(nn.Module):
    """Item module (``fusion.item_encoder`` or an ``ItemTable``) + input dropout + ``n_layers`` blocks."""

    def __init__(self, args: ModelArgs, items: nn.Module):
        super().__init__()
        self.args = args
        self.item_encoder = items
        self.input_dropout = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleList(FMRLBlock(args) for _ in range(args.n_layers))
        self._table_cache = None

    @classmethod
    def from_artifact(cls, args, state_dict):
        """The network an artifact stores: ``ModelArgs`` values and a ``frozen()`` network's weights."""
        args = ModelArgs.from_dict(args)
        net = cls(args, ItemTable(torch.zeros(args.n_items, args.hidden_size)))
        net.load_state_dict(state_dict)
        return net.eval()

    @property
    def sizes(self):
        return self.args.sizes

    def train(self, mode=True):
        self._table_cache = None  # parameters may change: the cached evaluation item table is stale
        return super().train(mode)

    def item_table(self):
        """Item table [N+1 d]; computed once per step. In eval mode it is cached for as long as the item
        module's tensors are unchanged: keyed on each one's storage and in-place version counter, so an
        optimiser step, ``load_state_dict`` or an in-place edit recomputes it."""
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

    def infer(self, items, lengths, toeplitz=False):
        """Right-padded internal ids [B L] and lengths [B] (>= 1) -> last hidden state [B d] (no dropout)."""
        x = self.item_table()[items]  # [B L d]
        if not len(self.blocks):
            return x[torch.arange(x.shape[0], device=x.device), lengths - 1]
        for i, block in enumerate(self.blocks):
            x = block.infer(x, lengths, last_only=i == len(self.blocks) - 1, toeplitz=toeplitz)
        return x

    def scores(self, hidden):
        return F.linear(hidden, self.item_table())  # [B N+1]; a Gemm with transB in ONNX (no transposed copy)

    def state_size(self):
        """Width of one layer's streaming state: the LRU state as real | imaginary."""
        return 2 * self.args.state_ratio * self.args.hidden_size

    def step(self, states, items):
        """One event per sequence: states [layers B 2S], items [B] (or one int) -> (hidden [B d], new states)."""
        table = self.item_table()
        x, new = table[items : items + 1] if isinstance(items, int) else table[items], []
        for block, state in zip(self.blocks, states):
            x, s = block.step(x, state)
            new.append(s)
        return x, torch.stack(new) if new else states

    # -- the nested sizes ----------------------------------------------------------------------
    def truncate(self, size):
        """The standalone size-``size`` network: the first-``size`` slices of every weight."""
        if size == self.args.hidden_size:
            return self
        small = self._like(self.args.at_size(size), lambda: self.item_encoder.resized(size))
        target = small.state_dict()
        small.load_state_dict({k: v[corner(target[k].shape)] for k, v in self.state_dict().items()})
        return small

    def size_slice(self, size):
        """The size-``size`` network's trainable weights, copied to the CPU: the first-``size`` corner of
        every parameter (what ``truncate`` keeps). Per-size selection keeps one per size (train/size_best.py)."""
        shapes = self._corner_shapes(size)
        return {k: p.detach()[corner(shapes[k])].to("cpu", copy=True) for k, p in self.named_parameters()}

    def paste_slice(self, weights):
        """Overwrite, in place, the corner of each parameter that ``weights`` (a ``size_slice``) covers: the
        size-m network (and every smaller one) becomes the slice's; the dims above m keep theirs."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name][corner(value.shape)].copy_(value)
        return self

    def _corner_shapes(self, size):
        cache = self.__dict__.setdefault("_corner_shape_cache", {})
        if size not in cache:
            with torch.no_grad():
                cache[size] = {k: tuple(p.shape) for k, p in self.truncate(size).named_parameters()}
        return cache[size]

    def frozen(self):
        """This network with its item table computed once and held fixed (``ItemTable``), as exported."""
        net = self._like(self.args, lambda: ItemTable(self.item_table().detach().clone()))
        net.blocks.load_state_dict(self.blocks.state_dict())
        return net

    def _like(self, args, make_items):
        """A new network on this one's device and dtype (weights still to be loaded)."""
        reference = next(itertools.chain(self.parameters(), self.buffers()))
        with torch.random.fork_rng(devices=[]):  # building a network must not consume the run's RNG
            net = FMRLNet(args, make_items())
        return net.to(device=reference.device, dtype=reference.dtype).train(self.training)

    def premasked_state_dict(self):
        """``state_dict`` with every nested weight's staircase zeros applied (a dense layer reads it as is)."""
        state = self.state_dict()
        for name, module in self.named_modules():
            if isinstance(module, NestedLinear):
                state[f"{name}.weight"] = module.masked_weight().detach()
        return state

    def nested_parameter_count(self):
        """Trainable parameters, counting only the non-zero blocks of nested weights (the paper's count)."""
        nested = [m for m in self.modules() if isinstance(m, NestedLinear)]
        skip = {id(p) for m in nested for p in m.parameters()}
        return sum(m.nested_numel() for m in nested) + sum(
            p.numel() for p in self.parameters() if p.requires_grad and id(p) not in skip)
