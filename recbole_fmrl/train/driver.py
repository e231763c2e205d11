"""The one training path: prepare a run, fit it, evaluate every size, tabulate.

The command line, Ray Tune trials and the benchmark harness all go through ``prepare`` and
``run`` (or ``prepare`` and ``evaluate_sizes`` for a stored checkpoint), so a tuned configuration
rerun from the command line gives the numbers its trial reported.
"""
import logging
import time
from collections import OrderedDict
from logging import getLogger
from typing import Callable, Optional

from recbole.data import data_preparation
from recbole.utils import init_seed, set_color

from recbole_fmrl.data import features, validate
from recbole_fmrl.data.modality import resolve_for_run
from recbole_fmrl.environment import set_numerics
from recbole_fmrl.model import native
from recbole_fmrl.train import checkpoint, distributed
from recbole_fmrl.train.config import Config
from recbole_fmrl.train.outputs import init_logger
from recbole_fmrl.train.registry import create_dataset, get_model, get_trainer, uses_fmrl_dataset

# A feature builder makes sure item feature tables exist for a run (``config`` in, ``config`` updated):
# dataset_tools provides one; this package never imports it (run_recbole_fmrl.py passes it in).
FeatureBuilder = Callable[[Config], None]


def prepare(model: Optional[str] = None, dataset: Optional[str] = None, config_file_list=None, config_dict=None,
            log: bool = True, *, feature_builder: Optional[FeatureBuilder] = None, load_dataset=create_dataset,
            config: Optional[Config] = None, resume=None):
    """Config, dataset, dataloaders, model and trainer of one run, ready to ``fit``.

    ``load_dataset(config)`` returns the (unbuilt) dataset: Ray trials pass a per-worker cache.
    The configuration (``Config``: the typed schema), the dataset folder and schema
    (``validate.check_run``) are checked first, the loaded dataset (``validate.check_loaded``) before
    the split: an ``InputError`` before any checkpoint is written. ``resume``: a run folder or
    checkpoint (``checkpoint.find_last``) whose last checkpoint the trainer continues from.
    """
    if config is None:
        config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    set_numerics(config["fmrl_flush_denormal"])
    native.set_cache_dir(config["fmrl_cache_dir"])  # the compiled loss kernel lives in the run's cache
    init_seed(config["seed"], config["reproducibility"])
    checked = validate.check_run(config)
    if log and distributed.is_main():  # multi-process runs: rank 0 writes the log
        init_logger(config)
    logger = getLogger()
    logger.info(checked)
    if uses_fmrl_dataset(get_model(config["model"])):
        resolve_for_run(config)  # auto -> id when there is nothing to build item features from
    with distributed.main_first(config):  # rank 0 downloads / builds features first, the others then read them
        if feature_builder is not None:
            feature_builder(config)
        data = load_dataset(config)
    logger.info(data)
    validate.check_loaded(config, data)
    dataset_sha256 = validate.fingerprint(config, features.locate(config))
    train_data, valid_data, test_data = data_preparation(config, data)
    distributed.seed_sampler(train_data, config)
    init_seed(config["seed"] + distributed.rank(), config["reproducibility"])
    net = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(net)
    trainer = get_trainer()(config, net, dataset_sha256=dataset_sha256)
    trainer.eval_collector.data_collect(train_data)  # training statistics some metrics need (also without fit)
    if resume is not None:
        trainer.resume_checkpoint(checkpoint.find_last(resume, config["model"]), train_data)
    return config, net, trainer, (train_data, valid_data, test_data)


def evaluate_sizes(trainer, net, valid_data, test_data, model_file=None, show_progress=False):
    """Validation and test metrics of the best (or given) weights, largest size and every size.

    Returns ``(valid, test, size_results)``; ``size_results`` maps each nested size to
    ``{"params", "valid", "test"}`` (None for models without nested sizes).
    """
    if model_file is not None:
        trainer.load_weights(model_file)
    valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
    valid_sizes = trainer.size_results
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
    test_sizes = trainer.size_results
    sizes = None
    if valid_sizes is not None:
        sizes = OrderedDict((m, {"params": net.nested_parameter_count(m), "valid": valid_sizes[m],
                                 "test": test_sizes[m]}) for m in net.sizes)
    return valid, test, sizes


def parameter_count(net) -> int:
    if hasattr(net, "nested_parameter_count"):
        return int(net.nested_parameter_count())
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, log=True, *,
        feature_builder=None, on_evaluation=None, callback_fn=None, resume=None):
    """Train with early stopping on validation, then evaluate the best checkpoint at every size.

    Returns a dict with the largest size's ``best_valid_result`` / ``test_result``, the per-epoch
    ``records`` and, for nested models, ``size_results``: size -> {"params", "valid", "test"}.
    """
    config, net, trainer, (train_data, valid_data, test_data) = prepare(
        model, dataset, config_file_list, config_dict, log, feature_builder=feature_builder, resume=resume)
    return fit_and_evaluate(config, net, trainer, (train_data, valid_data, test_data), saved=saved,
                            on_evaluation=on_evaluation, callback_fn=callback_fn)


def fit_and_evaluate(config, net, trainer, data, saved=True, on_evaluation=None, callback_fn=None):
    """``fit`` a prepared run, then evaluate its best weights at every size (see ``run``)."""
    train_data, valid_data, test_data = data
    logger, show = getLogger(), config["show_progress"]
    records = []

    def record(entry):
        records.append(entry)
        if on_evaluation is not None:
            on_evaluation(entry)

    start = time.perf_counter()
    stopped_by = "max epochs"
    try:
        best_valid_score, _ = trainer.fit(train_data, valid_data, saved=saved, show_progress=show,
                                          callback_fn=callback_fn, on_evaluation=record)
        finished = records[-1].get("finished") if records else ""
        stopped_by = {"early_stopped": "early stopping", "lr_zero": "learning rate at 0"}.get(finished, stopped_by)
    except StopTraining as stop:
        best_valid_score, stopped_by = trainer.best_valid_score, stop.reason
    train_seconds = time.perf_counter() - start
    valid, test, sizes = evaluate_sizes(trainer, net, valid_data, test_data,
                                        model_file=trainer.saved_model_file if saved else None, show_progress=show)
    if sizes is not None:
        logger.info("\n" + size_table(sizes))
        if saved and distributed.is_main():  # the best checkpoint carries its per-size metrics (export manifests)
            checkpoint.attach(trainer.saved_model_file, size_results=sizes)
    logger.info(set_color("best valid ", "yellow") + f": {valid}")
    logger.info(set_color("test result", "yellow") + f": {test}")
    return {
        "model": config["model"], "dataset": config["dataset"], "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"], "best_valid_result": valid, "test_result": test,
        "train_seconds": train_seconds, "epochs": max(1, len(trainer.train_loss_dict)), "best_epoch": trainer.best_epoch,
        "stopped_by": stopped_by, "records": records, "params": parameter_count(net),
        "saved_model_file": trainer.saved_model_file if saved else None, "size_results": sizes,
    }


class StopTraining(Exception):
    """Raised by an ``on_evaluation``/``callback_fn`` hook to end training early (e.g. a time budget)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def size_table(size_results, split="test", columns=("ndcg@10", "recall@10", "ndcg@20", "recall@20")):
    """A plain-text per-size table: size, parameters, then the chosen metrics of one split."""
    header = f"{'size':>6} {'params':>10} " + " ".join(f"{c:>10}" for c in columns)
    lines = [f"per-size {split} metrics (one trained model)", header]
    for size, row in size_results.items():
        metrics = row[split]
        lines.append(f"{size:>6} {row['params']:>10,} " + " ".join(f"{metrics.get(c, float('nan')):>10.4f}" for c in columns))
    return "\n".join(lines)


logging.getLogger("numba").setLevel(logging.WARNING)
