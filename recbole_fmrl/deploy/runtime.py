"""The size-m FMRLRec network in plain torch: what an exported artifact runs.

No RecBole, no encoder, no feature files: the item table is the projected size-m table, and every
nested weight is stored pre-masked and sliced to its first m dims, so layers are plain dense ones.
Parameter names match FMRLRec's state_dict. Because every weight is nested, the first m' < m dims
of an artifact are the size-m' model (``truncate``); the funnel scores with such prefixes.

Two forms of the same network:
- parallel: right-padded ``[B, L]`` internal ids -> the last real position's hidden state ``[B, m]``.
  Complex values are real/imaginary pairs. The last block only needs each sequence's last state (a
  weighted sum over lambda powers); earlier blocks need every position: the recurrence in torch
  (O(L) elementwise steps, fastest on a CPU), a causal Toeplitz product for ONNX (``toeplitz``);
- recurrent: ``step`` advances one event per sequence from per-layer complex states (real pairs).
"""
import torch
from torch import nn
from torch.nn import functional as F


def size_bounds(sizes):
    edges = [0] + list(sizes)
    return list(zip(edges[:-1], edges[1:]))


def lambda_powers(log_mod, phase, steps):
    """Real and imaginary parts of lambda^k for k in ``steps`` [L]: [L S] each (no negative powers).

    Computed in float64 and rounded once: in float32, cos(k theta) at k ~ 100 already loses ~1e-5.
    """
    k = steps.to(torch.float64)[:, None]
    log_mod, phase, dtype = log_mod.to(torch.float64), phase.to(torch.float64), log_mod.dtype
    mag = torch.exp(k * log_mod)
    return (mag * torch.cos(k * phase)).to(dtype), (mag * torch.sin(k * phase)).to(dtype)


class BlockLayerNorm(nn.Module):
    """One LayerNorm per nested increment block [m_{k-1}, m_k), affine over the whole vector."""

    def __init__(self, sizes, eps):
        super().__init__()
        self.bounds, self.eps = size_bounds(sizes), eps
        self.weight = nn.Parameter(torch.ones(sizes[-1]))
        self.bias = nn.Parameter(torch.zeros(sizes[-1]))

    def normalize(self, x, averaging=None):
        """The per-block standardisation without the affine (folded into the next linear).

        With ``averaging`` (the [m m] block-mean matrix, see ``averaging``) and a few rows, two GEMVs
        replace one layer_norm call per block: fewer ops where per-op overhead dominates (streaming).
        """
        if averaging is not None and x.dim() == 2 and x.shape[0] <= 8:
            centred = torch.addmm(x, x, averaging, alpha=-1)
            return centred * torch.rsqrt(torch.addmm(self._eps_like(x), centred * centred, averaging))
        return torch.cat([F.layer_norm(x[..., a:b], (b - a,), eps=self.eps) for a, b in self.bounds], -1)

    def _eps_like(self, x):
        return x.new_full((), self.eps)

    def averaging(self):
        """[m m] matrix whose product with x gives each dim its block's mean (symmetric)."""
        m = self.weight.shape[0]
        mat = self.weight.new_zeros(m, m)
        for a, b in self.bounds:
            mat[a:b, a:b] = 1.0 / (b - a)
        return mat

    def forward(self, x):
        return self.normalize(x) * self.weight + self.bias


class RecurrentUnit(nn.Module):
    """The LRU: h_t = lambda h_{t-1} + gamma (B u_t), y_t = Re(C h_t); complex values as real pairs."""

    def __init__(self, size, state):
        super().__init__()
        self.in_re, self.in_im = nn.Linear(size, state), nn.Linear(size, state)
        self.out_re, self.out_im = nn.Linear(state, size), nn.Linear(state, size, bias=False)
        self.params_log = nn.Parameter(torch.zeros(3, state))

    def coefficients(self):
        """(w_in [2S m], b_in [2S], w_out [m 2S], b_out [m], log|lambda| [S], arg lambda [S])."""
        gamma = torch.exp(self.params_log[2]).repeat(2)
        w_in = torch.cat([self.in_re.weight, self.in_im.weight]) * gamma[:, None]
        b_in = torch.cat([self.in_re.bias, self.in_im.bias]) * gamma
        w_out = torch.cat([self.out_re.weight, -self.out_im.weight], dim=1)
        return w_in, b_in, w_out, self.out_re.bias, -torch.exp(self.params_log[0]), torch.exp(self.params_log[1])


def causal_kernels(pr, pi):
    """Toeplitz kernels K[c, t, s] = lambda_c^(t-s) for s <= t, real and imaginary: [S L L] each."""
    steps = torch.arange(pr.shape[0], device=pr.device)
    lag = steps[:, None] - steps[None, :]  # [L(t) L(s)]
    causal, index = (lag >= 0).to(pr.dtype), lag.clamp(min=0)
    return (pr.T[:, index] * causal).contiguous(), (pi.T[:, index] * causal).contiguous()


def scan_all(z, kr, ki):
    """LRU states at every position: z [B L 2S] -> [B L 2S], with kernels [S >=L >=L] (first L used).

    Channel-major contiguous operands: a batched GEMM on permuted views runs many times slower on CPU.
    """
    length, states = z.shape[1], kr.shape[0]
    kr, ki = kr[:, :length, :length], ki[:, :length, :length]
    zr = z[..., :states].permute(2, 1, 0).contiguous()  # [S L B]
    zi = z[..., states:].permute(2, 1, 0).contiguous()
    hr = torch.bmm(kr, zr) - torch.bmm(ki, zi)
    hi = torch.bmm(ki, zr) + torch.bmm(kr, zi)
    return torch.cat([hr, hi], 0).permute(2, 1, 0)  # [B L 2S]


def scan_recurrent(z, lam_a, lam_b):
    """LRU states at every position by the recurrence: z [B L 2S] -> [B L 2S] (O(L B S) work).

    ``lam_a`` = [Re lambda | Re lambda], ``lam_b`` = [-Im lambda | Im lambda] (see ``ServingBlock.step``).
    On a CPU this beats the O(L^2 B S) Toeplitz product at every batch size; ONNX needs the latter.
    """
    h, out, half = torch.zeros_like(z[:, 0]), [], z.shape[-1] // 2
    for t in range(z.shape[1]):
        h = torch.addcmul(torch.addcmul(z[:, t], h, lam_a), h.roll(half, -1), lam_b)
        out.append(h)
    return torch.stack(out, 1)


def scan_last(z, lengths, pr, pi):
    """LRU state at each sequence's last real position: z [B L 2S], lengths [B], powers [>=L S] -> [B 2S]."""
    length, states = z.shape[1], pr.shape[1]
    steps = torch.arange(length, device=z.device)
    lag = lengths[:, None] - 1 - steps[None, :]  # [B L]
    valid = (lag >= 0).to(z.dtype)[..., None]
    kr, ki = pr[lag.clamp(min=0)] * valid, pi[lag.clamp(min=0)] * valid  # [B L S]
    zr, zi = z[..., :states], z[..., states:]
    return torch.cat([(kr * zr - ki * zi).sum(1), (kr * zi + ki * zr).sum(1)], -1)


class ServingBlock(nn.Module):
    """Pre-LN block: h = x + LRU(LN1 x); y = h + W2(SiLU(G z) * W1 z), z = LN2 h (dropout-free).

    Inference runs from a ``plan`` derived once from the weights (rebuilt after ``load_state_dict`` or
    ``.to()``): LayerNorm affines folded into the next linear, gamma into B, gate and W1 as one matrix,
    lambda and its powers.
    """

    def __init__(self, sizes, ffn_ratio, state_ratio, eps, window=50):
        super().__init__()
        m, self.window = sizes[-1], window
        self.toeplitz = False  # every-position scan: recurrence (CPU serving) or Toeplitz product (ONNX)
        self.ln1, self.ln2 = BlockLayerNorm(sizes, eps), BlockLayerNorm(sizes, eps)
        self.lru = RecurrentUnit(m, state_ratio * m)
        self.gate, self.w1 = nn.Linear(m, ffn_ratio * m), nn.Linear(m, ffn_ratio * m)
        self.w2 = nn.Linear(ffn_ratio * m, m)
        self._plan = None

    def plan(self):
        """Derived inference tensors; rebuilt after ``load_state_dict`` / ``.to()`` (call ``refresh()``
        after editing weights in place)."""
        if self._plan is None:
            with torch.no_grad():
                self._plan = self._build_plan()
        return self._plan

    def refresh(self):
        self._plan = None

    def _apply(self, fn, *args, **kwargs):
        self._plan = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._plan = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _build_plan(self):
        w_in, b_in, w_out, b_out, log_mod, phase = self.lru.coefficients()
        gw = torch.cat([self.gate.weight, self.w1.weight])
        lam_r, lam_i = lambda_powers(log_mod, phase, torch.ones(1, dtype=torch.long, device=w_in.device))
        return {"w_in": w_in * self.ln1.weight, "b_in": w_in @ self.ln1.bias + b_in, "w_out": w_out, "b_out": b_out,
                "log_mod": log_mod, "phase": phase, "lam_a": torch.cat([lam_r, lam_r], -1),
                "lam_b": torch.cat([-lam_i, lam_i], -1), "w_gw": gw * self.ln2.weight,
                "b_gw": gw @ self.ln2.bias + torch.cat([self.gate.bias, self.w1.bias]), "w2": self.w2.weight,
                "b2": self.w2.bias, "averaging": self.ln1.averaging()}

    def powers(self, length):
        """lambda^k for k < max(length, window), cached in the plan: (real, imaginary) [K S]."""
        plan = self.plan()
        if "powers" not in plan or plan["powers"][0].shape[0] < length:
            steps = torch.arange(max(length, self.window), device=plan["phase"].device)
            plan["powers"] = lambda_powers(plan["log_mod"], plan["phase"], steps)
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
        gate, inner = F.linear(self.ln2.normalize(h, plan["averaging"]), plan["w_gw"], plan["b_gw"]).chunk(2, -1)
        return h + F.linear(F.silu(gate) * inner, plan["w2"], plan["b2"])

    def forward(self, x, lengths, last_only):
        """x [B L m] -> [B L m], or [B m] at each sequence's last position when ``last_only``."""
        plan = self.plan()
        z = F.linear(self.ln1.normalize(x), plan["w_in"], plan["b_in"])  # [B L 2S]
        if last_only:
            rows = torch.arange(x.shape[0], device=x.device)
            states = scan_last(z, lengths, *self.powers(x.shape[1]))
            h = x[rows, lengths - 1] + F.linear(states, plan["w_out"], plan["b_out"])
        else:
            states = scan_all(z, *self.kernels(x.shape[1])) if self.toeplitz else \
                scan_recurrent(z, plan["lam_a"], plan["lam_b"])
            h = x + F.linear(states, plan["w_out"], plan["b_out"])
        return self.feed_forward(h, plan)

    def step(self, x, state):
        """One event: x [B m], state [B 2S] (real | imaginary) -> (output [B m], new state)."""
        plan = self.plan()
        z = F.linear(self.ln1.normalize(x, plan["averaging"]), plan["w_in"], plan["b_in"])
        swapped = state.roll(state.shape[-1] // 2, -1)  # [imaginary | real]
        new = torch.addcmul(torch.addcmul(z, state, plan["lam_a"]), swapped, plan["lam_b"])  # lambda * h + z
        return self.feed_forward(x + F.linear(new, plan["w_out"], plan["b_out"]), plan), new


class ServingNet(nn.Module):
    """Size-m network plus its projected item table; built from ``model_args`` alone."""

    def __init__(self, args):
        super().__init__()
        self.args = dict(args)
        sizes = self.args["sizes"]
        self.size = sizes[-1]
        self.blocks = nn.ModuleList(
            ServingBlock(sizes, args["ffn_ratio"], args["state_ratio"], args["layer_norm_eps"], args["max_seq_length"])
            for _ in range(args["n_layers"]))
        self.register_buffer("item_table", torch.zeros(args["n_items"], self.size))  # [N+1 m], row 0 padding

    def forward(self, items, lengths):
        """Right-padded internal ids [B L] and lengths [B] (>= 1) -> last hidden state [B m]."""
        x = self.item_table[items]
        if not len(self.blocks):
            return x[torch.arange(x.shape[0], device=x.device), lengths - 1]
        for i, block in enumerate(self.blocks):
            x = block(x, lengths, last_only=i == len(self.blocks) - 1)
        return x

    def scores(self, hidden):
        return F.linear(hidden, self.item_table)  # [B N+1]; a Gemm with transB in ONNX (no transposed copy)

    def state_size(self):
        return 2 * self.args["state_ratio"] * self.size

    def step(self, states, items):
        """One event per sequence: states [layers B 2S], items [B] (or one int) -> (hidden [B m], new states)."""
        x, new = self.item_table[items : items + 1] if isinstance(items, int) else self.item_table[items], []
        for block, state in zip(self.blocks, states):
            x, s = block.step(x, state)
            new.append(s)
        return x, torch.stack(new) if new else states

    def truncate(self, size):
        """The nested size-``size`` network: first-``size`` slices of every weight (views, no copy)."""
        sizes = self.args["sizes"]
        if size == self.size:
            return self
        if size not in sizes:
            raise ValueError(f"size {size} is not one of this artifact's nested sizes {sizes}")
        small = ServingNet(dict(self.args, sizes=sizes[: sizes.index(size) + 1]))
        target = small.state_dict()
        small.load_state_dict({k: v[tuple(slice(0, s) for s in target[k].shape)] for k, v in self.state_dict().items()})
        return small.eval()
