#!/usr/bin/env python
"""How much next-item signal do the frozen item features carry on their own? (diagnostic)

Scores every item by the cosine similarity of its feature vector to the user's last item, with no
training at all, and reports Recall/NDCG@10 on the validation split (leave-one-out by time, full
ranking, history not masked, the benchmark's protocol). A random ranking and a popularity ranking
are printed beside it. Reading: if the features alone rank the next item poorly, a model that sees
items only through a linear projection of them (FMRLRec text) starts from a weaker item table than an
ID embedding learned from the interactions.

    python -m benchmarks.probe_text_knn --data-path data --dataset amazon-beauty --modality text
"""
import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def read_sequences(inter_path):
    """user -> item tokens in time order (ties: file order)."""
    users = {}
    with open(inter_path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        u, i, t = (header.index(c) for c in ("user_id:token", "item_id:token", "timestamp:float"))
        for n, line in enumerate(handle):
            row = line.rstrip("\n").split("\t")
            users.setdefault(row[u], []).append((float(row[t]), n, row[i]))
    return {user: [item for _, _, item in sorted(seq)] for user, seq in users.items()}


def metrics(ranks, k=10):
    ranks = np.asarray(ranks)
    hit = ranks < k
    return {"recall@10": float(hit.mean()), "ndcg@10": float((hit / np.log2(ranks + 2)).mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--modality", default="text")
    args = p.parse_args(argv)
    from recbole_fmrl.data import features as feature_files

    folder = Path(args.data_path) / args.dataset
    seqs = read_sequences(folder / f"{args.dataset}.inter")
    table = feature_files.read_modality(folder, args.dataset, args.modality)
    tokens = list(table.item_ids)
    row_of = {t: n for n, t in enumerate(tokens)}
    feats = np.asarray(table.array, dtype=np.float32)
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    # validation: target = second-to-last item, query = the item before it; popularity from training parts
    pop = np.zeros(len(tokens))
    queries, targets = [], []
    for seq in seqs.values():
        if len(seq) < 3:
            continue
        for item in seq[:-2]:
            pop[row_of[item]] += 1
        queries.append(row_of[seq[-3]])
        targets.append(row_of[seq[-2]])
    queries, targets = np.asarray(queries), np.asarray(targets)
    rng = np.random.default_rng(0)
    results = {}
    ranks = []
    for start in range(0, len(queries), 2048):
        q, t = queries[start:start + 2048], targets[start:start + 2048]
        scores = feats[q] @ feats.T  # [b N]
        target_score = scores[np.arange(len(q)), t]
        ranks.append((scores > target_score[:, None]).sum(1))  # optimistic ties: 0-based rank
    results[f"{args.modality} kNN of the last item"] = metrics(np.concatenate(ranks))
    pop_rank = (pop[None, :] > pop[targets][:, None]).sum(1)
    results["popularity"] = metrics(pop_rank)
    results["random"] = metrics(rng.integers(0, len(tokens), size=len(targets)))
    print(f"{args.dataset}: {len(targets)} users, {len(tokens)} items, {args.modality} features {feats.shape[1]}-d "
          "(validation split, full ranking, history not masked)")
    for name, m in results.items():
        print(f"  {name:<32} NDCG@10 {m['ndcg@10']:.4f}  Recall@10 {m['recall@10']:.4f}")
    return results


if __name__ == "__main__":
    main()
