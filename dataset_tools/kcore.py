"""Iterative k-core: drop users and items with fewer than k interactions until none is left.

One pass is not enough: removing a sparse item can push a user under k, and so on; the loop
repeats until a pass removes nothing, which is the unique maximal k-core (removal is monotone,
so the order of removals does not change the fixed point).
"""
from typing import Tuple

import numpy as np
from tqdm.auto import tqdm


def kcore_mask(user_idx, item_idx, k: int, progress: bool = True) -> Tuple[np.ndarray, int]:
    """Rows kept by the iterative ``k``-core over users and items, and the number of passes.

    ``user_idx``/``item_idx`` are dense non-negative int arrays, one entry per interaction.
    ``k <= 1`` keeps every row (every user and item present has at least one interaction).
    """
    user_idx = np.asarray(user_idx, dtype=np.int64)
    item_idx = np.asarray(item_idx, dtype=np.int64)
    keep = np.ones(len(user_idx), dtype=bool)
    if k <= 1 or len(keep) == 0:
        return keep, 0
    n_users = int(user_idx.max()) + 1
    n_items = int(item_idx.max()) + 1
    passes = 0
    bar = tqdm(desc=f"{k}-core", unit="pass", disable=not progress, leave=False)
    while True:
        passes += 1
        bar.update(1)
        u_count = np.bincount(user_idx[keep], minlength=n_users)
        i_count = np.bincount(item_idx[keep], minlength=n_items)
        new_keep = keep & (u_count[user_idx] >= k) & (i_count[item_idx] >= k)
        removed = int(keep.sum() - new_keep.sum())
        bar.set_postfix(rows=int(new_keep.sum()))
        keep = new_keep
        if removed == 0:
            break
    bar.close()
    return keep, passes
