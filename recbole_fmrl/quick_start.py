"""Run and objective functions: RecBole's quick_start for the plugin's models and baselines."""
import logging
import time
from collections import OrderedDict
from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.utils import init_seed, set_color

from recbole_fmrl.config import Config
from recbole_fmrl.outputs import init_logger
from recbole_fmrl.registry import create_dataset, get_model, get_trainer


def set_numerics(config):
    """Process-wide numeric settings of a run."""
    # A sharp softmax leaves most of its [P, N] gradient subnormal; x86 GEMMs on subnormal floats
    # run ~5-20x slower (measured: a Beauty step at d=256 took 3.4 s instead of 0.64 s).
    torch.set_flush_denormal(bool(config["fmrl_flush_denormal"]))


def prepare(model="FMRLRec", dataset="ml-100k", config_file_list=None, config_dict=None, log=True):
    """Config, dataset, dataloaders, model and trainer of one run, ready to ``fit``."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    set_numerics(config)
    init_seed(config["seed"], config["reproducibility"])
    if log:
        init_logger(config)
    logger = getLogger()
    from recbole_fmrl.data.auto_features import ensure_item_features

    ensure_item_features(config)
    data = create_dataset(config)
    logger.info(data)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    net = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(net)
    trainer = get_trainer(config["model"])(config, net)
    return config, net, trainer, (train_data, valid_data, test_data)


def run(model="FMRLRec", dataset="ml-100k", config_file_list=None, config_dict=None, saved=True, log=True):
    """Train with early stopping on validation, then evaluate the best checkpoint at every size.

    Returns a dict with the largest size's ``best_valid_result`` / ``test_result`` and, for nested
    models, ``size_results``: size -> {"params", "valid", "test"}.
    """
    config, net, trainer, (train_data, valid_data, test_data) = prepare(
        model, dataset, config_file_list, config_dict, log)
    logger = getLogger()
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    train_seconds = time.perf_counter() - start
    epochs_run = max(1, len(trainer.train_loss_dict))
    valid_result = trainer.evaluate(valid_data, load_best_model=saved, show_progress=config["show_progress"])
    valid_sizes = trainer.size_results
    test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
    test_sizes = trainer.size_results
    result = {
        "model": config["model"],
        "dataset": config["dataset"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": valid_result,
        "test_result": test_result,
        "train_seconds": train_seconds,
        "epochs": epochs_run,
        "saved_model_file": trainer.saved_model_file if saved else None,
        "size_results": None,
    }
    if valid_sizes is not None:
        result["size_results"] = OrderedDict(
            (m, {"params": net.nested_parameter_count(m), "valid": valid_sizes[m], "test": test_sizes[m]})
            for m in net.sizes)
        logger.info("\n" + size_table(result["size_results"]))
    logger.info(set_color("best valid ", "yellow") + f": {valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """RecBole-style objective for hyper-parameter search (selection on validation only)."""
    result = run(config_dict=config_dict, config_file_list=config_file_list, saved=saved, log=False,
                 model=(config_dict or {}).get("model"), dataset=(config_dict or {}).get("dataset"))
    return {
        "model": result["model"],
        "best_valid_score": result["best_valid_score"],
        "valid_score_bigger": result["valid_score_bigger"],
        "best_valid_result": result["best_valid_result"],
        "test_result": result["test_result"],
    }


def size_table(size_results, split="test", columns=("ndcg@10", "recall@10", "ndcg@20", "recall@20")):
    """A plain-text per-size table: size, parameters, then the chosen metrics of one split."""
    header = f"{'size':>6} {'params':>10} " + " ".join(f"{c:>10}" for c in columns)
    lines = [f"per-size {split} metrics (one trained model)", header]
    for size, row in size_results.items():
        metrics = row[split]
        lines.append(f"{size:>6} {row['params']:>10,} " + " ".join(f"{metrics.get(c, float('nan')):>10.4f}" for c in columns))
    return "\n".join(lines)


logging.getLogger("numba").setLevel(logging.WARNING)
