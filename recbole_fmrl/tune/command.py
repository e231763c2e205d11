"""``run_recbole_fmrl.py tune``: Ray Tune searches for FMRLRec and RecBole's baselines.

    python run_recbole_fmrl.py tune --space properties/tune/fmrlrec-cpu.yaml --dataset ml-100k
    python run_recbole_fmrl.py tune --space fmrlrec-paper --dataset amazon-beauty data_path=data --gpus_per_trial 1 \
        --address auto                                                   # attach to a running cluster

Each trial builds the plugin's Config, Dataset, Model and Trainer, trains epoch by epoch and reports
validation metrics after every evaluation (so ASHA can stop it early) with a checkpoint that lets an
interrupted or failed trial resume exactly where it stopped (model, optimiser, early-stopping state
and random number generators). Selection uses the best validation score of each trial only; with
``--seeds`` (or the space's ``seeds``) every configuration trains once per seed and is ranked on its mean.
The selected trial's best checkpoint (each seed's) is evaluated once on the test split afterwards, and that
result is written separately (``selected.json`` and the Markdown report); no trial ever sees the test split.

Outputs under ``<storage_path>/<name>/`` (default ``<fmrl_output_dir>/tune/<model>-<dataset>-<space>``):
``results.csv`` and ``results.md`` (trials sorted by validation score), ``best.yaml`` (accepted as is by
``run_recbole_fmrl.py --config_files``), ``selected.json``, ``fmrl_job.json`` (the search, reused on
resume) and Ray's own experiment files; each trial writes RecBole's log/, log_tensorboard/ and
saved/ under ``<trial folder>/fmrl/``.
"""
import argparse
from pathlib import Path

from recbole_fmrl.environment import set_offline_defaults
from recbole_fmrl.tune.search import run_search
from recbole_fmrl.tune.space import SCHEDULERS, SEARCHES, build_job


def _seed_list(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 2020,2021,2022") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="run_recbole_fmrl.py tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="search space YAML (or a name under properties/tune/)")
    parser.add_argument("--dataset", "-d", default=None, help="dataset name (default: the space's dataset)")
    parser.add_argument("--model", "-m", default=None, help="model (default: the space's model)")
    parser.add_argument("--config_files", nargs="*", default=None, help="YAML files shared by every trial")
    parser.add_argument("--name", default=None, help="experiment name (default <model>-<dataset>-<space>)")
    parser.add_argument("--storage_path", default=None, help="experiments folder (default <fmrl_output_dir>/tune)")
    parser.add_argument("--search", choices=SEARCHES, default=None, help="override the space's search")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="override the space's scheduler")
    parser.add_argument("--num_samples", type=int, default=None, help="random: configurations; grid: repeats")
    parser.add_argument("--search_seed", type=int, default=None, help="seed of the random search's sampler")
    parser.add_argument("--seeds", type=_seed_list, default=None,
                        help="comma list (2020,2021,2022): train every configuration once per seed and select on the "
                             "mean validation score (overrides the space's seeds)")
    parser.add_argument("--cpus_per_trial", type=float, default=1)
    parser.add_argument("--gpus_per_trial", type=float, default=0, help="fractions share a GPU")
    parser.add_argument("--max_concurrent", type=int, default=None, help="trials running at once (default: as resources allow)")
    parser.add_argument("--max_failures", type=int, default=1, help="retries of a failed trial (from its last checkpoint)")
    parser.add_argument("--checkpoint_every", type=int, default=1, help="evaluations between trial checkpoints")
    parser.add_argument("--address", default=None, help="Ray cluster to attach to (e.g. auto or ray://head:10001)")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--resume", choices=("auto", "yes", "no"), default="auto",
                        help="auto: resume the experiment if its folder holds one, else start")
    parser.add_argument("--retry_errored", action="store_true", help="on resume, rerun trials that had failed")
    parser.add_argument("--no_test", action="store_true", help="skip the selected trial's test evaluation")
    parser.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress table, 2-3 every result")
    parser.add_argument("--report_every", type=float, default=30, help="seconds between progress tables")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            parser.error(f"unrecognised argument {item!r}: expected key=value")
        overrides[key] = value
    return args, overrides


def main(argv=None, feature_builder=None):
    """The ``tune`` subcommand; ``feature_builder`` builds missing item features once, in the driver."""
    set_offline_defaults()
    args, overrides = parse_args(argv)
    job = build_job(args.space, args.dataset, args.model, args.config_files, overrides, name=args.name,
                    storage_path=args.storage_path, search=args.search, scheduler=args.scheduler,
                    num_samples=args.num_samples, search_seed=args.search_seed, cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                    max_failures=args.max_failures, checkpoint_every=args.checkpoint_every, seeds=args.seeds)
    summary = run_search(job, address=args.address, num_cpus=args.num_cpus, resume=args.resume,
                         retry_errored=args.retry_errored, evaluate_test=not args.no_test, verbose=args.verbose,
                         report_every=args.report_every, feature_builder=feature_builder)
    print(Path(summary["results_md"]).read_text())
    print(f"results: {summary['results_csv']}\n         {summary['results_md']}")
    if summary["best_yaml"]:
        print(f"best:    {summary['best_yaml']}")
    return summary

