"""Serving API: ``Recommender.load(folder).recommend(histories, k)`` with raw item ids in and out.

``folder`` is one exported size (``.../size-64``) or an export root (then the largest size, or
``size=``). Histories are lists of raw item ids, oldest first. The network sees the last
MAX_ITEM_LIST_LENGTH items (``context="window"``, what it was trained and evaluated on) or the whole
history (``context="full"``, the LRU recurrence). Any nested size up to the artifact's own can
serve (``size=``), and ``funnel="32:200,256"`` shortlists with a small size and reranks;
``funnel="ann32:1000,256"`` takes the shortlist from a faiss HNSW index over the first 32 dims (``ann.py``:
built on first use, cached per artifact under the plugin's cache folder, kept in memory after that).
Loading verifies every file the manifest lists (``model.onnx`` too). ``k`` is at least 1 and at most
the number of items, and a funnel whose last shortlist is shorter than ``k`` is refused: a result is
never silently shorter than asked (only excluded items can make it so, e.g. ``exclude_seen`` on a
history holding most of the catalogue).
"""
import torch

from recbole_fmrl.deploy import ann, artifact, streaming
from recbole_fmrl.deploy import funnel as funnels
from recbole_fmrl.errors import InputError
from recbole_fmrl.model.network import FMRLNet


class UnknownItemError(InputError):
    """A history holds item ids the artifact does not know."""


class EmptyHistoryError(InputError):
    """A history with no (known) item: nothing to recommend from."""


class Recommender:
    def __init__(self, net, items, manifest, folder):
        self.net, self.manifest, self.folder = net.eval(), manifest, folder
        self.item_ids = list(items["item_ids"])
        self.titles = items.get("titles")
        self.index = {token: i for i, token in enumerate(self.item_ids) if i > 0}  # row 0 is padding
        self.window = int(net.args.max_seq_length)
        self.size = net.args.hidden_size
        self.ann_params, self.ann_indexes = ann.HnswParams(), {}  # {(size, params): AnnIndex}

    @classmethod
    def load(cls, folder, size=None):
        folders = artifact.size_folders(folder)
        chosen = max(folders) if size is None else min((m for m in folders if m >= size), default=None)
        if chosen is None:
            raise artifact.ArtifactError(f"{folder}: no artifact of size >= {size} (has {sorted(folders)})")
        manifest, weights, items = artifact.read(folders[chosen])
        artifact.verify(folders[chosen], manifest)  # every listed file, model.onnx included
        try:
            net = FMRLNet.from_artifact(weights["model_args"], weights["state_dict"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise artifact.ArtifactError(f"{folders[chosen]}: weights do not match model_args "
                                         f"({str(err).splitlines()[0]})") from err
        rows = net.item_table().shape[0]
        if len(items.get("item_ids", ())) != rows:
            raise artifact.ArtifactError(f"{folders[chosen]}: items.json lists {len(items.get('item_ids', ()))} "
                                         f"ids for a {rows}-row item table")
        rec = cls(net, items, manifest, folders[chosen])
        return rec if size is None else rec.at_size(size)

    def at_size(self, size):
        """The same artifact serving its nested size ``size`` (the first-``size`` slices of its weights)."""
        sizes = self.net.args.sizes
        if size not in sizes:  # a user's --size: one line, not the network's ValueError
            raise InputError(f"size {size}: not a nested size of {self.folder} (its sizes: {sizes})")
        net = self.net.truncate(size).eval()
        return Recommender(net, {"item_ids": self.item_ids, "titles": self.titles}, self.manifest, self.folder)

    # -- ids ----------------------------------------------------------------------------------
    def encode(self, history, skip_unknown=False):
        """Internal ids of a raw-id history and how many unknown ids were skipped."""
        ids = [self.index.get(str(token)) for token in history]
        unknown = [str(t) for t, i in zip(history, ids) if i is None]
        if unknown and not skip_unknown:
            raise UnknownItemError(f"{len(unknown)} unknown item id(s) {unknown[:5]} (not in this artifact's "
                                   f"{len(self.index)} items; skip them with skip_unknown / --skip-unknown)")
        return [i for i in ids if i is not None], len(unknown)

    def internal(self, token):
        ids, _ = self.encode([token])
        return ids[0]

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden(self, histories, context="window"):
        """Last hidden states [B m] of internal-id histories (lists, oldest first)."""
        streaming.check_context(context)
        empty = [row for row, h in enumerate(histories) if len(h) == 0]
        if empty:
            raise EmptyHistoryError(f"history {empty[0] + 1} of {len(histories)} is empty (no known item): "
                                    f"nothing to recommend from")
        if context == "window":
            histories = [h[-self.window:] for h in histories]
        lengths = torch.tensor([len(h) for h in histories])
        items = torch.zeros(len(histories), int(lengths.max()), dtype=torch.long)
        for row, h in enumerate(histories):
            items[row, : len(h)] = torch.tensor(h)
        if int(lengths.max()) > self.window:  # the full recurrence, without an L x L kernel
            return streaming.run_recurrent(self.net, items, lengths)
        return self.net.infer(items, lengths)

    @torch.no_grad()
    def scores(self, histories, context="window"):
        """Scores [B N+1] of every item (column 0 is padding) for internal-id histories."""
        return self.net.scores(self.hidden(histories, context))

    def excluded(self, histories, exclude_seen):
        mask = torch.zeros(len(histories), len(self.item_ids), dtype=torch.bool)
        mask[:, 0] = True
        if exclude_seen:
            for row, h in enumerate(histories):
                mask[row, h] = True
        return mask

    def recommend(self, histories, k=10, exclude_seen=False, skip_unknown=False, context="window", funnel=None):
        """Top-k per history: dicts with ``items`` (raw ids), ``titles``, ``scores``, ``skipped``."""
        stages = self.stages(funnel, k)
        encoded = [self.encode(h, skip_unknown) for h in histories]
        ids = [e[0] for e in encoded]
        hidden = self.hidden(ids, context)
        top_ids, top_scores = funnels.funnel_topk(hidden, self.net.item_table(), stages, k,
                                                  self.excluded(ids, exclude_seen), self.index_for(stages))
        return [self.describe(i, s, skipped) for i, s, (_, skipped) in zip(top_ids.tolist(), top_scores.tolist(), encoded)]

    def stages(self, funnel, k, size=None):
        """The funnel's stages (or the one stage at ``size``, default this one's) for top-``k``; refuses
        what cannot return k items. A nested size's stages read the first dims of this size's hidden state."""
        n_items = len(self.item_ids) - 1
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_items:
            raise InputError(f"topk={k!r}: need an integer from 1 to the artifact's {n_items} items")
        size = self.size if size is None else size
        if size not in self.net.sizes:
            raise InputError(f"size {size!r}: not a nested size of {self.folder} (its sizes: {self.net.sizes})")
        stages = funnels.parse_funnel(funnel) if funnel else [funnels.Stage(size, None)]
        if max(s.size for s in stages) > size or any(s.size not in self.net.sizes for s in stages):
            sizes = [m for m in self.net.sizes if m <= size]
            raise InputError(f"funnel {funnel!r}: stage sizes must be nested sizes {sizes}")
        shortest = min((s.keep for s in stages if s.keep is not None), default=None)
        if shortest is not None and shortest < k:
            raise InputError(f"funnel {funnel!r}: its last shortlist keeps {shortest} items, fewer than topk={k}; "
                             f"keep at least {k} in every stage")
        return stages

    def index_for(self, stages):
        """The ann index a funnel's first stage needs, or None for an exact funnel."""
        return self.ann_index(stages[0].size) if funnels.as_stage(stages[0]).ann else None

    def ann_index(self, size):
        """The HNSW index over the first ``size`` dims of this artifact's item table (``ann.load_or_build``)."""
        key = (size, self.ann_params)
        if key not in self.ann_indexes:
            sha = self.manifest["files"][artifact.WEIGHTS]["sha256"]
            self.ann_indexes[key] = ann.load_or_build(self.net.item_table().detach(), size, sha, self.ann_params)
        return self.ann_indexes[key]

    def describe(self, ids, scores, skipped=0):
        keep = [(i, s) for i, s in zip(ids, scores) if s != float("-inf")]
        return {"items": [self.item_ids[i] for i, _ in keep],
                "titles": [self.titles[i] for i, _ in keep] if self.titles else None,
                "scores": [float(s) for _, s in keep], "skipped": skipped}

    # -- streaming ----------------------------------------------------------------------------
    def init_state(self, context="full"):
        return streaming.init_state(self.net, context)

    def step(self, state, item_id):
        """Advance a user's state by one raw item id: (new state, scores [N+1] of every item)."""
        state, hidden = streaming.step(self.net, state, self.internal(item_id), self.window)
        return state, self.net.scores(hidden)[0]

    def top(self, scores, k=10, exclude=()):
        """Top-k of a score vector from ``step`` as a ``recommend``-style dict."""
        scores = scores.clone()
        scores[0] = float("-inf")
        if exclude:
            scores[[self.internal(t) for t in exclude]] = float("-inf")
        top = torch.topk(scores, min(k, scores.shape[0]))
        return self.describe(top.indices.tolist(), top.values.tolist())
