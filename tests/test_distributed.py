"""Multi-process training (torch.distributed, gloo on the CPU) on the tiny dataset.

Two 2-process jobs: FMRLRec through the command line's ``--nproc 2`` and a RecBole baseline through
``distributed.launch`` with the driver's ``prepare`` + ``fit_and_evaluate``. Their evaluations must equal a
single-process evaluation of the same weights exactly, cover every user once, and the processes must
hold identical weights after training (gradients averaged).
"""
import os

import pytest
import torch
import torch.distributed as dist

from recbole_fmrl.cli import main as cli_main
from recbole_fmrl.train import distributed
from recbole_fmrl.train.driver import evaluate_sizes, fit_and_evaluate, prepare

# 40 users, batches of 9: 5 evaluation batches, split 2 + 3 over two processes (uneven on purpose)
SETTINGS = {"epochs": 2, "eval_batch_size": 9, "train_batch_size": 16, "learning_rate": 0.003}


def test_shards_cover_every_batch_exactly_once():
    for n_batches in range(0, 12):
        for world in range(1, 5):
            blocks = [list(distributed.shard(n_batches, world, r)) for r in range(world)]
            assert sum(blocks, []) == list(range(n_batches))  # contiguous, in order, nothing twice
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_launch_settings_follow_recbole_keys():
    one_machine = distributed.launch_settings(nproc=2)
    assert one_machine["world_size"] == 2 and one_machine["ip"] == "localhost" and one_machine["offset"] == 0
    two_machines = distributed.launch_settings(nproc=2, world_size=4, ip="10.0.0.1", port=5678, offset=2)
    assert (two_machines["world_size"], two_machines["port"], two_machines["offset"]) == (4, 5678, 2)
    with pytest.raises(ValueError, match="--ip and --port"):
        distributed.launch_settings(nproc=2, world_size=4)


def _single_process_evaluation(config_dict, model, saved_model_file):
    _, net, trainer, (_, valid, test) = prepare(model, "tiny", config_dict=config_dict, log=False)
    return evaluate_sizes(trainer, net, valid, test, model_file=saved_model_file)


def test_two_processes_from_the_command_line_evaluate_as_one(tiny_config, tmp_path):
    cfg = tiny_config(**SETTINGS)
    argv = ["--nproc", "2", "--model", "FMRLRec", "--dataset", "tiny"] + [f"{k}={v}" for k, v in cfg.items()]
    result = cli_main(argv)
    assert result["epochs"] == 2 and result["size_results"] is not None
    # rank 0 alone wrote: one log file, one TensorBoard folder, one best + one last checkpoint
    out = cfg["fmrl_output_dir"]
    assert len(os.listdir(os.path.join(out, "log", "FMRLRec"))) == 1
    assert len(os.listdir(os.path.join(out, "log_tensorboard"))) == 1
    saved = os.listdir(os.path.join(out, "saved"))
    assert len([f for f in saved if not f.endswith(".last.pth")]) == 1 and len(saved) <= 2, saved

    torch.set_num_threads(1)
    valid, test, sizes = _single_process_evaluation(dict(cfg, fmrl_output_dir=str(tmp_path / "one")), "FMRLRec",
                                                    result["saved_model_file"])
    assert dict(valid) == dict(result["best_valid_result"])  # exactly: same users once, same order
    assert dict(test) == dict(result["test_result"])
    for m, row in sizes.items():
        assert dict(row["test"]) == dict(result["size_results"][m]["test"])
        assert dict(row["valid"]) == dict(result["size_results"][m]["valid"])


def _baseline_job(config_dict, model):
    """In each process: the driver's path, then facts about this process's share and weights."""
    config, net, trainer, data = prepare(model, "tiny", config_dict=config_dict, log=False)
    result = fit_and_evaluate(config, net, trainer, data, saved=True)
    test = data[2]
    users = [b[0][config["USER_ID_FIELD"]].tolist() for b in distributed.eval_batches(test, config)]
    facts = {"users": sum(users, []), "all_users": test._dataset.inter_feat[config["USER_ID_FIELD"]].tolist(),
             "weights": float(sum(p.double().sum() for p in net.parameters())),
             "train_rows_per_step": data[0].step, "grad_sync": hasattr(trainer, "distributed_model")}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    result["ranks"] = gathered
    return result


def test_baseline_two_processes_cover_every_user_once_and_stay_in_sync(tiny_config, tmp_path):
    cfg = tiny_config(**SETTINGS, n_layers=1, n_heads=1, loss_type="CE", train_neg_sample_args=None,
                      hidden_size=16, inner_size=32)
    cfg.pop("fmrl_sizes")
    result = distributed.launch(_baseline_job, distributed.launch_settings(nproc=2), cfg, model="SASRec")
    ranks = result["ranks"]
    assert [r["users"] for r in ranks][0] and ranks[1]["users"]  # both processes evaluated users
    assert ranks[0]["users"] + ranks[1]["users"] == ranks[0]["all_users"]  # each test user once, in order
    assert len(ranks[0]["all_users"]) == 40
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged: identical weights
    assert all(r["grad_sync"] for r in ranks)
    assert [r["train_rows_per_step"] for r in ranks] == [8, 8]  # global batch 16 = 2 x 8

    torch.set_num_threads(1)
    valid, test, _ = _single_process_evaluation(dict(cfg, fmrl_output_dir=str(tmp_path / "one")), "SASRec",
                                                result["saved_model_file"])
    assert dict(valid) == dict(result["best_valid_result"])
    assert dict(test) == dict(result["test_result"])
