#!/usr/bin/env python
"""The cross-dataset summary in the shape of the fMRLRec paper's Table 2: ``results/table2.md`` (and ``.csv``).

For every dataset, every row: test NDCG@5/10 and Recall@5/10 under both evaluation protocols, each from
the benchmark's own result JSONs and each selected on its own protocol's validation score (every row's
seeds stopped early on that protocol's validation NDCG@10):

- paper protocol (history ranked, the fMRLRec paper and RecBole): ``<results>/<dataset>/runs/<tag>/<row>/``,
  written by ``run_benchmark.py --dataset D``;
- history excluded (each user's input window removed from the ranking, as BSARec's, LRURec's and RecTools'
  evaluations do): ``<results>/history-excluded/<dataset>/runs/...``, written by
  ``run_benchmark.py --dataset D --results-dir results/history-excluded --set fmrl_eval_mask_history=True``.

Beside ours: the fMRLRec paper's numbers (``paper:`` in ``properties/benchmark/<dataset>.yaml``, paper
protocol) and other papers' published numbers on the same split (``published:``, with their protocol and
source). The best converged value of each metric column is bold. How each row stopped: early stopping (the
epochs and best epoch), or why it has no result (not run, cannot run, unfinished, not converged, stopped).
A row run under several tags (cpu, cuda) shows the tag with the most converged seeds, then the best mean
validation NDCG@10 (never a test number).

    python -m benchmarks.table2                                   # the three datasets of issue 28
    python -m benchmarks.table2 --datasets amazon-beauty --rows 'SASRec*,BSARec,FMRLRec-*'
"""
import argparse
import csv
import fnmatch
import io
import sys
from pathlib import Path

from benchmarks import bench_report, run_benchmark
from recbole_fmrl.atomic_write import write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DATASETS = ("amazon-beauty", "amazon-toys", "ml-1m-posters")
# The paper's Table 2 rows and the tuned baselines of issue 28, in table order; --rows adds or replaces.
TABLE2_ROWS = ("SASRec", "SASRec-allpos", "SASRec-allpos-recipe", "BERT4Rec", "GRU4Rec", "FMLPRec", "LRURec",
               "BSARec", "UniSRec", "FMRLRec-id", "FMRLRec-image", "FMRLRec-text", "FMRLRec-text_id",
               "FMRLRec-text_image", "FMRLRec-text-cosine", "FMRLRec-text_id-drop0.5", "FMRLRec-text_id-drop0.5-cosine")
# (key, name, results sub-folder, column label)
PROTOCOLS = (("paper", "paper protocol (history ranked)", "", "paper"),
             ("history-excluded", "history excluded", "history-excluded", "hist. excl."))
METRICS = bench_report.TABLE_METRICS  # ndcg@5, recall@5, ndcg@10, recall@10
NOT_RUN_YET = "not run yet"  # bench_report's reason for a row with no run and no not_run entry


def pick(candidates):
    """One summary per row and protocol: a converged one with the most seeds, then the best mean validation."""
    ok = [c for c in candidates if c["status"] == "ok"]
    if ok:
        return max(ok, key=lambda c: (c["n_seeds"], c.get("valid_ndcg@10") or 0.0))
    order = ["not converged", "unfinished", "stopped", "failed", "cannot run", "not run"]
    return min(candidates, key=lambda c: order.index(c["status"]) if c["status"] in order else len(order))


def protocol_summaries(dataset, results_dir, settings):
    """{protocol: {row: chosen summary}} from the two result folders."""
    out = {}
    for key, _, sub, _ in PROTOCOLS:
        _, table = bench_report.summaries(dataset, Path(results_dir) / sub if sub else Path(results_dir), settings)
        by_row = {}
        for summary in table:
            by_row.setdefault(summary["row"], []).append(summary)
        out[key] = {row: pick(c) for row, c in by_row.items()}
    return out


def reported(settings, row, protocol):
    """(N@10, R@10, label) the literature gives for this row under this protocol, or None."""
    ds = settings["dataset"]
    if protocol == "paper" and row in (ds.get("paper") or {}):
        entry = ds["paper"][row]
        return entry.get("ndcg@10"), entry.get("recall@10"), "fMRLRec paper"
    entry = (ds.get("published") or {}).get(row)
    if entry and entry.get("protocol") == protocol:
        return entry.get("ndcg@10"), entry.get("recall@10"), entry.get("source", "published")
    return None


def stop_text(summary):
    """How a row ended under one protocol, short enough for a cell."""
    if summary["status"] == "ok":
        how = summary.get("stopped_by") or "early stopping"
        return f"{how}, {summary['epochs']:.0f} ep (best {summary['best_epoch']:.0f}), {summary['n_seeds']} seed(s), {summary['tag']}"
    return summary["status"]


def best_values(rows, protocols):
    """The best converged mean of every (protocol, metric) column."""
    best = {}
    for protocol in protocols:
        for metric in METRICS:
            values = [s[f"test_{metric}"] for s in (r[protocol] for r in rows) if s and s["status"] == "ok"]
            best[protocol, metric] = max(values) if values else None
    return best


def metric_cell(summary, metric, best):
    if not summary or summary["status"] != "ok":
        return ""
    text = bench_report.fmt_metric(summary[f"test_{metric}"], summary[f"test_{metric}_std"])
    return f"**{text}**" if best is not None and summary[f"test_{metric}"] == best else text


def reported_cell(entry):
    if entry is None:
        return ""
    n, r, _ = entry
    return " / ".join("" if v is None else f"{v:.4f}" for v in (n, r))


def dataset_rows(dataset, results_dir, row_patterns):
    settings = run_benchmark.load_settings(dataset)
    chosen = [r for r in settings["rows"] if any(fnmatch.fnmatchcase(r, p) for p in row_patterns)]
    chosen.sort(key=lambda r: next(i for i, p in enumerate(row_patterns) if fnmatch.fnmatchcase(r, p)))
    summaries = protocol_summaries(dataset, results_dir, settings)
    rows = []
    for row in chosen:
        entry = {"row": row, "group": settings["rows"][row].get("group", "")}
        for key, _, _, _ in PROTOCOLS:
            entry[key] = summaries[key].get(row)
            entry[f"{key}_reported"] = reported(settings, row, key)
        rows.append(entry)
    return settings, rows


def markdown_section(dataset, settings, rows):
    title = settings["dataset"].get("title", dataset)
    head = ["group", "row"]
    for _, _, _, label in PROTOCOLS:
        head += [f"{bench_report.SHORT[m]} ({label})" for m in METRICS] + [f"reported N@10 / R@10 ({label})"]
    head += ["stopped (paper protocol)", "stopped (history excluded)"]
    lines = [f"## {title} (`{dataset}`)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = best_values(rows, [k for k, _, _, _ in PROTOCOLS])
    reasons, sources = [], {}
    for r in rows:
        cells = [r["group"], r["row"]]
        for key, _, _, _ in PROTOCOLS:
            cells += [metric_cell(r[key], m, best[key, m]) for m in METRICS]
            cells.append(reported_cell(r[f"{key}_reported"]))
            if r[f"{key}_reported"]:
                sources.setdefault(r[f"{key}_reported"][2], []).append(r["row"])
        cells += [stop_text(r[key]) if r[key] else "not run" for key, _, _, _ in PROTOCOLS]
        lines.append("| " + " | ".join(cells) + " |")
        for key, name, _, _ in PROTOCOLS:
            why = (r[key] or {}).get("reason") or ""
            if r[key] and r[key]["status"] != "ok" and why != NOT_RUN_YET:  # a bare "not run yet" says nothing more
                reasons.append(f"- {r['row']}, {name}: **{r[key]['status']}**: {why}")
    if sources:
        lines += ["", "Reported numbers: " + "; ".join(f"{', '.join(rows_)}: {src}" for src, rows_ in sources.items()) + "."]
    if reasons:
        lines += ["", "Rows without a result:", "", *reasons]
    return lines + [""]


def csv_rows(dataset, rows):
    out = []
    for r in rows:
        for key, _, _, _ in PROTOCOLS:
            s, rep = r[key] or {}, r[f"{key}_reported"]
            out.append({"dataset": dataset, "row": r["row"], "protocol": key, "status": s.get("status", "not run"),
                        "tag": s.get("tag", ""), "seeds": s.get("seeds", ""),
                        **{f"test_{m}": s.get(f"test_{m}") for m in METRICS},
                        **{f"test_{m}_std": s.get(f"test_{m}_std") for m in METRICS},
                        "valid_ndcg@10": s.get("valid_ndcg@10"), "stopped_by": s.get("stopped_by", ""),
                        "reported_ndcg@10": rep[0] if rep else None, "reported_recall@10": rep[1] if rep else None,
                        "reported_source": rep[2] if rep else ""})
    return out


def build(results_dir, datasets, row_patterns):
    lines = ["# Table 2: every dataset, every row, both protocols", "",
             "Test metrics (mean ± sample std over seeds; one seed: no ±) at each row's best validation checkpoint, "
             "under two protocols, each selected on its own protocol's validation NDCG@10: the fMRLRec paper's "
             "(every item ranked, history included) and with each user's input window excluded from the ranking "
             "(`fmrl_eval_mask_history`, the protocol of BSARec's, LRURec's and RecTools' code). Leave-one-out by time, "
             "full ranking, window 50. *reported*: the fMRLRec paper's numbers (paper protocol) and other papers' on "
             "the same split (history excluded; HR@10 = Recall@10 with one test item). Bold: the best converged "
             "value in its column. Per-dataset details, settings and curves: `results/<dataset>.md` and "
             "`results/history-excluded/<dataset>.md`. Written by `python -m benchmarks.table2`.", ""]
    table = []
    for dataset in datasets:
        settings, rows = dataset_rows(dataset, results_dir, row_patterns)
        lines += markdown_section(dataset, settings, rows)
        table += csv_rows(dataset, rows)
    return "\n".join(lines), table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "results"), help="results folder (history-excluded/ inside it)")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list of datasets")
    p.add_argument("--rows", default=None, help="comma list of rows or fnmatch patterns, in table order "
                   f"(default: {', '.join(TABLE2_ROWS)})")
    p.add_argument("--output", default=None, help="markdown path (default <results>/table2.md; the CSV beside it)")
    args = p.parse_args(argv)
    patterns = [s.strip() for s in (args.rows or ",".join(TABLE2_ROWS)).split(",") if s.strip()]
    text, table = build(args.results, [d.strip() for d in args.datasets.split(",") if d.strip()], patterns)
    output = Path(args.output or Path(args.results) / "table2.md")
    write_text(output, text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]) if table else ["dataset"])
    writer.writeheader()
    writer.writerows(table)
    write_text(output.with_suffix(".csv"), buffer.getvalue())
    print(f"wrote {output}, {output.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
