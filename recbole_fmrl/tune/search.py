"""Ray glue: the Tune trainable, scheduler, reporter, cluster attachment and the search itself."""
import json
import os
import time
import warnings
from pathlib import Path

from recbole_fmrl.environment import forwarded_env
from recbole_fmrl.errors import InputError
from recbole_fmrl.tune.report import best_config, config_groups, mean_std, read_best_weights, result_rows, write_outputs
from recbole_fmrl.tune.space import make_config, ray_param_space, searched_keys, trial_count
from recbole_fmrl.tune.trial import SCORE, evaluate_checkpoint, ray_device_overrides, train_trial

JOB_FILE = "fmrl_job.json"

def _ray_trial(params, job):
    """The Tune function trainable: Ray's trial folder, checkpoint, GPUs and CPUs -> ``train_trial``."""
    import ray
    from ray import tune

    warnings.filterwarnings("ignore", category=FutureWarning)
    context = tune.get_context()
    trial_dir = context.get_trial_dir()
    resume_dir = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_dir = checkpoint.to_directory(os.path.join(trial_dir, "fmrl", "resume"))
        # (removed again by train_trial once restored)

    node = ray.get_runtime_context().get_node_id()  # which machine ran each epoch (a lost node's trials move)

    def report(metrics, folder):
        tune.report(dict(metrics, node_id=node),
                    checkpoint=tune.Checkpoint.from_directory(str(folder)) if folder else None)

    threads = context.get_trial_resources().required_resources.get("CPU", 1)
    train_trial(job, params, trial_dir, report, resume_dir=resume_dir, device=ray_device_overrides(),
                threads=threads)


def _evaluate_task(job, params, best_bytes, out_dir):
    import tempfile

    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.pth"
        best.write_bytes(best_bytes)
        return evaluate_checkpoint(job, params, best, out_dir, device=ray_device_overrides())


def _trial_dirname(trial):
    return f"trial_{trial.trial_id}"  # short: RecBole's file names and Windows-length paths stay sane


def make_trainable(job):
    from ray import tune

    resources = {"cpu": job["resources"]["cpu"], "gpu": job["resources"]["gpu"]}
    return tune.with_resources(tune.with_parameters(_ray_trial, job=job), resources)


def _mode(config):
    return "max" if config["valid_metric_bigger"] else "min"


def _driver_config(job, feature_builder=None):
    """The search's base configuration in the driver: checks it, names the metric, builds features once."""
    config = make_config(job["model"], job["dataset"], dict(job["base"], show_progress=False))
    if feature_builder is not None:
        feature_builder(config)  # into the cache, where every trial's dataset finds them
    return config


def _scheduler(job, config):
    if job["scheduler"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = dict(job["asha"])
    max_t = asha.pop("max_t", None) or max(1, config["epochs"] // max(1, config["eval_step"]))
    return ASHAScheduler(time_attr="training_iteration", max_t=int(max_t),
                         grace_period=min(int(max_t), int(asha.pop("grace_period", 1))),
                         reduction_factor=float(asha.pop("reduction_factor", 2)), **asha)


def _reporter(job, metric, mode, report_every):
    from ray.tune import CLIReporter

    return CLIReporter(
        parameter_columns=searched_keys(job),
        metric_columns={"epoch": "epoch", "valid_score": metric, SCORE: f"best {metric}", "finished": "end"},
        max_report_frequency=report_every, sort_by_metric=True)  # metric and mode come from TuneConfig


MIN_RAY = (2, 50)  # tune.report(metrics, checkpoint=...), tune.get_context(), token authentication


def check_ray_version(version):
    """Refuse a Ray older than ``MIN_RAY`` in one line (plain pip resolves RecBole's ray<=2.6.3 pin)."""
    found = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if found < MIN_RAY:
        raise InputError(f"ray {version} is installed; searches need ray >= {MIN_RAY[0]}.{MIN_RAY[1]}: "
                         f"pip install -U \"ray[tune,serve]>={MIN_RAY[0]}.{MIN_RAY[1]}\" (or set up with ./run.sh)")


def init_ray(address=None, num_cpus=None):
    """Attach to a cluster (``address``), or start a local Ray; an already running session is reused."""
    import ray

    check_ray_version(ray.__version__)
    if ray.is_initialized():
        return False
    env = forwarded_env()
    kwargs = {"runtime_env": {"env_vars": env}} if env and address else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a new Ray of our own, never a cluster someone else started on this machine (which a bare
        # ray.init() attaches to through /tmp/ray/ray_current_cluster)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


def _new_tuner(job, config, metric, mode, verbose, report_every):
    """A fresh Tuner for the job (its settings stored beside the experiment for resume)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    exp_dir = Path(job["storage_path"]) / job["name"]
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / JOB_FILE).write_text(json.dumps(job, indent=1))
    return tune.Tuner(
        make_trainable(job),
        param_space=ray_param_space(job["space"], job["search"], job.get("seeds")),
        tune_config=tune.TuneConfig(
            metric=SCORE, mode=mode, num_samples=job["num_samples"], scheduler=_scheduler(job, config),
            search_alg=BasicVariantGenerator(random_state=job["search_seed"]),
            max_concurrent_trials=job["max_concurrent"], reuse_actors=True,
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=job["name"], storage_path=job["storage_path"], verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=job["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            progress_reporter=_reporter(job, metric, mode, report_every)))


def _fit_quietly(tuner):
    """``tuner.fit()`` with Ray's classic progress table (chosen columns, sorted by the metric)."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        return tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def _evaluate_all(job, trials, exp_dir):
    """Each trial's best checkpoint evaluated (valid and test), as Ray tasks side by side."""
    import ray

    task = ray.remote(_evaluate_task).options(num_cpus=job["resources"]["cpu"], num_gpus=job["resources"]["gpu"],
                                              max_retries=0)
    folders = [exp_dir / "selected"] if len(trials) == 1 else [exp_dir / "selected" / f"seed-{t['seed']}" for t in trials]
    return ray.get([task.remote(job, t["_params"], t["_best"], str(folder)) for t, folder in zip(trials, folders)])


def _select(job, rows, metric, mode, exp_dir, evaluate_test):
    """The best finished configuration (validation only: its trial, or its mean over the seeds) and, once,
    its best checkpoints' test metrics."""
    if job.get("seeds"):
        group = next((g for g in config_groups(rows, job, mode) if g["complete"]), None)
        trials = group["rows"] if group else []
    else:
        trials = [r for r in rows if r["status"] == "TERMINATED" and r.get("_checkpoint")][:1]
    trials = [dict(t, _best=read_best_weights(t["_checkpoint"])) for t in trials]
    if not trials or any(t["_best"] is None for t in trials):
        return None
    if not job.get("seeds"):
        best = trials[0]
        selected = {"trial_id": best["trial_id"], "trial_dir": best["trial_dir"], "params": best["_params"],
                    "best_epoch": best["best_epoch"], "reported_valid_score": best[SCORE],
                    "valid_metric": metric, "config": best_config(job, best["_params"])}
        if evaluate_test:
            selected.update(_evaluate_all(job, trials, exp_dir)[0])
        return selected
    selected = {"trial_id": " ".join(t["trial_id"] for t in trials), "trial_dir": [t["trial_dir"] for t in trials],
                "params": group["params"], "seeds": [t["seed"] for t in trials],
                "best_epoch": [t["best_epoch"] for t in trials], "reported_valid_score": group["mean"],
                "reported_valid_std": group["std"], "valid_metric": metric, "config": best_config(job, group["params"])}
    if evaluate_test:
        selected.update(seed_summary(trials, _evaluate_all(job, trials, exp_dir)))
    return selected


def seed_summary(trials, evaluations):
    """Per-seed evaluations and their mean (``valid``, ``test``, ``size_results``) and sample std (``*_std``)."""
    def mean_std_of(dicts):
        pairs = {k: mean_std([d[k] for d in dicts]) for k in dicts[0]}
        return {k: m for k, (m, _) in pairs.items()}, {k: sd for k, (_, sd) in pairs.items()}

    out = {"per_seed": [dict(e, seed=t["seed"], trial_id=t["trial_id"]) for t, e in zip(trials, evaluations)],
           "valid_metric": evaluations[0]["valid_metric"]}
    for split in ("valid", "test"):
        out[split], out[f"{split}_std"] = mean_std_of([e[split] for e in evaluations])
    sizes = evaluations[0].get("size_results")
    if sizes:
        out["size_results"] = {}
        for m, first in sizes.items():
            entry = {"params": first["params"]}
            for split in ("valid", "test"):
                entry[split], entry[f"{split}_std"] = mean_std_of([e["size_results"][m][split] for e in evaluations])
            out["size_results"][m] = entry
    return out


def run_search(job, *, address=None, num_cpus=None, resume="auto", retry_errored=False, evaluate_test=True,
               verbose=1, report_every=30, feature_builder=None) -> dict:
    """Run (or resume) a search; write results.csv/.md, best.yaml and selected.json; return a summary dict."""
    import ray
    from ray import tune

    exp_dir = Path(job["storage_path"]) / job["name"]
    started = init_ray(address, num_cpus)
    try:
        restorable = exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir))
        if restorable and resume == "no":
            raise FileExistsError(f"{exp_dir} holds a search; resume it (--resume auto) or pick another --name")
        if not restorable and resume == "yes":
            raise FileNotFoundError(f"{exp_dir}: no search to resume")
        if restorable:
            job = json.loads((exp_dir / JOB_FILE).read_text())
            print(f"resuming {exp_dir} (the stored search settings are used)")
        else:
            print(f"search {job['name']}: {trial_count(job)} trials")
        config = _driver_config(job, feature_builder)
        metric, mode = config["valid_metric"].lower(), _mode(config)
        tuner = (tune.Tuner.restore(str(exp_dir), trainable=make_trainable(job), resume_unfinished=True,
                                    resume_errored=retry_errored) if restorable
                 else _new_tuner(job, config, metric, mode, verbose, report_every))
        start = time.perf_counter()
        grid = _fit_quietly(tuner)
        search_seconds = time.perf_counter() - start
        rows = result_rows(grid, job, metric, mode)
        unfinished = [r["trial_id"] for r in rows if r["status"] not in ("TERMINATED", "ERROR")]
        if unfinished:
            print(f"search interrupted ({len(unfinished)} trials unfinished): rerun the same command to resume {exp_dir}")
        selected = None if unfinished else _select(job, rows, metric, mode, exp_dir, evaluate_test)
        total_seconds = time.perf_counter() - start
        summary = write_outputs(exp_dir, job, rows, selected, metric, mode, search_seconds, total_seconds)
        summary["result_grid"] = grid
        return summary
    finally:
        if started:
            ray.shutdown()
