#!/usr/bin/env python
"""How much do the numbers move when the user's history is excluded from the ranking?

Published numbers on Amazon Beauty come from two evaluation protocols: the fMRLRec paper and
RecBole rank every item (a history item can take a top-10 slot); LRURec's code and RecTools (behind
eSASRec's "SASRec+SS" 0.0531) exclude the items of the input window first. This script re-tests the
benchmark's kept best checkpoints under both: for every finished row
(``results/<dataset>/runs/<tag>/<row>/seed-*.json`` whose checkpoint was kept, ``--keep-checkpoints``)
it rebuilds the run from the result's own config, loads the checkpoint, and evaluates the test split
ranking every item (must reproduce the reported test NDCG@10: a row that does not is flagged) and
with ``fmrl_eval_mask_history: True``. Nothing is retrained and nothing is selected on test: the
checkpoints are the ones validation chose.

Writes ``results/<dataset>-history-filter.{md,csv}``; each checkpoint's numbers are cached beside it
(``history-filter.json``), so an interrupted run resumes where it stopped. A run whose checkpoint is gone
(another machine, a cleaned work folder) keeps its numbers from the earlier CSV when that CSV's
``reported_ndcg@10`` is the run's own test NDCG@10 (the same run), so measurements are never lost. Environment variables in a
result's checkpoint path are expanded (a result moved by hand may read ``$WORK/...``: set ``WORK`` to
the benchmark's ``--work-dir``).

    python -m benchmarks.history_filter --dataset amazon-beauty --data-path data
"""
import argparse
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from recbole_fmrl.atomic_write import write_text as atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

METRICS = ("ndcg@10", "recall@10")
CACHE_NAME = "history-filter.json"


def finished_runs(results_dir, dataset, tag):
    """(row, seed, result dict) of every finished run of ``dataset`` under ``tag``."""
    runs = []
    for path in sorted((results_dir / dataset / "runs" / tag).glob("*/seed-*.json")):
        if path.name.endswith(".progress.json"):
            continue
        result = json.loads(path.read_text())
        if result.get("status") == "ok":
            runs.append((result["row"], result["seed"], result))
    return runs


def retest(result, data_path, threads):
    """Test metrics of the result's checkpoint ranking every item and with the history masked."""
    import torch

    from recbole_fmrl.train.driver import prepare

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = dict(result["config"], seed=result["seed"], data_path=str(data_path), use_gpu=False,
                   fmrl_output_dir=scratch, checkpoint_dir=scratch, show_progress=False, state="ERROR")
        _, net, trainer, (_, _, test_data) = prepare(result["model"], result["dataset"], config_dict=cfg, log=False)
        trainer.load_weights(result["checkpoint"])
        out = {}
        for mask in (False, True):
            trainer.config["fmrl_eval_mask_history"] = mask
            test = trainer.evaluate(test_data, load_best_model=False)
            out["masked" if mask else "ranked"] = {m: float(test[m]) for m in METRICS}
    return out


def cached_retest(result, data_path, threads):
    """``retest`` once per checkpoint file (size and mtime): the cache lives beside the checkpoint."""
    ckpt = Path(result["checkpoint"])
    cache = ckpt.parent / CACHE_NAME
    stamp = f"{ckpt.name}:{ckpt.stat().st_size}:{int(ckpt.stat().st_mtime)}"
    entries = json.loads(cache.read_text()) if cache.exists() else {}
    if stamp not in entries:
        entries[stamp] = retest(result, data_path, threads)
        atomic_write_text(cache, json.dumps(entries, indent=1))
    return entries[stamp]


def earlier_numbers(csv_path):
    """(row, seed) -> {"reported_ndcg": float, "ranked": {...}, "masked": {...}} from an earlier report's CSV."""
    if not csv_path.is_file():
        return {}
    earlier = {}
    for line, r in enumerate(csv.DictReader(csv_path.open()), 2):
        try:
            earlier[(r["row"], int(r["seed"]))] = {
                "reported_ndcg": float(r["reported_ndcg@10"]),
                "ranked": {m: float(r[m]) for m in METRICS}, "masked": {m: float(r["masked_" + m]) for m in METRICS}}
        except (KeyError, TypeError, ValueError) as err:
            sys.exit(f"{csv_path}:{line}: unreadable row ({err!r}); move the file away to start afresh")
    return earlier


def numbers_of(result, data_path, threads, earlier):
    """A run's (ranked, masked) numbers: re-tested from its kept checkpoint, else the earlier report's when
    they belong to this very run (same reported test NDCG@10), else None."""
    ckpt = os.path.expandvars(result.get("checkpoint") or "")  # a hand-moved result may say $WORK/...
    if ckpt and Path(ckpt).exists():
        return cached_retest(dict(result, checkpoint=ckpt), data_path, threads), "re-tested"
    before = earlier.get((result["row"], result["seed"]))
    if before and abs(before["reported_ndcg"] - float(result["test"]["ndcg@10"])) <= 1e-9:
        return {"ranked": before["ranked"], "masked": before["masked"]}, "earlier report"
    return None, "checkpoint not kept"


def collect(runs, data_path, threads, earlier=None):
    """row -> list of per-seed dicts (reported test, re-tested ranked, masked); rows without a kept
    checkpoint or earlier numbers map to a reason string."""
    rows, total = {}, len(runs)
    for n, (row, seed, result) in enumerate(runs, 1):
        t0 = time.perf_counter()
        numbers, source = numbers_of(result, data_path, threads, earlier or {})
        if numbers is None:
            rows.setdefault(row, source)
            continue
        print(f"[{n}/{total}] {row} seed {seed}: ranked {numbers['ranked']['ndcg@10']:.4f}, "
              f"masked {numbers['masked']['ndcg@10']:.4f} ({source}, {time.perf_counter() - t0:.0f}s)", flush=True)
        if not isinstance(rows.get(row), list):
            rows[row] = []
        of = sum(r == row for r, _, _ in runs)
        rows[row].append({"seed": seed, "of": of, "reported": {m: float(result["test"][m]) for m in METRICS}, **numbers})
    return rows


def mean_std(values):
    mean = statistics.fmean(values)
    return f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def report(dataset, rows, command):
    """Markdown and CSV text of the comparison."""
    lines = [f"# {dataset}: test metrics ranking every item vs. with the history excluded", "",
             "Each row's best checkpoint (chosen on validation, ranking every item) re-tested twice: ranking every",
             "item (the benchmark's protocol, as the fMRLRec paper and RecBole) and with each user's input window",
             "excluded from the ranking (`fmrl_eval_mask_history: True`, as LRURec's code and RecTools / eSASRec).",
             "`reproduced` checks the first against the reported test NDCG@10 (4 decimals).", "",
             f"Command: `{command}`", "",
             "| row | seeds | NDCG@10 ranked | NDCG@10 history excluded | ratio | Recall@10 ranked | Recall@10 history excluded | reproduced |",
             "|---|---|---|---|---|---|---|---|"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "seed", "reported_ndcg@10", "ndcg@10", "masked_ndcg@10", "recall@10", "masked_recall@10"])
    order = sorted(rows, key=lambda r: -statistics.fmean(s["ranked"]["ndcg@10"] for s in rows[r])
                   if isinstance(rows[r], list) else 0)
    for row in order:
        seeds = rows[row]
        if not isinstance(seeds, list):
            lines.append(f"| {row} | | {seeds} | | | | | |")
            continue
        ranked = [s["ranked"]["ndcg@10"] for s in seeds]
        masked = [s["masked"]["ndcg@10"] for s in seeds]
        ok = all(abs(s["ranked"]["ndcg@10"] - s["reported"]["ndcg@10"]) <= 1e-4 for s in seeds)
        ratio = statistics.fmean(m / r for m, r in zip(masked, ranked))
        kept = f"{len(seeds)}" if len(seeds) == seeds[0]["of"] else f"{len(seeds)} of {seeds[0]['of']} (checkpoint not kept)"
        lines.append(f"| {row} | {kept} | {mean_std(ranked)} | {mean_std(masked)} | {ratio:.2f}x | "
                     f"{mean_std([s['ranked']['recall@10'] for s in seeds])} | "
                     f"{mean_std([s['masked']['recall@10'] for s in seeds])} | {'yes' if ok else '**no**'} |")
        for s in seeds:
            writer.writerow([row, s["seed"], s["reported"]["ndcg@10"], s["ranked"]["ndcg@10"], s["masked"]["ndcg@10"],
                             s["ranked"]["recall@10"], s["masked"]["recall@10"]])
    return "\n".join(lines) + "\n", buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-path", required=True, help="folder holding <dataset>/")
    parser.add_argument("--tag", default="cpu", help="runs/<tag>/ of the benchmark (default cpu)")
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    results_dir = Path(args.results)
    runs = finished_runs(results_dir, args.dataset, args.tag)
    if not runs:
        sys.exit(f"{results_dir / args.dataset / 'runs' / args.tag}: no finished runs")
    stem = results_dir / f"{args.dataset}-history-filter"
    rows = collect(runs, Path(args.data_path).resolve(), args.threads, earlier_numbers(stem.with_suffix(".csv")))
    command = f"python -m benchmarks.history_filter --dataset {args.dataset} --data-path {args.data_path}"
    markdown, table = report(args.dataset, rows, command)
    atomic_write_text(stem.with_suffix(".md"), markdown)
    atomic_write_text(stem.with_suffix(".csv"), table)
    print(f"wrote {stem}.md, {stem}.csv")


if __name__ == "__main__":
    main()
