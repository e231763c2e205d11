"""Multi-process training on torch.distributed: one process per device, each running the one driver.

Launching (RecBole's interface; ``run_recbole_fmrl.py`` takes the same flags as RecBole's run_recbole.py):

- one machine: ``run_recbole_fmrl.py --nproc N ...`` spawns N processes (torch.multiprocessing, spawn);
- several machines: on every machine ``--nproc <processes here> --world_size <processes in all>
  --ip <address of the machine holding rank 0> --port <free TCP port there> --group_offset <processes
  on the machines before this one>`` (or the same as config keys ``world_size``, ``ip``, ``port``, ``offset``).

Each process builds the same Config with ``local_rank`` (its index on its machine); its global rank is
``offset + local_rank``. Backend: nccl with one GPU per process (``cuda:<local_rank>``, ``gpu_id`` lists
them), else gloo on the CPU. RecBole 1.2.1 hard-codes nccl and ``device_ids``, so its DDP cannot run on
a CPU; this module replaces those two pieces and its evaluation (see ``eval_batches``).

Semantics:

- ``train_batch_size`` and ``eval_batch_size`` are GLOBAL (RecBole's rule): each process takes
  ``batch // world_size`` rows of every training step and DistributedDataParallel averages the gradients,
  so N processes take the optimiser steps one process takes with the same ``train_batch_size``.
- Training data: RecBole's DistributedSampler (every process a disjoint share, padded by at most
  ``world_size - 1`` repeated windows per epoch), reshuffled every epoch from the run's ``seed``.
- Evaluation: the users are cut into the batches a single process forms; each process scores a
  contiguous block of whole batches, the collected top-k rows are gathered and concatenated in batch
  order, and every process computes the metrics from all of them: every user exactly once, the numbers a
  single process gets from the same weights (RecBole 1.2.1 pads users with its DistributedSampler and
  averages per-process means weighted by batch counts, RecBole PR 1872). Every process takes the same
  early-stopping decision from the same numbers, and the number of collective calls never depends on
  the data, so no process waits on a collective another skipped (RecBole issue 1811's hang at test time).
- Rank 0 alone writes logs, TensorBoard events and checkpoints; best weights are read by rank 0 and
  broadcast, so machines need no shared filesystem for ``saved/``.
"""
import contextlib
import datetime
import inspect
import os
import pickle
import socket
import tempfile

import torch
import torch.distributed as dist

from recbole_fmrl.errors import InputError

LAUNCH_KEYS = ("world_size", "ip", "port", "nproc", "offset")


def requested(cfg) -> bool:
    """RecBole's signal for a multi-process run: the launcher put ``local_rank`` into the configuration."""
    return "local_rank" in cfg and cfg.get("world_size") not in (None, 1, -1)


def active(config) -> bool:
    return "single_spec" in config and config["single_spec"] is False


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _cuda_wanted(cfg, gpu_id):
    return bool(gpu_id) and cfg.get("use_gpu", True) is not False and torch.cuda.is_available()


def init_device(cfg):
    """``Config._init_device`` of a multi-process run: process group, device, and rank-0-only logging."""
    gpu_id = ",".join(map(str, cfg["gpu_id"])) if isinstance(cfg["gpu_id"], (tuple, list)) else str(cfg["gpu_id"])
    cfg["gpu_id"] = gpu_id
    local_rank, world = int(cfg["local_rank"]), int(cfg["world_size"])
    cuda = _cuda_wanted(cfg, gpu_id)
    if cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        if len(gpu_id.split(",")) < int(cfg.get("nproc") or 1):
            raise InputError(f"gpu_id={gpu_id!r} lists fewer GPUs than --nproc {cfg.get('nproc')}")
        torch.cuda.set_device(local_rank)
    global_rank = int(cfg.get("offset") or 0) + local_rank
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
                                rank=global_rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    elif (dist.get_rank(), dist.get_world_size()) != (global_rank, world):
        raise RuntimeError(f"process group is rank {dist.get_rank()}/{dist.get_world_size()}, "
                           f"the configuration asks for {global_rank}/{world}")
    cfg["device"] = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    cfg["single_spec"] = False
    if global_rank != 0:
        cfg["state"] = "error"  # RecBole's rule: the other ranks log errors only


@contextlib.contextmanager
def main_first(config):
    """Rank 0 runs the block first (downloads, feature caches), the others after it finished."""
    if not active(config):
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


class NullWriter:
    """A SummaryWriter that writes nothing (ranks other than 0)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def trainer_construction(config):
    """Around RecBole's ``Trainer.__init__``: it must not wrap the model itself (nccl-only ``device_ids``),
    and ranks other than 0 get no TensorBoard writer. ``attach`` wraps the model afterwards."""
    if not active(config):
        yield
        return
    import recbole.trainer.trainer as recbole_trainer

    factory = recbole_trainer.get_tensorboard
    if not is_main():
        recbole_trainer.get_tensorboard = lambda logger: NullWriter()
    config["single_spec"] = True
    try:
        yield
    finally:
        config["single_spec"] = False
        recbole_trainer.get_tensorboard = factory


def attach(trainer):
    """DistributedDataParallel for RecBole's training loop, and one checkpoint path for every rank.

    RecBole's ``_train_epoch`` drives the wrapped model through ``set_reduce_hook`` (a forward that
    arms the gradient all-reduce) and adds zero times every parameter to the loss, so parameters a
    batch does not reach still take part. Buffers are not re-broadcast every step (the models' buffers
    are constants, e.g. the frozen item features: one broadcast at construction).
    """
    config, model = trainer.config, trainer.model
    if not active(config):
        return
    if config["device"].type == "cuda":
        trainer.model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trainer.distributed_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[config["device"].index] if config["device"].type == "cuda" else None, **no_buffer_sync())
    trainer.saved_model_file = broadcast_object(trainer.saved_model_file)


def no_buffer_sync():
    """DistributedDataParallel's keyword for "no buffer broadcast every forward" (renamed in newer torch)."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (unchanged without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_weights(model, other_parameter=None):
    """Copy rank 0's parameters and persistent buffers into every rank's model (in place)."""
    if not (dist.is_available() and dist.is_initialized()):
        return other_parameter
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    return broadcast_object(other_parameter)


def seed_sampler(train_data, config):
    """Shuffle the distributed training order from the run's seed (RecBole leaves torch's fixed 0)."""
    sampler = getattr(train_data, "sampler", None)
    if active(config) and hasattr(sampler, "set_epoch"):
        sampler.seed = int(config["seed"])


def shard(n_batches, world, index):
    """The contiguous block of batch numbers process ``index`` of ``world`` evaluates."""
    return range(n_batches * index // world, n_batches * (index + 1) // world)


def eval_batches(eval_data, config):
    """This process's evaluation batches: a single process's batches, a contiguous block of them.

    Single process: the loader itself. Distributed: the loader's batch size is restored to the global
    ``eval_batch_size`` (RecBole divides it per process) and only this rank's batches are collated.
    """
    if not active(config):
        yield from eval_data
        return
    eval_data._init_batch_size_and_step()  # undo RecBole's per-process split of the step
    step, total = eval_data.step, eval_data.sample_size
    n_batches = (total + step - 1) // step
    for number in shard(n_batches, world_size(), rank()):
        yield eval_data.collate_fn(list(range(number * step, min(total, (number + 1) * step))))


BATCH_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label")


def merge_collected(collectors, config):
    """Gather every rank's per-batch evaluation rows into every rank's collectors, in batch order.

    Rank r holds batches ``shard(..., r)``; concatenating in rank order gives the single-process order.
    """
    if not active(config):
        return
    local = [{k: c.data_struct[k].cpu() for k in BATCH_KEYS if k in c.data_struct} for c in collectors]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, local)
    for index, collector in enumerate(collectors):
        keys = {k for part in gathered for k in part[index]}
        for key in BATCH_KEYS:
            if key in keys:
                pieces = [part[index][key] for part in gathered if key in part[index]]
                collector.data_struct.set(key, torch.cat(pieces, dim=0).to(collector.device))


@torch.no_grad()
def evaluate_plain(trainer, eval_data):
    """RecBole's ``Trainer.evaluate`` loop (weights as they are) over this rank's batches, merged."""
    from recbole.data.dataloader import FullSortEvalDataLoader
    from recbole.utils import EvaluatorType

    trainer.model.eval()
    if isinstance(eval_data, FullSortEvalDataLoader):
        eval_func = trainer._full_sort_batch_eval
        if trainer.item_tensor is None:
            trainer.item_tensor = eval_data._dataset.get_item_feature().to(trainer.device)
    else:
        eval_func = trainer._neg_sample_batch_eval
    if trainer.config["eval_type"] == EvaluatorType.RANKING:
        trainer.tot_item_num = eval_data._dataset.item_num
    for batch in eval_batches(eval_data, trainer.config):
        interaction, scores, positive_u, positive_i = eval_func(batch)
        trainer.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
    merge_collected([trainer.eval_collector], trainer.config)
    trainer.eval_collector.model_collect(trainer.model)
    return trainer.evaluator.evaluate(trainer.eval_collector.get_data_struct())


# ----------------------------------------------------------------------------- launching

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_settings(nproc=1, world_size=None, ip=None, port=None, offset=0):
    """RecBole's launch keys; on one machine (world = nproc) a free local port unless one is given."""
    nproc = int(nproc or 1)
    world = int(world_size) if world_size not in (None, -1, "-1") else nproc
    if world < nproc:
        raise InputError(f"world_size {world} is smaller than --nproc {nproc}")
    if world > nproc and (ip is None or port is None):
        raise InputError("several machines: give --ip and --port of the machine running rank 0 (and --group_offset)")
    return {"world_size": world, "nproc": nproc, "ip": ip or "localhost",
            "port": int(port) if port is not None else free_port(), "offset": int(offset or 0)}


def settings_from(args, overrides):
    """Launch settings from RecBole's flags (``--nproc --world_size --ip --port --group_offset``) and/or
    the keys ``nproc world_size ip port offset`` (removed from ``overrides``); None for one process."""
    keys = {k: overrides.pop(k) for k in LAUNCH_KEYS if k in overrides}
    flags = {"nproc": args.nproc, "world_size": args.world_size, "ip": args.ip, "port": args.port,
             "offset": args.group_offset}
    keys.update({k: v for k, v in flags.items() if v is not None})
    settings = launch_settings(**keys)
    return settings if settings["world_size"] > 1 else None


def launch(fn, settings, config_dict=None, **kwargs):
    """Run ``fn(config_dict=..., **kwargs)`` in ``settings["nproc"]`` spawned processes of one job.

    Every process gets ``config_dict`` plus the launch keys and its ``local_rank``; returns what
    global rank 0 returned (None on the other machines). A failing process ends the others.
    """
    import torch.multiprocessing as mp

    config_dict = {**(config_dict or {}), **settings}
    with tempfile.TemporaryDirectory(prefix="fmrl-ddp-") as tmp:
        result_file = os.path.join(tmp, "result.pkl")
        mp.spawn(_worker, args=(fn, config_dict, kwargs, result_file), nprocs=settings["nproc"], join=True)
        if not os.path.isfile(result_file):
            return None
        with open(result_file, "rb") as fh:
            return pickle.load(fh)


def _worker(local_rank, fn, config_dict, kwargs, result_file):
    if "OMP_NUM_THREADS" not in os.environ:  # the machine's cores shared out, as torchrun does
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(config_dict["nproc"])))
    try:
        result = fn(config_dict={**config_dict, "local_rank": local_rank}, **kwargs)
        if dist.is_initialized():  # every rank done with its collectives before any tears the group down
            dist.barrier()         # (a rank that raised instead makes spawn stop the others: no hang)
        if rank() == 0:
            with open(result_file + ".tmp", "wb") as fh:
                pickle.dump(result, fh)
            os.replace(result_file + ".tmp", result_file)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
