"""Per-size selection (``fmrl_select_on: per_size``): every nested size keeps its own best epoch.

One training, but the small sizes of a nested model peak later than the largest (issue 29: the
largest peaks near epoch 30 on Beauty, independently trained small models near 70-86). Each
validation scores every size from one pass; a size whose validation metric improved keeps the
first-m corner of that epoch's weights (``FMRLNet.size_slice``: small for small m). Training stops
once every size has gone more than ``stopping_step`` validations without improving (RecBole's rule
for one score, applied to each). The best checkpoint is
still the largest size's best epoch and carries every smaller size's slice, so test evaluation
(``FMRLTrainer.evaluate``) and export (``deploy/export.py``) take size m from its own epoch; the
export manifest records which.
"""
from contextlib import contextmanager

import torch

ENTRY = "size_best"  # the checkpoint entry: {"best": {size: {epoch, score, stale}}, "slices": {size: weights}}


class SizeBests:
    """Each size's best validation score, its epoch, validations since, and its weights slice."""

    def __init__(self, sizes, patience, bigger=True):
        self.sizes, self.patience, self.sign = [int(m) for m in sizes], int(patience), 1.0 if bigger else -1.0
        self.best = {}  # size -> {"epoch": int, "score": float, "stale": int}
        self.slices = {}  # size -> FMRLNet.size_slice(size) of its best epoch (the largest size: none, see state)

    def update(self, epoch, scores, network):
        """Record one validation (``scores``: {size: metric}); returns the sizes that improved. A tie counts
        as an improvement, as in RecBole's ``early_stopping`` (the largest size's rule stays the same)."""
        improved = []
        for m in self.sizes:
            entry, score = self.best.get(m), float(scores[m])
            if entry is None or self.sign * (score - entry["score"]) >= 0:
                self.best[m] = {"epoch": int(epoch), "score": score, "stale": 0}
                if m != self.sizes[-1]:  # the largest size's best weights are the best checkpoint itself
                    self.slices[m] = network.size_slice(m)
                improved.append(m)
            else:
                entry["stale"] += 1
        return improved

    def exhausted(self):
        """Every size has gone more than ``patience`` validations without improving (RecBole's ``early_stopping``)."""
        return len(self.best) == len(self.sizes) and all(e["stale"] > self.patience for e in self.best.values())

    def epochs(self):
        return {m: e["epoch"] for m, e in self.best.items()}

    def state(self):
        return {"best": {str(m): dict(e) for m, e in self.best.items()},
                "slices": {str(m): w for m, w in self.slices.items()}}

    def load_state(self, state):
        self.best = {int(m): {"epoch": int(e["epoch"]), "score": float(e["score"]), "stale": int(e["stale"])}
                     for m, e in state["best"].items()}
        self.slices = {int(m): dict(w) for m, w in state["slices"].items()}
        return self


def slices_of(state):
    """{size: (epoch, weights)} of a checkpoint's per-size slices (empty when it has none)."""
    entry = state.get(ENTRY) if isinstance(state, dict) else None
    if not entry:
        return {}
    return {int(m): (int(entry["best"][m]["epoch"]), w) for m, w in entry["slices"].items()}


@contextmanager
def pasted(network, weights):
    """The network with a size slice pasted in (``weights`` None: as it is), restored afterwards."""
    if not weights:
        yield network
        return
    saved = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.paste_slice(weights)
    try:
        yield network
    finally:
        with torch.no_grad():
            network.load_state_dict(saved)
