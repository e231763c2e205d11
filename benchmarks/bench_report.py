"""Report of ``run_benchmark.py``: results/<dataset>.md, .csv, -sizes.csv/.png and -curves.png from run JSONs
(every file written atomically: several harness invocations may rewrite the report at once)."""
import csv
import fnmatch
import json
import math
import re
import statistics
from collections import OrderedDict
from pathlib import Path

from recbole_fmrl import atomic_write

METRICS = ["ndcg@5", "recall@5", "ndcg@10", "recall@10", "ndcg@20", "recall@20", "ndcg@50", "recall@50"]
TABLE_METRICS = ["ndcg@5", "recall@5", "ndcg@10", "recall@10"]
SHORT = {"ndcg@5": "N@5", "recall@5": "R@5", "ndcg@10": "N@10", "recall@10": "R@10", "ndcg@20": "N@20",
         "recall@20": "R@20", "ndcg@50": "N@50", "recall@50": "R@50"}


def load_runs(results_dir, dataset):
    """{tag: {row: {"runs": [converged results], "not_converged": [results a budget ended], "unavailable": reason,
    "failed": [failures], "unfinished": [curves so far]}}}."""
    base = Path(results_dir) / dataset / "runs"
    out = OrderedDict()
    if not base.is_dir():
        return out
    for tag_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        rows = out.setdefault(tag_dir.name, OrderedDict())
        for row_dir in sorted(p for p in tag_dir.iterdir() if p.is_dir()):
            entry = rows.setdefault(row_dir.name, {"runs": [], "unavailable": None, "failed": [], "unfinished": []})
            for path in sorted(row_dir.glob("*.json")):
                try:
                    data = json.loads(path.read_text())
                except ValueError:
                    continue
                if data.get("status") == "ok":
                    entry["runs"].append(data)
                elif data.get("status") == "unavailable":
                    entry["unavailable"] = data.get("reason")
                elif data.get("status") == "failed":
                    entry["failed"].append(data)
                elif data.get("status") == "unfinished":
                    entry["unfinished"].append(data)
            entry["not_converged"] = [r for r in entry["runs"] if not converged(r)]  # a budget ended them: no result
            entry["runs"] = sorted((r for r in entry["runs"] if converged(r)), key=lambda r: r["seed"])
            done = {r["seed"] for r in entry["runs"]}
            entry["unfinished"] = sorted((u for u in entry["unfinished"] if u["seed"] not in done), key=lambda u: u["seed"])
    return out


def converged(run):
    """Did the protocol end this run? Early stopping did (RecBole stops after stopping_step + 1 epochs
    without a gain in validation NDCG@10), and so did a budget (time or epoch cap) that struck exactly
    then. A budget that cut a run earlier, improving or not, leaves no result."""
    if run.get("stopped_by") not in ("time budget", "max epochs"):
        return True
    patience = (run.get("resolved") or {}).get("stopping_step", (run.get("config") or {}).get("stopping_step"))
    return patience is not None and run["epochs"] - run["best_epoch"] > patience


PROTOCOL_STOPS = {"early stopping": "early stopping", "learning rate at 0": "the learning-rate schedule reaching 0"}


def stop_note(stopped_by):
    """The note on what ended a converged row's seeds ("; "-joined), empty when early stopping ended all."""
    reasons = stopped_by.split("; ")
    if reasons == ["early stopping"]:
        return []
    budgets = [r for r in reasons if r not in PROTOCOL_STOPS]
    protocol = [PROTOCOL_STOPS[r] for r in reasons if r in PROTOCOL_STOPS]
    return [f"ended by {' or '.join(protocol)}"] * bool(protocol) + [
        f"stopped by {' or '.join(budgets)} once patience ran out"] * bool(budgets)


def not_converged_text(runs):
    """One line per budget-ended seed: how far it got and why it is not a result."""
    parts = []
    for r in runs:
        since = r["epochs"] - r["best_epoch"]
        trend = "best at the last epoch: still improving" if since == 0 else f"no gain for {since} epochs"
        budget = (f"its {r['max_train_seconds'] / 60:.1f}-min training budget" if r["stopped_by"] == "time budget"
                  else f"the epoch cap ({r.get('max_epochs')})")
        best = max(r["valid_curve"]) if r.get("valid_curve") else r["valid"].get("ndcg@10")
        parts.append(f"seed {r['seed']} stopped by {budget} after {r['epochs']} epochs, before early stopping "
                     f"(best validation NDCG@10 {best:.4f} at epoch {r['best_epoch']}, {trend}): "
                     "not a result; rerun without --max-train-minutes")
    return "; ".join(parts)


def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_metric(mean, std):
    if mean is None:
        return ""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def fmt_seconds(s):
    if s is None:
        return ""
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_params(n):
    if n is None:
        return ""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


# models whose training signal fmrl_train_objective chooses (RecBole's own train on prefix samples)
PLUGIN_OBJECTIVES = ("FMRLRec", "LRURec", "FMLPRec", "SASRecAP", "BSARec", "UniSRec")
FEATURE_NORMS = {"whiten": "whitened", "center": "centred", "standardize": "standardized", "none": "raw"}


def settings_text(run):
    """A short description of the row's size and training signal."""
    r, cfg = run.get("resolved") or {}, run.get("config") or {}
    parts = []
    d = r.get("hidden_size")
    if run["model"] == "GRU4Rec":
        parts.append(f"emb {r.get('embedding_size')}, GRU {d} x{r.get('num_layers')}")
    elif d is not None:
        parts.append(f"d={d}")
    if run["model"] != "GRU4Rec" and r.get("n_layers") is not None:
        parts.append(f"{r['n_layers']} blk")
    if run["model"] == "FMRLRec":
        parts.append(f"sizes {r.get('fmrl_sizes') or '8..d'}")
        if r.get("fmrl_size_weights"):
            parts.append(f"size weights {r['fmrl_size_weights']}")
        if r.get("fmrl_distill_weight"):
            rows = f" on {r['fmrl_distill_rows']} rows/step" if r.get("fmrl_distill_rows") else ""
            parts.append(f"distilled from size d x{r['fmrl_distill_weight']}{rows}")
        if r.get("fmrl_modality") != "id":  # runs before the key existed used the raw features
            parts.append(f"{FEATURE_NORMS.get(r.get('fmrl_feature_norm'), 'raw')} features")
    if run["model"] == "BSARec" and r.get("bsarec_alpha") is not None:
        parts.append(f"alpha {r['bsarec_alpha']}, c {r.get('bsarec_c')}")
    if run["model"] == "UniSRec":
        items = "text + ID" if r.get("fmrl_modality") == "text_id" else "text"
        parts.append(f"{items}, {r.get('unisrec_n_exps')} experts, tau {r.get('unisrec_temperature')}, "
                     f"{FEATURE_NORMS.get(r.get('fmrl_feature_norm'), 'raw')} features")
    objective = r.get("fmrl_train_objective") if run["model"] in PLUGIN_OBJECTIVES else None
    parts.append("all-pos windows" if objective == "all_positions" else "prefix samples")
    negatives = r.get("fmrl_train_negatives", cfg.get("fmrl_train_negatives"))
    if negatives:
        parts.append(f"sampled softmax {negatives} neg")
    drop = r.get("hidden_dropout_prob", r.get("dropout_prob"))
    if drop is not None:
        parts.append(f"drop {drop}")
    parts.append(f"{r.get('learner', cfg.get('learner', 'adam'))} lr {r.get('learning_rate')} bs {r.get('train_batch_size')}")
    if r.get("fmrl_lr_warmup_steps"):
        parts.append(f"warm-up {r['fmrl_lr_warmup_steps']} steps")
    if r.get("fmrl_lr_decay_epochs"):
        parts.append(f"cosine to 0 over {r['fmrl_lr_decay_epochs']} epochs")
    return ", ".join(parts)


def row_summary(tag, row, spec, entry, paper, not_run_reason, unavailable=None, stopped=None):
    runs = entry["runs"] if entry else []
    out = OrderedDict(tag=tag, row=row, model=spec["model"], group=spec.get("group", ""),
                      paper_name=spec.get("paper_name", ""), status="", reason="", seeds="", n_seeds=len(runs))
    for split in ("test", "valid"):
        for m in METRICS:
            mean, std = mean_std([r[split].get(m) for r in runs])
            out[f"{split}_{m}"], out[f"{split}_{m}_std"] = mean, std
    out["paper_ndcg@10"] = (paper or {}).get("ndcg@10")
    out["paper_recall@10"] = (paper or {}).get("recall@10")
    if runs:
        out["status"] = "ok"
        out["seeds"] = " ".join(str(r["seed"]) for r in runs)
        out["params"] = runs[0]["params"]
        out["epochs"] = mean_std([r["epochs"] for r in runs])[0]
        out["best_epoch"] = mean_std([r["best_epoch"] for r in runs])[0]
        out["max_epochs"] = runs[0].get("max_epochs")
        out["train_epoch_s"] = mean_std([r["train_epoch_seconds"] for r in runs])[0]
        out["valid_epoch_s"] = mean_std([r["valid_epoch_seconds"] for r in runs])[0]
        out["train_epoch_cpu_s"] = mean_std([r.get("train_epoch_cpu_seconds") for r in runs])[0]
        out["cpu_s"] = mean_std([r.get("cpu_seconds") for r in runs])[0]
        out["wall_s"] = mean_std([r["wall_seconds"] for r in runs])[0]
        out["wall_total_s"] = sum(r["wall_seconds"] for r in runs)
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        gpu = [r.get("peak_gpu_mb") for r in runs if r.get("peak_gpu_mb") is not None]
        out["peak_gpu_mb"] = max(gpu) if gpu else None
        out["stopped_by"] = "; ".join(sorted({r["stopped_by"] for r in runs}))
        out["settings"] = settings_text(runs[0])
        out["train_samples"] = runs[0].get("train_samples")
        out["valid_curve"] = " ".join(f"{v:.4f}" for v in runs[0].get("valid_curve") or [])
        out["isolated"] = all(r.get("isolated") for r in runs)
        out["unfinished"] = "; ".join(filter(None, (unfinished_text(entry.get("unfinished") or [], score_name(spec), stopped),
                                                    not_converged_text(entry.get("not_converged") or []))))
        out["device"] = runs[0]["env"].get("device")
        out["cpu"] = runs[0]["env"].get("cpu")
        out["gpu"] = runs[0]["env"].get("gpu")
    elif entry and entry.get("not_converged"):
        out["status"], out["reason"] = "not converged", not_converged_text(entry["not_converged"])
        out["valid_curve"] = " ".join(f"{v:.4f}" for v in entry["not_converged"][0]["valid_curve"])
    elif entry and entry.get("unfinished"):
        out["status"] = "stopped" if stopped else "unfinished"
        out["reason"] = unfinished_text(entry["unfinished"], score_name(spec), stopped)
        out["valid_curve"] = " ".join(f"{v:.4f}" for v in entry["unfinished"][0]["valid_curve"])
    elif (entry and entry.get("unavailable")) or unavailable:
        out["status"], out["reason"] = "cannot run", (entry or {}).get("unavailable") or unavailable
    elif entry and entry.get("failed"):
        out["status"], out["reason"] = "failed", entry["failed"][-1].get("error", "")
    else:
        out["status"], out["reason"] = "not run", not_run_reason or "not run yet"
    return out


def score_name(spec):
    """What a row's validation score is: the largest size's NDCG@10, or a mean over sizes (fmrl_select_on)."""
    rule = {**(spec.get("config") or {}), **(spec.get("override") or {})}.get("fmrl_select_on", "largest")
    if rule in ("largest", "per_size"):  # per_size: each size its own epoch; the run's score stays the largest's
        return "validation NDCG@10"
    return f"validation score ({rule} of every size's NDCG@10)"


def unfinished_text(progress, score="validation NDCG@10", stopped=None):
    """One line per unfinished seed: epochs so far, best validation score and whether it still improves;
    ``stopped``: why the row was given up (the dataset YAML's ``stopped``), else it may still run or resume."""
    parts = []
    for u in progress:
        since = u["epochs"] - u["best_epoch"]
        trend = "still improving" if since == 0 else f"no gain for {since} epochs"
        best = f"best {score} {u['best_valid']:.4f} at epoch {u['best_epoch']}, {trend}"
        parts.append(f"seed {u['seed']} given up after {u['epochs']} epochs, before early stopping ({best}), not a "
                     f"result: {stopped}" if stopped else f"seed {u['seed']} unfinished after {u['epochs']} epochs "
                     f"(still running or interrupted; the same command resumes it): {best}")
    return "; ".join(parts)


def _pattern_value(mapping, row):
    for pattern, value in (mapping or {}).items():
        if fnmatch.fnmatchcase(row, pattern):
            return value
    return None


def summaries(dataset, results_dir, settings):
    runs = load_runs(results_dir, dataset)
    ds = settings["dataset"]
    tags = list(runs) or ["cpu"]
    table = []
    for tag in tags:
        for row, spec in settings["rows"].items():
            if spec.get("single_of"):  # generated single-size rows: the nested-vs-independent table
                continue
            table.append(row_summary(tag, row, spec, runs.get(tag, {}).get(row), (ds.get("paper") or {}).get(row),
                                     _pattern_value(ds.get("not_run"), row), _pattern_value(ds.get("unavailable"), row),
                                     _pattern_value(ds.get("stopped"), row)))
    return runs, table


def size_series(runs, settings):
    """{tag: (row, [(size, params, {test metric: mean})])} for the Figure 3 row of every tag."""
    out = OrderedDict()
    order = [r for r, s in settings["rows"].items() if s.get("sizes_plot") is True] + \
            [r for r, s in settings["rows"].items() if s.get("sizes_plot") == "fallback"]
    for tag, rows in runs.items():
        for row in order:
            done = [r for r in rows.get(row, {}).get("runs", []) if r.get("size_results")]
            if not done:
                continue
            sizes = sorted(done[0]["size_results"], key=int)
            series = []
            for m in sizes:
                metrics = {}
                for split in ("test", "valid"):
                    for k in METRICS:
                        metrics[f"{split}_{k}"], metrics[f"{split}_{k}_std"] = mean_std(
                            [r["size_results"][m][split].get(k) for r in done])
                series.append((int(m), done[0]["size_results"][m]["params"], metrics))
            out[tag] = (row, len(done), series)
            break
    return out


def plot_sizes(path, dataset, series_by_tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tag, (row, _, series) in series_by_tag.items():
        sizes = [s for s, _, _ in series]
        for ax, family, ks in ((axes[0], "recall", (10, 20, 50)), (axes[1], "ndcg", (10, 20, 50))):
            for k in ks:
                ax.plot(sizes, [m[f"test_{family}@{k}"] for _, _, m in series], marker="o",
                        label=f"{family.upper() if family == 'ndcg' else 'Recall'}@{k} ({row}, {tag})")
    for ax, name in ((axes[0], "Recall"), (axes[1], "NDCG")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("Matryoshka size m (dims of one trained model)")
        ax.set_ylabel(f"test {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: every size from one FMRLRec training (paper Figure 3)")
    fig.tight_layout()
    with atomic_write.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


SINGLE_ROW = re.compile(r"^(?P<base>.+)-single-(?P<size>\d+)$")
PAIR_METRICS = ("ndcg@10", "recall@10")


def _pair(size, nested, single, unfinished=()):
    """One size: the nested row's size-m metrics and the single-size row's, mean (std) over seeds, and ratios;
    without a finished single-size run, the unfinished ones' progress and a validation ratio bound."""
    out = OrderedDict(size=size, nested_seeds=len(nested), single_seeds=len(single))
    out["nested_params"] = nested[0]["size_results"][str(size)]["params"] if nested else None
    out["single_params"] = single[0]["params"] if single else None
    for split in ("test", "valid"):
        for k in PAIR_METRICS:
            n_mean, n_std = mean_std([r["size_results"][str(size)][split].get(k) for r in nested])
            s_mean, s_std = mean_std([r[split].get(k) for r in single])
            out[f"{split}_{k}_nested"], out[f"{split}_{k}_nested_std"] = n_mean, n_std
            out[f"{split}_{k}_single"], out[f"{split}_{k}_single_std"] = s_mean, s_std
            out[f"{split}_{k}_ratio"] = n_mean / s_mean if n_mean is not None and s_mean else None
    out["single_epochs"] = mean_std([r["epochs"] for r in single])[0]
    out["single_best_epoch"] = mean_std([r["best_epoch"] for r in single])[0]
    out["single_stopped_by"] = "; ".join(sorted({r["stopped_by"] for r in single}))
    # an independent run still training: its best validation so far can only rise, so the ratio is an upper bound
    out["single_unfinished"] = [] if single else [
        {k: u[k] for k in ("seed", "epochs", "best_epoch", "best_valid")} for u in unfinished]
    best_so_far = max((u["best_valid"] for u in out["single_unfinished"]), default=None)
    n_valid = out["valid_ndcg@10_nested"]
    out["valid_ndcg@10_ratio_bound"] = n_valid / best_so_far if n_valid is not None and best_so_far else None
    return out


def nested_vs_independent(runs, settings=None):
    """{(tag, row): [per-size pairs]}: row's nested size-m results beside its ``<row>-single-<m>`` runs,
    and a lever row's (``independent_of: <row>`` in rows.yaml) beside that row's single-size runs.

    Sizes are the union of the nested row's sizes and the single-size rows found; a missing side is blank.
    """
    out = OrderedDict()
    levers = {row: spec["independent_of"] for row, spec in ((settings or {}).get("rows") or {}).items()
              if spec.get("independent_of")}
    for tag, rows in runs.items():
        singles = {}
        for name, entry in rows.items():
            match = SINGLE_ROW.match(name)
            if match and (entry["runs"] or entry["unfinished"]):
                singles.setdefault(match["base"], {})[int(match["size"])] = entry
        pairings = [(base, base) for base in singles] + [(lever, base) for lever, base in levers.items()
                                                          if base in singles and rows.get(lever, {}).get("runs")]
        for row, base in pairings:
            by_size = singles[base]
            nested = [r for r in rows.get(row, {}).get("runs", []) if r.get("size_results")]
            sizes = set(by_size) | {int(m) for r in nested for m in r["size_results"]}
            empty = {"runs": [], "unfinished": []}
            out[tag, row] = [_pair(m, [r for r in nested if str(m) in r["size_results"]],
                                    by_size.get(m, empty)["runs"], by_size.get(m, empty)["unfinished"])
                              for m in sorted(sizes)]
            for pair in out[tag, row]:
                pair["independent_of"] = base
    return out


def _single_stop(pair):
    """The independent side's last column: epochs (best) and what stopped it, or how far an unfinished run got."""
    if pair["single_seeds"]:
        return f"{pair['single_epochs']:.0f} ({pair['single_best_epoch']:.0f}), {pair['single_stopped_by']}"
    return "; ".join(f"**unfinished** (seed {u['seed']}): {u['epochs']} epochs, best valid N@10 {u['best_valid']:.4f} "
                     f"at epoch {u['best_epoch']}" for u in pair["single_unfinished"])


def nested_markdown(pairs, png_name):
    """The nested-vs-independent section: one table per (tag, row), then the plot."""
    lines = ["## Nested sizes against independently trained ones", "",
             "Each size m: the nested model's size-m result (the first m dims of one trained model, its checkpoint "
             "chosen on the largest size's validation NDCG@10 unless the row's fmrl_select_on says otherwise) beside a model "
             "trained alone at hidden_size = m "
             "(`<row>-single-<m>`: fmrl_sizes = [m], every other setting the row's, its own early stopping). "
             "*ratio* = nested / independent (Matryoshka bar: 1.0). Test split unless marked *valid*; means over "
             "seeds (± sample std). An independent run still training has no test result yet; its best validation "
             "NDCG@10 so far can only rise, so *≤ r (so far)* bounds the final validation ratio from above.", ""]
    head = ["size m", "seeds (nested / indep.)", "N@10 nested", "N@10 indep.", "ratio", "R@10 nested", "R@10 indep.",
            "ratio", "valid N@10 ratio", "params nested / indep.", "indep. epochs (best), stop"]
    for (tag, row), pairs_ in pairs.items():
        lines += [f"### {row} ({tag})", ""]
        if pairs_ and pairs_[0]["independent_of"] != row:
            lines += [f"Independent side: `{pairs_[0]['independent_of']}-single-<m>` (the lever changes the nested "
                      "training only).", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in pairs_:
            def ratio(key, p=p):
                return "" if p[key] is None else f"{p[key]:.2f}"

            cells = [p["size"], f"{p['nested_seeds']} / {p['single_seeds']}",
                     fmt_metric(p["test_ndcg@10_nested"], p["test_ndcg@10_nested_std"]),
                     fmt_metric(p["test_ndcg@10_single"], p["test_ndcg@10_single_std"]), ratio("test_ndcg@10_ratio"),
                     fmt_metric(p["test_recall@10_nested"], p["test_recall@10_nested_std"]),
                     fmt_metric(p["test_recall@10_single"], p["test_recall@10_single_std"]),
                     ratio("test_recall@10_ratio"),
                     ratio("valid_ndcg@10_ratio") or (p["valid_ndcg@10_ratio_bound"] is not None
                                                      and f"≤ {p['valid_ndcg@10_ratio_bound']:.2f} (so far)") or "",
                     f"{fmt_params(p['nested_params'])} / {fmt_params(p['single_params'])}", _single_stop(p)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return lines + [f"![nested vs independent]({png_name})", ""]


def plot_nested(path, dataset, pairs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (tag, row), pairs_ in pairs.items():
        for ax, k in zip(axes, PAIR_METRICS):
            for side, style in (("nested", "-o"), ("single", "--s")):
                if side == "single" and pairs_ and pairs_[0]["independent_of"] != row:
                    continue  # a lever row's independent models are its base row's: plotted once
                points = [(p["size"], p[f"test_{k}_{side}"]) for p in pairs_ if p[f"test_{k}_{side}"] is not None]
                if points:
                    ax.plot(*zip(*points), style, label=f"{'nested' if side == 'nested' else 'independent'} ({row}, {tag})")
    for ax, k in zip(axes, PAIR_METRICS):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("size m")
        ax.set_ylabel(f"test {SHORT[k]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: nested size-m model vs a size-m model trained alone")
    fig.tight_layout()
    with atomic_write.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_nested(dataset, results_dir, runs, settings=None):
    """results/<dataset>-nested-vs-independent.{md,csv,png}; returns (paths, section lines)."""
    pairs = nested_vs_independent(runs, settings)
    if not pairs:
        return [], []
    stem = Path(results_dir) / f"{dataset}-nested-vs-independent"
    md, csv_path, png = stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png")
    section = nested_markdown(pairs, png.name)
    write_csv(csv_path, [OrderedDict(tag=tag, row=row, **{**p, "single_unfinished": json.dumps(p["single_unfinished"])
                                                         if p["single_unfinished"] else None})
                         for (tag, row), ps in pairs.items() for p in ps])
    plot_nested(png, dataset, pairs)
    atomic_write.write_text(md, "\n".join([f"# {dataset}: nested against independent sizes", "",
                              f"Written by `benchmarks/bench_report.py` from `results/{dataset}/runs/`.", ""]
                             + section[2:]))
    return [md, csv_path, png], section


def write_csv(path, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_write.atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


def environments(runs):
    seen = OrderedDict()
    for tag, rows in runs.items():
        for entry in rows.values():
            for r in entry["runs"]:
                env = r["env"]
                key = (tag, env.get("cpu"), env.get("gpu"), env.get("torch"), env.get("recbole"))
                seen.setdefault(key, {"tag": tag, **env, "commits": set(), "load": []})
                seen[key]["commits"].add(env.get("git_commit", "") + ("+dirty" if env.get("git_dirty") else ""))
                seen[key]["load"] += [r["loadavg_start"][0], r["loadavg_end"][0]]
    return list(seen.values())


def plot_curves(path, dataset, runs):
    """Validation NDCG@10 per epoch of every finished row (one line per seed); False when there is none."""
    curves = [(tag, row, r["valid_curve"], r.get("status") == "unfinished" or not converged(r))
              for tag, rows in runs.items() for row, entry in rows.items() if not SINGLE_ROW.match(row)
              for r in entry["runs"] + entry.get("not_converged", []) + entry.get("unfinished", [])
              if r.get("valid_curve")]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted({tag for tag, _, _, _ in curves})
    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4.2), squeeze=False)
    colours = {}
    for tag, row, curve, unfinished in curves:
        ax = axes[0][tags.index(tag)]
        colour = colours.setdefault(row, plt.get_cmap("tab20")(len(colours) % 20))
        label = row + (" (unfinished / not converged)" if unfinished else "")
        labelled = any(line.get_label() == label for line in ax.get_lines())
        ax.plot(range(1, len(curve) + 1), curve, "--" if unfinished else "-", color=colour, lw=1.2,
                label=None if labelled else label)
        best = max(range(len(curve)), key=curve.__getitem__)
        ax.plot(best + 1, curve[best], "o", color=colour, ms=4)
    for tag, ax in zip(tags, axes[0]):
        ax.set_title(f"{dataset} ({tag}): validation NDCG@10 per epoch (dot: best, test taken there)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def intro_lines(dataset, settings, runs):
    """Title, description, the protocol every row shares, and the commands that produced the rows."""
    ds = settings["dataset"]
    lines = [f"# {ds.get('title', dataset)}: side-by-side benchmark", ""]
    if ds.get("description"):
        lines += [ds["description"].strip(), ""]
    lines += [
        "Protocol (every row): leave-one-out split by time (last item test, second-to-last validation), "
        "full ranking over all items, history items **not** masked, Recall and NDCG at 5/10 (20/50 in the CSV), "
        "window 50, full-softmax cross-entropy, early stopping on validation NDCG@10 (patience 10), test at the "
        "best validation checkpoint. Metrics are means over seeds ± sample standard deviation (one seed: no ±). "
        "Settings: `properties/benchmark/` (rows.yaml, common.yaml, "
        f"{Path(settings['dataset_file']).name if settings.get('dataset_file') else 'no dataset file'}) over each "
        "model's own YAML. *train s/epoch* is the wall time of one training epoch and, in brackets, the CPU time "
        "the run's process spent on it (one thread: independent of other jobs on a shared machine); *valid s* is "
        "one validation pass; *wall* is one seed's "
        "whole run (data loading, training, validation, test); *peak RSS* is the run's own process "
        "(one subprocess per seed).", ""]
    # --work-dir only says where logs and checkpoints went (often a path of the machine that ran it)
    commands = sorted({re.sub(r"\s--work-dir\s+\S+", "", r["command"]) for rows in runs.values() for e in rows.values()
                       for r in e["runs"] + e.get("not_converged", []) + e.get("unfinished", [])})
    if commands:
        lines += ["Commands that produced these rows (run from the repository root; `--work-dir`, where logs and "
                  "checkpoints went, left out):", "", "```bash"]
        lines += commands + ["```", ""]
    return lines


def row_cells(r):
    """One results-table row: metrics and costs of a converged row, else its status and the reason."""
    paper = [f"{r['paper_ndcg@10']:.4f}" if r["paper_ndcg@10"] is not None else "",
             f"{r['paper_recall@10']:.4f}" if r["paper_recall@10"] is not None else ""]
    if r["status"] != "ok":
        return [r["group"], f"{r['row']}", "", "", "", "", "", "", *paper, "", "", "", "", "", "",
                f"**{r['status']}**: {r['reason']}"]
    # converged rows only: a budget that ended one struck after patience had run out
    note = stop_note(r["stopped_by"])
    if r.get("unfinished"):
        note.append(r["unfinished"])
    return [r["group"], r["row"], r["settings"], str(r["n_seeds"]),
            *[fmt_metric(r[f"test_{m}"], r[f"test_{m}_std"]) for m in TABLE_METRICS], *paper,
            fmt_params(r["params"]), f"{r['epochs']:.0f} ({r['best_epoch']:.0f})",
            f"{r['train_epoch_s']:.1f}" + (f" ({r['train_epoch_cpu_s']:.1f})" if r.get("train_epoch_cpu_s") else ""),
            f"{r['valid_epoch_s']:.1f}", fmt_seconds(r["wall_s"]),
            f"{r['peak_rss_mb'] / 1024:.2f} GB" + (f", GPU {r['peak_gpu_mb'] / 1024:.2f} GB" if r.get("peak_gpu_mb") else ""),
            "; ".join(note)]


def sizes_lines(tag, series_entry, sizes_png):
    """The per-size table of one nested model (paper Figure 3) and its plot."""
    row, n, data = series_entry
    lines = [f"### Every size from one training ({row}, {tag}; paper Figure 3)", "",
             f"One FMRLRec model ({n} seed{'s' if n > 1 else ''}), best checkpoint chosen on the largest size's "
             "validation NDCG@10; each size m uses the first m dims of every layer. Test metrics.", "",
             "| size m | params | N@5 | R@5 | N@10 | R@10 | N@20 | R@20 | R@50 |", "|---|---|---|---|---|---|---|---|---|"]
    for size, params, m in data:
        lines.append(f"| {size} | {fmt_params(params)} | " + " | ".join(
            fmt_metric(m[f"test_{k}"], m[f"test_{k}_std"]) for k in
            ("ndcg@5", "recall@5", "ndcg@10", "recall@10", "ndcg@20", "recall@20", "recall@50")) + " |")
    return lines + ["", f"![per-size results]({sizes_png.name})", ""]


def environment_lines(runs):
    envs = environments(runs)
    if not envs:
        return []
    lines = ["## Environment", ""]
    for env in envs:
        load = env["load"]
        lines.append(
            f"- **{env['tag']}**: {env.get('gpu') or env.get('cpu')} ({env.get('cpu_count')} CPUs, "
            f"{env.get('memory_gb')} GB RAM, torch threads {env.get('torch_threads')}"
            + (f", CPU {env.get('cpu')}" if env.get("gpu") else "") + f"); {env.get('os')}; Python "
            f"{env.get('python')}, torch {env.get('torch')}, RecBole {env.get('recbole')}, numpy {env.get('numpy')}; "
            f"recbole_fmrl commit {', '.join(sorted(env['commits']))}; 1-min load average during the runs "
            f"{min(load):.1f}-{max(load):.1f}.")
    return lines + [""]


def markdown(dataset, settings, runs, table, series, sizes_png, nested_section=(), curves_png=None):
    lines = intro_lines(dataset, settings, runs)
    head = ["group", "row", "settings", "seeds", *[SHORT[m] for m in TABLE_METRICS], "paper N@10", "paper R@10",
            "params", "epochs (best)", "train s/epoch: wall (CPU)", "valid s", "wall / seed", "peak RSS", "note"]
    for tag in (list(runs) or ["cpu"]):
        lines += [f"## Results ({tag})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row_cells(r)) + " |" for r in table if r["tag"] == tag]
        lines.append("")
        if tag in series:
            lines += sizes_lines(tag, series[tag], sizes_png)
    if curves_png is not None:
        lines += ["### Validation curves", "", "Every row's validation NDCG@10 per epoch, one line per seed (the dot is "
                  "the epoch whose checkpoint was tested; dashed: a run still unfinished, or one a budget ended before early "
                  "stopping: no result).", "",
                  f"![validation curves]({curves_png.name})", ""]
    lines += list(nested_section)
    notes = settings["dataset"].get("notes") or []
    lines += [f"- {note.strip()}" for note in notes] + ([""] if notes else [])
    return "\n".join(lines + environment_lines(runs))


def write_report(dataset, results_dir, settings):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    runs, table = summaries(dataset, results_dir, settings)
    series = size_series(runs, settings)
    md_path, csv_path = results_dir / f"{dataset}.md", results_dir / f"{dataset}.csv"
    sizes_csv, sizes_png = results_dir / f"{dataset}-sizes.csv", results_dir / f"{dataset}-sizes.png"
    write_csv(csv_path, table)
    written = [md_path, csv_path]
    if series:
        rows = []
        for tag, (row, n, data) in series.items():
            for size, params, metrics in data:
                rows.append(OrderedDict(tag=tag, row=row, seeds=n, size=size, params=params, **metrics))
        write_csv(sizes_csv, rows)
        plot_sizes(sizes_png, dataset, series)
        written += [sizes_csv, sizes_png]
    nested_paths, nested_section = write_nested(dataset, results_dir, runs, settings)
    curves_png = results_dir / f"{dataset}-curves.png"
    if plot_curves(curves_png, dataset, runs):
        written.append(curves_png)
    atomic_write.write_text(md_path, markdown(dataset, settings, runs, table, series, sizes_png, nested_section,
                                              curves_png if curves_png in written else None))
    return written + nested_paths
