"""Search results: one row per trial (sorted by validation score), with repeated seeds one row per configuration
(sorted by its mean), results.csv/.md, best.yaml, selected.json."""
import csv
import json
import math
import os
from pathlib import Path

import yaml

from recbole_fmrl.tune.space import TRIAL_KEYS, plain, searched_keys, trial_config_dict
from recbole_fmrl.tune.trial import SCORE


def _trial_params(result, job, saved_config=None):
    """The sampled values of a trial (also for trials that failed before their first report)."""
    params = result.config or saved_config
    if params is None and result.path and os.path.isfile(os.path.join(result.path, "params.json")):
        with open(os.path.join(result.path, "params.json")) as f:
            params = json.load(f)
    params = plain(params or {})
    return {k: params[k] for k in searched_keys(job) if k in params}


def read_best_weights(checkpoint):
    """best.pth of a trial's last Ray checkpoint (local folder or cloud storage), or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / "best.pth"
        return path.read_bytes() if path.is_file() else None


def _trial_states(grid):
    """Trial folder -> (status, sampled config) as saved in the experiment's state file.

    The saved state tells an interrupted trial (PENDING / RUNNING / PAUSED) from a finished one,
    which the ResultGrid does not; it also holds the config of trials that never started.
    """
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(getattr(grid, "_local_path", None) or grid.experiment_path).trials
    except Exception:  # noqa: BLE001 - fall back to what the ResultGrid holds
        trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return {os.path.basename(str(t.local_path)): (t.status, t.config) for t in trials}


def result_rows(grid, job: dict, metric: str, mode: str) -> list:
    rows = []
    states = _trial_states(grid)
    for result in grid:
        m = result.metrics or {}
        m = m if SCORE in m else {}  # a trial that never reported has only its trial_id here
        saved_status, saved_config = states.get(os.path.basename(result.path or ""), ("TERMINATED", None))
        params = _trial_params(result, job, saved_config)
        derived = {k: v for k, v in trial_config_dict(job, params).items() if k in job["derived"]} if params else {}
        error = "" if result.error is None else (str(result.error).strip().splitlines() or [""])[-1][:300]
        status = "ERROR" if error else saved_status
        end = m.get("finished") or ("error" if error else "unfinished" if status != "TERMINATED" else
                                    "stopped by scheduler" if m else "no report")
        row = {"trial_id": os.path.basename(result.path or "").replace("trial_", "") or (result.metrics or {}).get("trial_id", ""),
               "status": status, "end": end, **params, **derived,
               SCORE: m.get(SCORE, float("nan")), "best_epoch": m.get("best_epoch", ""),
               "epochs": (m.get("epoch", -1) + 1) if m else 0, "evaluations": m.get("training_iteration", 0),
               **{k[len("best/"):]: v for k, v in m.items() if k.startswith("best/")},
               "time_s": f"{m.get('time_total_s', 0.0):.1f}", "error": error, "trial_dir": result.path,
               "_params": params, "_checkpoint": result.checkpoint}
        rows.append(row)
    sign = -1 if mode == "max" else 1

    def order(row):
        score = row[SCORE]
        ok = isinstance(score, (int, float)) and math.isfinite(score)
        return (0 if ok else 1, sign * score if ok else 0, row["trial_id"])

    rows.sort(key=order)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def config_groups(rows: list, job: dict, mode: str = "max") -> list:
    """With repeated seeds: one entry per configuration (its trials over the seeds), best mean validation score
    first; ``complete`` when every seed's trial finished with a score (only those can be selected). ``rows``
    come sorted by ``result_rows``, so each group's order and the sort of equal means are deterministic."""
    groups = {}
    for row in rows:
        params = {k: v for k, v in row["_params"].items() if k != "seed"}
        groups.setdefault(json.dumps(params, sort_keys=True, default=str), {"params": params, "rows": []})["rows"].append(row)
    out = []
    for group in groups.values():
        group["rows"].sort(key=lambda r: (r.get("seed") is None, r.get("seed")))
        scores = [r[SCORE] for r in group["rows"] if r["status"] == "TERMINATED" and _finite(r[SCORE])]
        group["complete"] = len(scores) == len(job["seeds"]) and all(r.get("_checkpoint") for r in group["rows"])
        group["n"] = len(scores)
        group["mean"], group["std"] = mean_std(scores)
        out.append(group)
    sign = -1 if mode == "max" else 1
    out.sort(key=lambda g: (not g["complete"], not _finite(g["mean"]), sign * g["mean"] if _finite(g["mean"]) else 0))
    return out


def mean_std(values):
    """Mean and sample standard deviation (nan where undefined: no value, or one)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    return mean, (sum((x - mean) ** 2 for x in values) / (n - 1)) ** 0.5 if n > 1 else float("nan")


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_config(job: dict, params: dict) -> dict:
    """The selected configuration as one flat dict (trial-only keys left out)."""
    cfg = trial_config_dict(job, params)
    for key in TRIAL_KEYS:
        cfg.pop(key, None)
    return {"model": job["model"], "dataset": job["dataset"], **plain(cfg)}


def _fmt(value):
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _fmt_mean_std(mean, std):
    return _fmt(mean) + (f" ± {_fmt(std)}" if _finite(std) else "")


def _group_lines(groups, job, metric):
    cols = list(job["space"]) + list(job["derived"])
    lines = [f"Configurations, sorted by their mean validation {metric} over the seeds (mean ± sample std; only a "
             "configuration whose every seed finished can be selected):", "",
             "| rank | " + " | ".join(cols) + f" | valid {metric} | seeds finished | trials |",
             "|" + "---|" * (len(cols) + 4)]
    for i, g in enumerate(groups, 1):
        derived = {k: g["rows"][0].get(k, "") for k in job["derived"]}
        cells = [g["params"].get(k, derived.get(k, "")) for k in cols]
        lines.append(f"| {i} | " + " | ".join(_fmt(c) for c in cells) + f" | {_fmt_mean_std(g['mean'], g['std'])} | "
                     f"{g['n']} of {len(job['seeds'])} | {' '.join(r['trial_id'] for r in g['rows'])} |")
    return lines + [""]


def _trial_lines(rows, param_cols, metric, md_metrics):
    md_cols = ["rank", "trial_id", "end"] + param_cols + [f"valid {metric}", "best epoch", "epochs"] + \
              [f"valid {k}" for k in md_metrics] + ["time (s)"]
    lines = ["Trials, sorted by validation score (test metrics are never used to select):", "",
             "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    for row in rows:
        cells = [row["rank"], row["trial_id"], row["end"] if row["status"] != "ERROR" else f"error: {row['error'][:80]}"]
        cells += [row.get(k, "") for k in param_cols]
        cells += [row[SCORE], row["best_epoch"], row["epochs"]] + [row.get(k, "") for k in md_metrics] + [row["time_s"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return lines


def _selected_lines(selected, param_cols, best_yaml, metric, cutoff):
    lines = ["", f"## Selected: trial {selected['trial_id']}", "",
             "Values: " + ", ".join(f"`{k}={selected['config'].get(k)}`" for k in param_cols), "",
             f"Configuration: `{best_yaml}`", ""]
    if "test" not in selected:
        return lines
    keys = [k for k in selected["test"] if cutoff is None or k.endswith(f"@{cutoff}")] or list(selected["test"])
    seeds = selected.get("seeds")

    def cells(split, entry=selected):
        return " | ".join(_fmt_mean_std(entry[split][k], entry.get(f"{split}_std", {}).get(k)) if seeds and entry is selected
                          else _fmt(entry[split][k]) for k in keys)
    what = f"each seed's best checkpoint ({len(seeds)}: mean ± sample std)" if seeds else "best checkpoint"
    lines += [f"{what[0].upper()}{what[1:]}, evaluated once after the search (largest size):", "",
              "| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
              f"| valid | {cells('valid')} |", f"| test | {cells('test')} |"]
    for run in selected.get("per_seed") or []:
        lines.append(f"| test, seed {run['seed']} | {cells('test', run)} |")
    if selected.get("size_results"):
        lines += ["", f"Per size (one model{'; mean over the seeds' if seeds else ''}), {metric}:", "",
                  "| size | params | valid | test |", "|---|---|---|---|"]
        for size, r in selected["size_results"].items():
            lines.append(f"| {size} | {r['params']:,} | {_fmt_mean_std(r['valid'][metric], r.get('valid_std', {}).get(metric))} "
                         f"| {_fmt_mean_std(r['test'][metric], r.get('test_std', {}).get(metric))} |")
    return lines


def write_outputs(exp_dir, job: dict, rows: list, selected, metric: str, mode: str, search_seconds: float,
                  total_seconds: float) -> dict:
    exp_dir = Path(exp_dir)
    param_cols = searched_keys(job) + list(job["derived"])
    metric_cols = sorted({k for r in rows for k in r if "@" in k and not k.startswith("_")},
                         key=lambda k: (k != metric, k.split("@")[0], int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0))
    head = ["rank", "trial_id", "status", "end"] + param_cols + [SCORE, "best_epoch", "epochs"]
    csv_cols = head + metric_cols + ["time_s", "error", "trial_dir"]
    with open(exp_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in csv_cols})
    cutoff = metric.split("@")[1] if "@" in metric else None
    md_metrics = [k for k in metric_cols if k != metric and (cutoff is None or k.endswith(f"@{cutoff}"))][:3]
    lines = [f"# Tune: {job['model']} on {job['dataset']} ({Path(job['space_file']).name})", "",
             f"- search: {job['search']}, scheduler: {job['scheduler']}, trials: {len(rows)} "
             f"({sum(r['status'] == 'ERROR' for r in rows)} failed, "
             f"{sum(r['status'] not in ('ERROR', 'TERMINATED') for r in rows)} unfinished), "
             f"selection: best validation {metric} ({mode})"
             + (f", mean over seeds {', '.join(map(str, job['seeds']))}" if job.get("seeds") else ""),
             f"- wall time: search {search_seconds:.0f} s, with the selected test evaluation {total_seconds:.0f} s",
             f"- resources per trial: {job['resources']['cpu']:g} CPU, {job['resources']['gpu']:g} GPU"
             + (f"; pinned: {', '.join(job['pinned'])}" if job["pinned"] else ""), ""]
    if job.get("seeds"):
        lines += _group_lines(config_groups(rows, job, mode), job, metric)
    lines += _trial_lines(rows, param_cols, metric, md_metrics)
    if selected:
        best_yaml = exp_dir / "best.yaml"
        header = (f"# Selected by validation {metric} = {selected['reported_valid_score']:.4f} "
                  + (f"(mean over seeds {selected['seeds']}; " if selected.get("seeds") else "(")
                  + f"trial {selected['trial_id']}, best epoch {selected['best_epoch']}) in {exp_dir}.\n"
                  f"# Rerun: python run_recbole_fmrl.py --model {job['model']} --dataset {job['dataset']} "
                  f"--config_files {best_yaml}\n")
        best_yaml.write_text(header + yaml.safe_dump(selected["config"], sort_keys=False, default_flow_style=False))
        (exp_dir / "selected.json").write_text(json.dumps(selected, indent=1))
        lines += _selected_lines(selected, [k for k in param_cols if k != "seed"], best_yaml, metric, cutoff)
    (exp_dir / "results.md").write_text("\n".join(lines) + "\n")
    return {"experiment_dir": str(exp_dir), "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
            "selected": selected, "metric": metric, "mode": mode, "search_seconds": search_seconds,
            "total_seconds": total_seconds, "results_csv": str(exp_dir / "results.csv"),
            "results_md": str(exp_dir / "results.md"),
            "best_yaml": str(exp_dir / "best.yaml") if selected else None}
