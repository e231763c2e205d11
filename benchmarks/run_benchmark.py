#!/usr/bin/env python
"""Side-by-side benchmark: RecBole baselines, FMLPRec, LRURec and FMRLRec variants on one dataset.

One command per dataset trains the chosen rows on the same atomic files, split (leave-one-out by
time) and metrics (Recall/NDCG@5,10,20,50, full ranking, history not masked), each stopped early on
validation NDCG@10 and tested at its best checkpoint, then writes ``results/<dataset>.md`` and CSVs
(and the Figure 3 per-size plot from one FMRLRec training).

    python -m benchmarks.run_benchmark --dataset ml-100k-posters --data-path data
    python -m benchmarks.run_benchmark --dataset amazon-beauty --data-path data \\
        --models FMRLRec-text,LRURec,SASRec --max-epochs 30 --seeds 1
    python -m benchmarks.run_benchmark --dataset amazon-beauty --data-path data --device cuda --seeds 3

Resuming: every finished (row, seed) writes one JSON (atomically) under
``results/<dataset>/runs/<tag>/<row>/seed-<seed>.json``; a rerun skips those whose settings key
(the resolved config, epoch cap and time budget) is unchanged, so an interrupted benchmark continues
where it stopped. ``--tag`` (default: the device type) keeps CPU and GPU runs side by side in one
table. Each (row, seed) runs in its own subprocess (``--isolation subprocess``) so that its peak RSS
is its own and a crash does not take the benchmark down.

Row definitions: ``properties/benchmark/rows.yaml``; protocol: ``properties/benchmark/common.yaml``;
per-dataset settings, paper numbers and reasons a row cannot run: ``properties/benchmark/<dataset>.yaml``.
"""
import argparse
import copy
import datetime
import fnmatch
import hashlib
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROPS = ROOT / "properties" / "benchmark"

SCHEMA = 1
# Keys that change nothing about the result: left out of the resume key.
KEY_IGNORE = {"show_progress", "state", "fmrl_output_dir", "checkpoint_dir", "fmrl_cache_dir", "eval_batch_size", "worker"}
MODEL_GROUPS = {
    "recbole": ["SASRec", "BERT4Rec", "GRU4Rec", "LightSANs", "FEARec"],
    "baselines": ["SASRec", "SASRec-allpos", "SASRec-allpos-2blk", "BERT4Rec", "GRU4Rec", "LightSANs", "FEARec", "FMLPRec", "LRURec",
                  "BSARec", "UniSRec"],
    "fmrlrec": ["FMRLRec-text_image", "FMRLRec-text", "FMRLRec-text_id", "FMRLRec-text_id-drop0.5", "FMRLRec-image", "FMRLRec-id"],
}
SINGLE = "-single-"  # generated rows <row>-single-<m>: one single-size model per nested size of <row>


def nested_sizes(model, config):
    """The nested sizes a row trains: ``fmrl_sizes``, else powers of two 8..d (d from the row or the model YAML)."""
    from recbole_fmrl.model.nested import default_sizes
    from recbole_fmrl.paths import properties_dir

    hidden = config.get("hidden_size")
    if hidden is None:
        model_yaml = properties_dir() / "model" / f"{model}.yaml"
        hidden = (read_yaml(model_yaml) if model_yaml.is_file() else {}).get("hidden_size", 64)
    return [int(m) for m in (config.get("fmrl_sizes") or default_sizes(int(hidden)))]


def single_size_rows(settings, device_type, overrides_for=lambda row: ()):
    """``<row>-single-<m>`` for every row with ``single_sizes: true``: the row's settings at hidden_size=m, sizes [m].

    Nested against independent (issue 11): each trains a plain size-m model with otherwise the same settings,
    to put beside the nested model's size-m result. Chosen only by ``--models`` items that say ``single``.
    """
    generated = {}
    for row, spec in settings["rows"].items():
        if not spec.get("single_sizes") or spec.get("single_of"):
            continue
        _, config = row_config(settings, row, device_type, overrides_for(row))
        for m in nested_sizes(spec["model"], config):
            generated[f"{row}{SINGLE}{m}"] = {**spec, "single_of": row, "single_size": m, "single_sizes": False,
                                             "sizes_plot": False, "group": "independent sizes",
                                             "paper_name": f"{row}, one size-{m} model"}
    return generated


# ----------------------------------------------------------------------------------------- settings

def read_yaml(path):
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def load_settings(dataset, props=PROPS):
    """rows.yaml + common.yaml + the dataset's YAML (optional) as one dict."""
    rows = read_yaml(props / "rows.yaml")["rows"]
    common = read_yaml(props / "common.yaml").get("config", {})
    path = props / f"{dataset}.yaml"
    ds = read_yaml(path) if path.is_file() else {}
    return {"rows": rows, "common": common, "dataset": ds, "dataset_file": str(path) if path.is_file() else None}


def _matching(mapping, row):
    """Values of ``mapping`` whose key (an fnmatch pattern) matches ``row``, in file order."""
    return [value for pattern, value in (mapping or {}).items() if fnmatch.fnmatchcase(row, pattern)]


def parse_value(text):
    """``--set`` values are YAML: 3 -> int, 1e-3 -> float, [8,16] -> list, abc -> str."""
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def resolve_rows(spec, known):
    """--models: comma list of row names, fnmatch patterns or groups (recbole, baselines, fmrlrec, all, single)."""
    chosen = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        # generated single-size rows only when asked for: by name, a pattern saying "single", or the group
        pool = [r for r in known if SINGLE not in r or "single" in item]
        names = ([r for r in pool if SINGLE in r] if item == "single" else pool if item == "all" else
                 MODEL_GROUPS.get(item) or [r for r in pool if fnmatch.fnmatchcase(r, item)])
        if not names:
            raise SystemExit(f"--models: {item!r} matches no row; rows: {', '.join(known)}; groups: all, single, "
                             f"{', '.join(MODEL_GROUPS)}")
        chosen += [n for n in names if n not in chosen]
    return chosen


def row_config(settings, row, device_type, overrides=(), max_epochs=None):
    """The model name and the merged RecBole config_dict of one row."""
    spec = settings["rows"][row]
    ds = settings["dataset"]
    base = spec.get("single_of", row)  # a single-size row takes its nested row's settings
    config = copy.deepcopy(settings["common"])
    layers = [spec.get("config") or {}, ds.get("config") or {}, *_matching(ds.get("rows"), base),
              *_matching((ds.get("devices") or {}).get(device_type), base), spec.get("override") or {}]
    for layer in layers:
        config.update(copy.deepcopy(layer))
    if max_epochs is not None:
        config["epochs"] = int(max_epochs)
    for key, value in overrides:
        config[key] = value
    if spec.get("single_size"):  # last: a --set hidden_size=... resizes the nested row, not its size-m twin
        config.update(hidden_size=spec["single_size"], fmrl_sizes=[spec["single_size"]], fmrl_size_weights=None)
    return spec["model"], config


def settings_key(model, dataset, config, extra):
    """Hash of everything that changes a run's result (not its output folders)."""
    payload = {"model": model, "dataset": dataset, "schema": SCHEMA,
               "config": {k: v for k, v in config.items() if k not in KEY_IGNORE}, **extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data_path, dataset):
    """sha256 of the dataset's content: the name and sha256 of every file dataset_tools' meta.json lists (not
    its timings or input paths, so converting the same data again keeps finished rows), else features.json and
    the atomic files' sizes. Changed content makes finished rows stale."""
    folder = Path(data_path) / dataset
    digest = hashlib.sha256()
    files = _manifest_files(folder / "meta.json")
    if files is not None:
        for name, entry in sorted(files.items()):
            digest.update(f"{name}\0{entry.get('file')}\0{entry.get('sha256')}\n".encode())
    else:
        for path in sorted(folder.glob(f"{dataset}.*")):
            digest.update(path.name.encode() + b"\0")
            digest.update(path.read_bytes() if path.name.endswith("features.json") else str(path.stat().st_size).encode())
    return digest.hexdigest()[:16]


def _manifest_files(meta):
    """meta.json's {name: {file, bytes, sha256}} map, or None without a readable manifest."""
    try:
        files = json.loads(meta.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) and files else None


FEATURE_MODELS = {"FMRLRec": "auto", "UniSRec": "text_id"}  # models reading feature files -> their YAML's fmrl_modality


def unavailable_reason(settings, row, model, config, data_path, dataset):
    """Why a row cannot run on this dataset (None when it can)."""
    explicit = _matching(settings["dataset"].get("unavailable"), settings["rows"][row].get("single_of", row))
    if explicit:
        return explicit[0]
    if model not in FEATURE_MODELS:
        return None
    from recbole_fmrl.data import features as feature_files
    from recbole_fmrl.data.modality import modality_parts

    modality = config.get("fmrl_modality") or FEATURE_MODELS[model]
    if modality == "auto":
        return None  # the dataset picks whatever features exist
    folder = Path(config.get("fmrl_feature_path") or Path(data_path) / dataset)
    found = feature_files.available_modalities(folder, dataset)
    for part in modality_parts(modality):
        if part not in found and not (part == "text" and (Path(data_path) / dataset / f"{dataset}.item").is_file()):
            return f"no {part} features for {dataset} in {folder}"
    return None


# ------------------------------------------------------------------------------------- environment

def environment(device="cpu"):
    """Library versions and hardware of this process (stored with every result)."""
    import numpy
    import recbole
    import torch

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - no git is fine
            return ""

    from recbole_fmrl.environment import cpu_name

    cpu = cpu_name()
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "recbole": recbole.__version__,
        "numpy": numpy.__version__, "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "host": socket.gethostname(), "os": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "device": device, "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        env["cuda"] = torch.version.cuda
    return env


def atomic_write_json(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ worker

def execute(job):
    """Train one (row, seed) through the shared driver, test the best checkpoint; return the result dict."""
    import torch

    from dataset_tools.item_features import build_missing_item_features
    from recbole_fmrl.train.driver import StopTraining, fit_and_evaluate, prepare

    torch.set_num_threads(job["threads"])
    started, wall0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    load0 = os.getloadavg()
    cfg = dict(job["config"], seed=job["seed"], fmrl_output_dir=job["output_dir"],
               checkpoint_dir=str(Path(job["output_dir"]) / "saved"), fmrl_valid_every_size=not job.get("fast_valid", True))
    cfg.update(use_gpu=True, gpu_id=job["device"].partition(":")[2] or "0") if job["device"].startswith("cuda") \
        else cfg.update(use_gpu=False)
    progress = Path(job["output_dir"]) / "progress.jsonl"
    config, net, trainer, data = prepare(job["model"], job["dataset"], config_dict=cfg, log=True,
                                         feature_builder=build_missing_item_features,
                                         resume=resumable(Path(job["output_dir"]), job["key"], job["model"],
                                                                job.get("data_fingerprint")))
    device = str(config["device"])
    if job["device"].startswith("cuda") and not device.startswith("cuda"):
        raise RuntimeError(f"--device {job['device']} requested but RecBole chose {device} (no CUDA?)")
    setup_seconds, budget = time.perf_counter() - wall0, job.get("max_train_seconds")
    fit_start, earlier = time.perf_counter(), read_progress(progress)
    spent_before = sum(r["train_seconds"] + r["valid_seconds"] for r in earlier)  # by earlier, interrupted invocations
    cpu_before = sum(r["train_cpu_seconds"] + r["valid_cpu_seconds"] for r in earlier)
    resumed_at = trainer.start_epoch

    def after_validation(record):  # the epoch's record is kept (a resumed row reports every epoch), then the budget
        with open(progress, "a") as handle:
            handle.write(json.dumps({k: record[k] for k in PROGRESS_KEYS}) + "\n")
        atomic_write_json(unfinished_path(job), unfinished_record(job, read_progress(progress)))
        per_epoch = (time.perf_counter() - fit_start) / (record["epoch"] + 1 - trainer.start_epoch)
        if budget and not record["finished"] and spent_before + time.perf_counter() - fit_start + per_epoch > budget:
            raise StopTraining("time budget")

    result = fit_and_evaluate(config, net, trainer, data, saved=True, on_evaluation=after_validation)
    unfinished_path(job).unlink(missing_ok=True)
    records = read_progress(progress)
    checkpoint = trainer.saved_model_file
    last = Path(checkpoint).with_name(Path(checkpoint).name[: -len(".pth")] + ".last.pth")
    last.unlink(missing_ok=True)  # the row is finished: nothing left to resume
    if not job.get("keep_checkpoints") and checkpoint and os.path.exists(checkpoint):
        os.remove(checkpoint)
        checkpoint = None
    sizes = result["size_results"]
    final = {k: v for k, v in config.final_config_dict.items()
             if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    return {
        "schema": SCHEMA, "status": "ok", "row": job["row"], "model": job["model"], "dataset": job["dataset"],
        "seed": job["seed"], "tag": job["tag"], "key": job["key"], "data_fingerprint": job.get("data_fingerprint"),
        "command": job["command"],
        "config": job["config"], "resolved": {k: final.get(k) for k in sorted(final) if k in RESOLVED_KEYS},
        "valid": dict(result["best_valid_result"]), "test": dict(result["test_result"]),
        "size_results": None if sizes is None else {str(m): {"params": r["params"], "valid": dict(r["valid"]),
                                                             "test": dict(r["test"])} for m, r in sizes.items()},
        "params": result["params"], "epochs": len(records), "best_epoch": result["best_epoch"] + 1,
        "valid_curve": [round(r["valid_score"], 6) for r in records], "stopped_by": result["stopped_by"],
        "max_epochs": config["epochs"], "max_train_seconds": budget, "train_samples": len(data[0]._dataset),
        "setup_seconds": setup_seconds, "train_seconds": spent_before + result["train_seconds"],
        # a resumed row counts its earlier invocations' epochs too (their set-up and exit are not kept)
        **epoch_times(records), "cpu_seconds": cpu_before + time.process_time(), "resumed_at_epoch": resumed_at or None,
        "wall_seconds": spent_before + time.perf_counter() - wall0, "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
        "started": started, "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "env": environment(device),
        "checkpoint": checkpoint, "isolated": job.get("isolated", False),
    }


def unfinished_path(job):
    return Path(job["result_path"]).with_suffix(".progress.json")


def unfinished_record(job, records):
    """What the report shows of a row still training or interrupted: its validation curve so far."""
    curve = [r["valid_score"] for r in records]
    best = max(range(len(curve)), key=curve.__getitem__)
    return {"schema": SCHEMA, "status": "unfinished", "row": job["row"], "model": job["model"], "seed": job["seed"],
            "key": job["key"], "data_fingerprint": job.get("data_fingerprint"), "command": job["command"],
            "epochs": len(curve), "best_epoch": best + 1, "best_valid": curve[best], "valid_curve": curve,
            "updated": datetime.datetime.now().isoformat(timespec="seconds")}


PROGRESS_KEYS = ("epoch", "train_loss", "train_seconds", "train_cpu_seconds", "valid_seconds", "valid_cpu_seconds",
                 "valid_score", "best_epoch", "finished")


def resumable(work_dir, key, model, data_id=None):
    """The row's checkpoint folder when an interrupted invocation with the same settings and data left a last
    checkpoint there; otherwise the folder is cleared for a fresh start (None)."""
    marker, data_marker, saved = work_dir / "settings-key.txt", work_dir / "data-fingerprint.txt", work_dir / "saved"
    same_data = data_id is None or not data_marker.is_file() or data_marker.read_text().strip() == data_id
    if marker.is_file() and marker.read_text().strip() == key and same_data and any(saved.glob(f"{model}-*.last.pth")):
        return saved
    for stale in list(saved.glob("*.pth")) + [work_dir / "progress.jsonl"]:
        stale.unlink(missing_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    if data_id:
        data_marker.write_text(data_id + "\n")
    return None


def read_progress(path):
    """Every validated epoch of the row so far, in order (one JSON object per line)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_times(records):
    """Mean wall and CPU seconds of one training epoch and one validation pass."""
    n = max(1, len(records))
    return {key + "_epoch_" + kind + "seconds": sum(r[f"{key}_{kind}seconds"] for r in records) / n
            for key in ("train", "valid") for kind in ("", "cpu_")}


RESOLVED_KEYS = {"hidden_size", "n_layers", "inner_size", "embedding_size", "num_layers", "hidden_dropout_prob",
                 "fmrl_train_negatives", "fmrl_distill_weight", "fmrl_distill_rows", "attn_dropout_prob", "dropout_prob",
                 "learning_rate", "learner", "weight_decay", "train_batch_size", "fmrl_lr_warmup_steps", "fmrl_lr_decay_epochs",
                 "fmrl_modality", "fmrl_sizes", "fmrl_train_objective", "fmrl_ring_r_min", "fmrl_ring_r_max",
                 "fmrl_ffn_ratio", "fmlp_filter", "MAX_ITEM_LIST_LENGTH", "epochs", "stopping_step", "n_heads",
                 "mask_ratio", "k_interests", "fmrl_lru_state_ratio", "device", "fmrl_feature_norm", "fmrl_size_weights",
                 "bsarec_alpha", "bsarec_c", "unisrec_n_exps", "unisrec_temperature", "fmrl_eval_mask_history"}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_main(job_path):
    """Subprocess entry: run the job file, write its result (or failure) JSON atomically."""
    job = json.loads(Path(job_path).read_text())
    job["isolated"] = True
    try:
        result = execute(job)
    except Exception as exc:  # noqa: BLE001 - recorded in the row's JSON
        traceback.print_exc()
        failure(job, exc)
        return 1
    atomic_write_json(job["result_path"], result)
    return 0


def failure(job, exc):
    atomic_write_json(Path(job["result_path"]).with_suffix(".failed.json"), {
        "schema": SCHEMA, "status": "failed", "row": job["row"], "model": job["model"], "dataset": job["dataset"],
        "seed": job["seed"], "tag": job["tag"], "key": job["key"], "data_fingerprint": job.get("data_fingerprint"),
        "command": job["command"],
        "error": f"{type(exc).__name__}: {exc}"[:2000], "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    })


# ---------------------------------------------------------------------------------------- orchestration

_CHILDREN = set()  # running workers (several with --jobs)
_STOPPING = threading.Event()  # set when --jobs runs are being stopped: a killed worker is not a failure


def _terminate_child(signum, frame):
    raise SystemExit(128 + signum)  # run_subprocess's ``finally`` / run_jobs stop the running workers


def _stop(child):
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_subprocess(job, log_path):
    job_path = Path(job["output_dir"]) / "job.json"
    atomic_write_json(job_path, job)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # main() set the offline defaults in os.environ
    with open(log_path, "a") as log:
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.run_benchmark", "--worker", str(job_path)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        _CHILDREN.add(child)
        try:
            return child.wait()
        finally:  # also on SIGTERM / Ctrl-C: no worker outlives the benchmark
            _stop(child)
            _CHILDREN.discard(child)


def result_path(results_dir, dataset, tag, row, seed):
    return Path(results_dir) / dataset / "runs" / tag / row / f"seed-{seed}.json"


def is_done(path, key, data_id=None):
    """A finished run with the same settings key on the same data (a changed config or dataset reruns it;
    results written before the data fingerprint existed count as the same data)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    same_data = data_id is None or data.get("data_fingerprint") in (None, data_id)
    return data.get("status") == "ok" and data.get("key") == key and same_data


def run_job(job, isolation, label):
    """Train and test one (row, seed); its result JSON (or .failed.json) is written; prints one status line."""
    Path(job["output_dir"]).mkdir(parents=True, exist_ok=True)
    Path(job["result_path"]).with_suffix(".failed.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    if isolation == "subprocess":
        log_path = Path(job["output_dir"]) / "run.log"
        rc = run_subprocess(job, log_path)
        ok = rc == 0 and is_done(job["result_path"], job["key"], job["data_fingerprint"])
        if not ok and _STOPPING.is_set():
            print(f"{label}: stopped (the same command resumes it)", flush=True)
            return
        if not ok and not Path(job["result_path"]).with_suffix(".failed.json").exists():
            failure(job, RuntimeError(f"worker exited with {rc}; see {log_path}"))
    else:
        try:
            atomic_write_json(job["result_path"], execute(job))
            ok = True
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            failure(job, exc)
            ok = False
    status = "ok" if ok else "FAILED"
    extra = ""
    if ok:
        res = json.loads(Path(job["result_path"]).read_text())
        extra = (f" test N@10 {res['test'].get('ndcg@10', float('nan')):.4f} "
                 f"R@10 {res['test'].get('recall@10', float('nan')):.4f}, {res['epochs']} epochs")
    print(f"{label}: {status} in {time.perf_counter() - t0:.0f}s{extra}", flush=True)


def run_one(n, total, job, args, tag, write_report):
    """Run one (row, seed) unless it is finished or another invocation holds it; then refresh the report."""
    from dataset_tools.lock import OutputLockedError, output_lock

    label = f"[{n}/{total}] {job['row']} seed {job['seed']} ({tag})"
    if not args.force and is_done(job["result_path"], job["key"], job["data_fingerprint"]):
        print(f"{label}: done, skipped", flush=True)
        return
    try:  # one invocation per row and seed at a time: a second one skips it
        with output_lock(Path(job["output_dir"]).parent, Path(job["output_dir"]).name,
                         "benchmark invocation is running this row and seed"):
            print(f"{label}: running ...", flush=True)
            run_job(job, args.isolation, label)
    except OutputLockedError as err:
        print(f"{label}: skipped: {err}", flush=True)
        return
    write_report()  # keep the table current


def run_jobs(jobs, args, tag, write_report):
    """Every job in order, ``--jobs`` of them at a time (each in its own worker process). An error or a
    signal stops the workers that run and starts no new one; the report is written by one thread at a time."""
    _STOPPING.clear()
    if args.jobs <= 1:
        for n, job in enumerate(jobs, 1):
            run_one(n, len(jobs), job, args, tag, write_report)
        return
    from concurrent.futures import ThreadPoolExecutor

    report_lock = threading.Lock()

    def locked_report():
        with report_lock:
            write_report()

    def one(n, job):
        if _STOPPING.is_set():
            return
        try:
            run_one(n, len(jobs), job, args, tag, locked_report)
        except BaseException:
            _STOPPING.set()  # before this thread can take the next job
            raise

    pool = ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="bench")
    try:
        for future in [pool.submit(one, n, job) for n, job in enumerate(jobs, 1)]:
            future.result()
    finally:  # also on SIGTERM / Ctrl-C (the main thread's wait is interrupted): stop every worker
        _STOPPING.set()
        for child in list(_CHILDREN):
            _stop(child)
        pool.shutdown(wait=True, cancel_futures=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=False, help="dataset name (folder under --data-path)")
    p.add_argument("--data-path", default="data", help="folder holding <dataset>/ atomic and feature files")
    p.add_argument("--models", default="all", help="comma list of rows, fnmatch patterns or groups "
                   f"({', '.join(['all', 'single', *MODEL_GROUPS])}); default all (single-size rows <row>-single-<m> "
                   "only when an item says 'single')")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row (mean +- std over them)")
    p.add_argument("--seed-base", type=int, default=2020, help="first seed; seeds are base, base+1, ...")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (default: common.yaml's epochs)")
    p.add_argument("--max-train-minutes", type=float, default=None,
                   help="per (row, seed) training budget: stop after the last epoch that fits, test the best checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (default 1: on a shared CPU, more threads were 10x slower)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="RecBole config override for every chosen row (YAML value); ROW:KEY=VALUE for one row pattern")
    p.add_argument("--tag", default=None, help="result set name (default: the device type, cpu or cuda)")
    p.add_argument("--results-dir", default=str(ROOT / "results"), help="where <dataset>.md/.csv and run JSONs go")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "benchmark"), help="logs and checkpoints")
    p.add_argument("--jobs", type=int, default=1,
                   help="(row, seed) runs at a time, each in its own process (a GPU machine: several rows share "
                        "the device; give each --threads 1 and keep jobs <= CPU cores)")
    p.add_argument("--isolation", choices=["subprocess", "inprocess"], default="subprocess",
                   help="one subprocess per run (own peak RSS, crash isolation) or all in this process")
    p.add_argument("--force", action="store_true", help="rerun chosen rows even if finished")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep best checkpoints under --work-dir")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from existing results")
    p.add_argument("--dry-run", action="store_true", help="print the resolved rows and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def split_overrides(items):
    """--set values -> ([(key, value)] for all rows, [(pattern, key, value)] per row)."""
    common, per_row = [], []
    for item in items:
        lhs, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE or ROW:KEY=VALUE")
        pattern, colon, key = lhs.rpartition(":")
        (per_row.append((pattern, key, parse_value(value))) if colon else common.append((key, parse_value(value))))
    return common, per_row


def plan(args, argv):
    """The jobs of this invocation: (row, seed) -> job dict, plus rows that cannot run."""
    settings = load_settings(args.dataset)
    device_type = args.device.split(":")[0]
    tag = args.tag or device_type
    common, per_row = split_overrides(args.set)

    def overrides_for(row):  # a ROW:KEY=VALUE pattern also reaches that row's single-size twins
        names = {row, settings["rows"][row].get("single_of", row)}
        return common + [(k, v) for pat, k, v in per_row if any(fnmatch.fnmatchcase(n, pat) for n in names)]

    settings["rows"].update(single_size_rows(settings, device_type, overrides_for))
    rows = resolve_rows(args.models, list(settings["rows"]))
    command = "python -m benchmarks.run_benchmark " + " ".join(shlex.quote(a) for a in argv)
    budget = args.max_train_minutes * 60 if args.max_train_minutes else None
    jobs, skipped = [], []
    data_id = data_fingerprint(args.data_path, args.dataset) if Path(args.data_path, args.dataset).is_dir() else None
    for row in rows:
        model, config = row_config(settings, row, device_type, overrides_for(row), args.max_epochs)
        config["data_path"] = str(Path(args.data_path).resolve())
        reason = unavailable_reason(settings, row, model, config, config["data_path"], args.dataset)
        if reason:
            skipped.append((row, model, reason))
            continue
        key = settings_key(model, args.dataset, config, {"max_train_seconds": budget, "device": device_type})
        for i in range(args.seeds):
            seed = args.seed_base + i
            jobs.append({
                "row": row, "model": model, "dataset": args.dataset, "seed": seed, "tag": tag, "key": key,
                "data_fingerprint": data_id,
                "config": config, "device": args.device, "threads": args.threads, "max_train_seconds": budget,
                "command": command, "keep_checkpoints": args.keep_checkpoints,
                "result_path": str(result_path(args.results_dir, args.dataset, tag, row, seed)),
                "output_dir": str(Path(args.work_dir).resolve() / args.dataset / tag / row / f"seed-{seed}"),
            })
    return settings, jobs, skipped, tag, command


def record_unfinished(jobs):
    """For --report-only: the curve so far of every chosen row and seed that an invocation began and did not
    finish (its work folder holds progress with the same settings), so the report shows where it stands."""
    for job in jobs:
        work = Path(job["output_dir"])
        marker, progress = work / "settings-key.txt", read_progress(work / "progress.jsonl")
        if progress and marker.is_file() and marker.read_text().strip() == job["key"] \
                and not is_done(job["result_path"], job["key"], job["data_fingerprint"]):
            started = json.loads((work / "job.json").read_text()) if (work / "job.json").is_file() else job
            atomic_write_json(unfinished_path(job), unfinished_record(dict(job, command=started["command"]), progress))


def record_unavailable(args, tag, skipped, command):
    for row, model, reason in skipped:
        path = result_path(args.results_dir, args.dataset, tag, row, "na").with_name("unavailable.json")
        atomic_write_json(path, {"schema": SCHEMA, "status": "unavailable", "row": row, "model": model,
                                 "dataset": args.dataset, "tag": tag, "reason": reason, "command": command})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if not args.dataset:
        raise SystemExit("--dataset is required")
    if args.jobs < 1 or (args.jobs > 1 and args.isolation != "subprocess"):
        raise SystemExit(f"--jobs {args.jobs}: need at least 1, and runs overlap only with --isolation subprocess")
    from recbole_fmrl.environment import set_offline_defaults

    set_offline_defaults()
    from benchmarks import bench_report

    settings, jobs, skipped, tag, command = plan(args, argv)
    if args.dry_run:
        for job in jobs:
            print(f"{job['row']:<20} seed {job['seed']} key {job['key']}  {json.dumps(job['config'], sort_keys=True)}")
        for row, _, reason in skipped:
            print(f"{row:<20} cannot run: {reason}")
        return 0
    if args.report_only:
        record_unfinished(jobs)
    else:
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
        inter = Path(args.data_path) / args.dataset / f"{args.dataset}.inter"
        if not inter.is_file():
            raise SystemExit(f"{inter} not found (--data-path / --dataset)")
        record_unavailable(args, tag, skipped, command)
        for job in jobs:  # a row that can run now has no stale "unavailable" record
            Path(job["result_path"]).with_name("unavailable.json").unlink(missing_ok=True)
        old_term = signal.signal(signal.SIGTERM, _terminate_child)
        try:
            run_jobs(jobs, args, tag, lambda: bench_report.write_report(args.dataset, args.results_dir, settings))
        finally:
            signal.signal(signal.SIGTERM, old_term)
    paths = bench_report.write_report(args.dataset, args.results_dir, settings)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file: its workers and report library are found as the benchmarks package
        sys.exit("error: run it as a module from the repository root: python -m benchmarks.run_benchmark ...")
    sys.exit(main())
