"""Approximate first stage of the funnel: a faiss inner-product HNSW index over an item table's first s dims.

``ann32:1000,256`` asks this index for the 1000 items with the largest 32-dim inner product, then reranks
them exactly. The index is ``IndexHNSWFlat`` (``index_factory("HNSW<M>")``, inner product) over rows 1..N
of the table (row 0 is padding, never indexed; index row r is item r+1). Its vectors are stored flat, so
the scores it returns are exact: only *which* items it visits is approximate.

Parameters (``HnswParams``): ``M`` = 32 graph neighbours per node (64 at layer 0), ``ef_construction`` =
40 (faiss's default; build candidates per insertion), ``ef_search`` = the search beam, at least the number
of items asked for (an HNSW beam narrower than k returns fewer than k ids: measured, -1 padding), default
``keep``. Build is O(N log N): 10^6 items took 155 s at 128 dims and 196 s at 256 on one shared CPU
thread, 0.75 / 1.2 GiB (results/ann.md); a serving process builds it once per artifact.

The index is built on first use and cached as ``<fmrl cache>/ann/<sha256 of model.pt>-s<s>-<params>.faiss``
(``paths.default_cache_dir``), written atomically, beside a ``.json`` sidecar holding the index file's own
sha256, bytes, rows and dims. Loading hashes the very bytes it deserializes and checks them against the
sidecar: a damaged, truncated or foreign cache file is rebuilt (one log line), never used.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recbole_fmrl import atomic_write
from recbole_fmrl.errors import InputError
from recbole_fmrl.paths import default_cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HnswParams:
    M: int = 32
    ef_construction: int = 40
    ef_search: int = 0  # 0: the number of items asked for (the narrowest beam that can return them all)

    def tag(self):
        """The build parameters, as they name a cache file (ef_search is a search-time setting)."""
        return f"hnsw{self.M}-efc{self.ef_construction}"


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("the ann funnel stage needs faiss: pip install -e .[serve] (or pip install faiss-cpu)") from None
    return faiss


class AnnIndex:
    """A faiss HNSW index over the first ``size`` dims of rows 1..N of an item table."""

    def __init__(self, index, size, params):
        self.index, self.size, self.params = index, size, params
        self.n_items = int(index.ntotal)

    def search(self, queries, n):
        """Item ids [B n] (internal: 1..N, 0 where the graph returned fewer than n) of the top-n inner products."""
        faiss = require_faiss()
        n = min(n, self.n_items)
        x = np.ascontiguousarray(queries[:, : self.size].detach().cpu().numpy(), dtype=np.float32)
        params = faiss.SearchParametersHNSW(efSearch=max(self.params.ef_search, n))
        _, rows = self.index.search(x, n, params=params)
        return torch.from_numpy(rows + 1).clamp_(min=0)  # faiss pads with -1: 0 is the padding item


def build(table, size, params=HnswParams()):
    """A fresh index over ``table[1:, :size]`` (table [N+1 M], torch or numpy)."""
    faiss = require_faiss()
    rows = table[1:, :size]
    rows = rows.detach().cpu().numpy() if torch.is_tensor(rows) else rows
    vectors = np.ascontiguousarray(rows, dtype=np.float32)  # [N s]
    index = faiss.index_factory(size, f"HNSW{params.M}", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.add(vectors)
    return AnnIndex(index, size, params)


def cache_path(weights_sha256, size, params=HnswParams(), cache_dir=None):
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "ann"
    return root / f"{weights_sha256}-s{size}-{params.tag()}.faiss"


def sidecar(path):
    return Path(path).with_suffix(".json")


def save(ann, path):
    """Write the index and then its sidecar, each atomically (a reader sees both old, both new, or a mismatch)."""
    faiss = require_faiss()
    data = faiss.serialize_index(ann.index).tobytes()
    with atomic_write.atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    atomic_write.write_json(sidecar(path), {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                            "rows": ann.n_items, "size": ann.size, "params": ann.params.tag()})


def load(path, n_items, size, params):
    """The cached index at ``path``, or None (with the reason) when it is missing, damaged or not this table's."""
    faiss = require_faiss()
    try:
        meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
        data = Path(path).read_bytes()
    except (OSError, ValueError) as err:
        return None, f"unreadable ({type(err).__name__})"
    if not isinstance(meta, dict) or meta.get("bytes") != len(data) or meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return None, "sha256 or size differs from its sidecar (damaged or truncated)"
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != n_items or index.d != size:
        return None, f"holds {index.ntotal} x {index.d}, not {n_items} x {size}"
    return AnnIndex(index, size, params), None


def load_or_build(table, size, weights_sha256, params=HnswParams(), cache_dir=None):
    """The cached index of ``table[1:, :size]`` (keyed by the artifact's model.pt sha256), built if needed."""
    path = cache_path(weights_sha256, size, params, cache_dir)
    if path.is_file():
        ann, reason = load(path, table.shape[0] - 1, size, params)
        if ann is not None:
            return ann
        log.warning(f"ann index {path}: {reason}; rebuilding it")
    ann = build(table, size, params)
    save(ann, path)
    return ann


def excluded_counts(excluded):
    """Excluded items per row [B], padding included: numpy's per-row count, ~50x faster than torch's
    ``count_nonzero`` on [64 10^6] (which dominated the whole ann funnel before)."""
    rows = excluded.cpu().numpy()
    return torch.tensor([np.count_nonzero(row) for row in rows])


def shortlist(ann, hidden, table, keep, excluded):
    """ANN stage: ids [B min(keep, N)] of non-excluded items, best first (0, the padding, only where fewer exist).

    ``excluded`` [B N+1] marks the padding too. faiss is asked for ``keep`` plus the row's most excluded
    items, so that dropping the excluded ones still leaves ``keep``; a row for which the graph still came
    back short is scored exactly instead. Nothing here is O(N) per row but counting the mask.
    """
    width = min(keep, ann.n_items)
    counts = excluded_counts(excluded)
    ids = ann.search(hidden, keep + int(counts.max()) - 1)  # [B ask]
    valid = excluded.gather(1, ids).logical_not_()  # padding (0) is always excluded
    order = torch.sort(valid.logical_not().to(torch.int8), dim=1, stable=True).indices[:, :width]
    ids, valid = ids.gather(1, order), valid.gather(1, order)  # the valid ones first, in faiss's order
    allowed = (excluded.shape[1] - counts).clamp(max=width)
    short = (valid.sum(1) < allowed).nonzero().flatten()
    if len(short):  # the beam missed some: exact scores at this size for these rows
        scores = hidden[short, : ann.size] @ table[:, : ann.size].T  # [S N+1]
        scores = scores.masked_fill(excluded[short], float("-inf"))
        ids[short] = torch.topk(scores, width, dim=1).indices
    return ids.masked_fill(excluded.gather(1, ids), 0)
