"""FMRLTrainer: RecBole's Trainer with per-size evaluation, safe checkpoints and tidy outputs.

- ``fit`` is RecBole's loop (same early stopping, checkpoints and random numbers) opened up: every
  validation produces an epoch record (times, scores, per-size results) handed to ``on_evaluation``,
  which the CLI, Ray Tune trials and the benchmark harness use alike.
- Models with ``full_sort_predict_sizes`` are evaluated at every nested size from one forward
  pass per batch; ``evaluate`` returns the largest size's metrics (early stopping uses them) and
  keeps all sizes in ``self.size_results``; ``fmrl_select_on`` mean / geomean make early stopping and
  the best checkpoint follow every size's validation metric instead.
- ``fmrl_select_on: per_size``: every size keeps its own best epoch and training goes on while any
  size improves (``size_best.py``); test evaluation takes each size from its own epoch.
- Checkpoints reload under torch >= 2.6 (see ``checkpoint.py``).
- AdamW decays only weight matrices, not biases, norms or the LRU's log-parameters.
- ``fmrl_lr_warmup_steps`` / ``fmrl_lr_decay_epochs``: warm-up and cosine decay (``schedule.py``).
- The plugin's keys are read once, in ``__init__`` (checked by ``schema.py``; defaults in the YAML files).
- Run names cannot collide (``outputs.checkpoint_file``); a resumed run must have the settings
  (``schema.RESUME_KEYS``) and the dataset content (``validate.fingerprint``) of the run it continues.
"""
import copy
import math
import os
import time
from collections import OrderedDict

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector
from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color
from torch import optim
from tqdm import tqdm

from recbole_fmrl.errors import InputError
from recbole_fmrl.train import checkpoint, distributed
from recbole_fmrl.train.outputs import checkpoint_file, tensorboard_under
from recbole_fmrl.train.schedule import attach_schedule, schedule_ended
from recbole_fmrl.train.schema import RESUME_KEYS
from recbole_fmrl.train.size_best import ENTRY, SizeBests, pasted, slices_of

NO_DECAY_MARKERS = ("bias", "ln1.", "ln2.", "norm", "params_log")


def check_resumable(state, config, resume_file, dataset_sha256=None):
    """Refuse (naming the key) a checkpoint written under other settings than ``config``'s (the keys
    marked ``resume`` in the schema; the rest may change, e.g. epochs), or on other data."""
    saved = state["config"]
    for key in RESUME_KEYS:
        if key in saved and checkpoint.plain(config[key]) != saved[key]:
            raise InputError(f"{resume_file}: written with {key}={saved[key]!r}, this run has {key}="
                             f"{checkpoint.plain(config[key])!r}; resume with the original settings")
    trained_on = state.get("dataset_sha256")
    if trained_on and dataset_sha256 and trained_on != dataset_sha256:
        raise InputError(f"{resume_file}: trained on other data than dataset {config['dataset']} in "
                         f"{config['data_path']} holds now (content sha256 {trained_on[:12]}... against "
                         f"{dataset_sha256[:12]}...); resume on the data it was trained on, or start a new run")


def select_score(per_size, rule):
    """One validation score from every size's metric (``rule`` mean or geomean); 0 if any size scores 0."""
    if rule == "mean":
        return sum(per_size) / len(per_size)
    if min(per_size) <= 0:
        return 0.0
    return math.exp(sum(math.log(v) for v in per_size) / len(per_size))


def mask_history(scores, item_seq):
    """Scores ``[..., B, N+1]`` with every item of each user's input window ``[B L]`` (their history, up
    to the window length; padding 0) set to -inf, in place: excluded from the ranking."""
    index = item_seq.expand(*scores.shape[:-2], *item_seq.shape)  # [... B L]
    return scores.scatter_(-1, index, -torch.inf)


class StatsCollector(Collector):
    """RecBole's Collector, whose ``get_data_struct`` also works with the training statistics
    (``data.num_items``: an int, ``data.count_items``: a Counter) that ItemCoverage, AveragePopularity,
    GiniIndex and TailPercentage read: RecBole 1.2.1 calls ``.cpu()`` on every entry and crashes."""

    def get_data_struct(self):
        entries = self.data_struct._data_dict
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                entries[key] = value.cpu()
        returned = copy.deepcopy(self.data_struct)
        for key in ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label"):
            if key in self.data_struct:
                del self.data_struct[key]
        return returned


class FMRLTrainer(Trainer):
    def __init__(self, config, model, dataset_sha256=None):
        with tensorboard_under(config["fmrl_output_dir"]), distributed.trainer_construction(config):
            super().__init__(config, model)
        self.saved_model_file = checkpoint_file(config)  # RecBole's <model>-<second>.pth collides
        distributed.attach(self)  # multi-process runs: DistributedDataParallel, rank 0's checkpoint path
        self.eval_collector = StatsCollector(config)  # train-statistic metrics work in RecBole's evaluate too
        self.size_results = None
        self.best_epoch = -1
        self.dataset_sha256 = dataset_sha256  # validate.fingerprint of the data (checkpoints carry it)
        self.scheduler, self.schedule_attached = None, False
        # the plugin's keys, read once (defaults: properties/overall.yaml; checked by schema.py)
        # fmrl_select_on: whose validation metric early stopping and the best checkpoint follow: the largest
        # size (the paper), or the mean / geometric mean over every nested size
        self.select_on = config["fmrl_select_on"]
        self.mask_history = bool(config["fmrl_eval_mask_history"])
        self.schedule_settings = (config["fmrl_lr_warmup_steps"], config["fmrl_lr_decay_epochs"])
        # Per-epoch validation of every size costs K top-k sorts; early stopping on the largest reads one.
        self.valid_every_size = self.select_on != "largest" or bool(config["fmrl_valid_every_size"])
        self.size_bests = self._size_bests(config, model) if self.select_on == "per_size" else None
        self.best_slices, self.loaded_epoch = {}, None  # per-size slices of the weights load_weights read

    def _size_bests(self, config, model):
        if not hasattr(model, "network") or not hasattr(model.network, "size_slice"):
            raise InputError(f"fmrl_select_on=per_size: {config['model']} has no nested sizes (FMRLRec has)")
        if distributed.active(config):
            raise InputError("fmrl_select_on=per_size: not supported in multi-process training yet; use largest")
        return SizeBests(model.sizes, self.stopping_step, self.valid_metric_bigger)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None,
            on_evaluation=None):
        """Train with early stopping on validation; ``on_evaluation(record)`` after every validation.

        Returns ``(best_valid_score, best_valid_result)`` as RecBole's ``fit``. Training stops after the
        last epoch that is validated (an unvalidated tail could never be selected).
        """
        self.attach_schedule(train_data)  # before RecBole's own loop too (no validation)
        if self.eval_step <= 0 or not valid_data:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.eval_collector.data_collect(train_data)
        if (self.config["train_neg_sample_args"] or {}).get("dynamic", False):
            train_data.get_model(self.model)
        last_eval = (self.epochs // self.eval_step) * self.eval_step - 1
        for epoch in range(self.start_epoch, last_eval + 1):
            record = self._train_one_epoch(train_data, epoch, verbose, show_progress)
            if (epoch + 1) % self.eval_step:
                if saved:
                    self.save_last_checkpoint(epoch, train_data)
                continue
            stop = self._validate(valid_data, record, saved, verbose, show_progress)
            lr_zero = not stop and schedule_ended(self.scheduler, self.model)
            record["finished"] = ("early_stopped" if stop else "lr_zero" if lr_zero
                                  else "max_epochs" if epoch >= last_eval else "")
            if saved:  # before the hooks: a run killed from here on resumes after this epoch
                self.save_last_checkpoint(epoch, train_data, finished=record["finished"])
            if callback_fn:
                callback_fn(epoch, record["valid_score"])
            if on_evaluation:
                on_evaluation(record)
            if stop or lr_zero:
                if verbose:
                    why = "the learning rate schedule reached 0" if lr_zero else "early stopping"
                    self.logger.info(f"Finished training ({why}), best eval result in epoch {self.best_epoch}")
                    if self.size_bests is not None:
                        epochs = ", ".join(f"{m}: {e}" for m, e in self.size_bests.epochs().items())
                        self.logger.info(f"Each size's best epoch (fmrl_select_on=per_size): {epochs}")
                break
        self._add_hparam_to_tensorboard(self.best_valid_score)
        return self.best_valid_score, self.best_valid_result

    def attach_schedule(self, train_data):
        """The learning-rate schedule, once, when the number of steps per epoch is known."""
        if not self.schedule_attached and train_data is not None:
            self.scheduler = attach_schedule(self.optimizer, *self.schedule_settings, len(train_data))
            self.schedule_attached = True

    def _train_one_epoch(self, train_data, epoch, verbose, show_progress):
        self.best_slices = {}  # the weights move on: loaded slices no longer belong to them
        start, cpu = time.perf_counter(), time.process_time()
        loss = self._train_epoch(train_data, epoch, show_progress=show_progress)
        self.train_loss_dict[epoch] = sum(loss) if isinstance(loss, tuple) else loss
        end = time.perf_counter()
        if verbose:
            self.logger.info(self._generate_train_loss_output(epoch, start, end, loss))
        self._add_train_loss_to_tensorboard(epoch, loss)
        return {"epoch": epoch, "train_loss": float(self.train_loss_dict[epoch]), "train_seconds": end - start,
                "train_cpu_seconds": time.process_time() - cpu}

    def _validate(self, valid_data, record, saved, verbose, show_progress):
        """One validation: early-stopping bookkeeping, best checkpoint, and the record's valid fields."""
        start, cpu = time.perf_counter(), time.process_time()
        score, result = self._valid_epoch(valid_data, show_progress=show_progress)
        self.best_valid_score, self.cur_step, stop, improved = early_stopping(
            score, self.best_valid_score, self.cur_step, max_step=self.stopping_step, bigger=self.valid_metric_bigger)
        epoch = record["epoch"]
        improved_sizes = []
        if self.size_bests is not None and self.size_results:
            scores = {m: r[self.valid_metric] for m, r in self.size_results.items()}
            improved_sizes = self.size_bests.update(epoch, scores, self.model.network)
            stop = self.size_bests.exhausted()
            record["size_best_epochs"] = self.size_bests.epochs()
        record.update(valid_seconds=time.perf_counter() - start, valid_cpu_seconds=time.process_time() - cpu,
                      valid_score=float(score), valid_result=dict(result), size_results=self.size_results,
                      improved=bool(improved))
        if verbose:
            self.logger.info(set_color(f"epoch {epoch} evaluating", "green") + " [" + set_color("time", "blue")
                             + f": {record['valid_seconds']:.2f}s, " + set_color("valid_score", "blue") + f": {score:f}]")
            self.logger.info(set_color("valid result", "blue") + ": \n" + dict2str(result))
        self.tensorboard.add_scalar("Vaild_score", score, epoch)
        if improved:
            self.best_epoch, self.best_valid_result = epoch, result
            if saved:
                self._save_checkpoint(epoch, verbose=verbose)
        elif improved_sizes and saved and distributed.is_main():  # a smaller size's new best rides on the best file
            checkpoint.attach(self.saved_model_file, **{ENTRY: self.size_bests.state()})
        record.update(best_valid_score=float(self.best_valid_score), best_epoch=self.best_epoch)
        return stop

    def _valid_epoch(self, valid_data, show_progress=False):
        if self.valid_every_size:
            score, result = super()._valid_epoch(valid_data, show_progress)
            if self.size_results and self.select_on in ("mean", "geomean"):
                score = select_score([r[self.valid_metric] for r in self.size_results.values()], self.select_on)
            return score, result
        self.size_results = None
        result = distributed.evaluate_plain(self, valid_data) if distributed.active(self.config) else \
            Trainer.evaluate(self, valid_data, load_best_model=False, show_progress=show_progress)
        return result[self.valid_metric], result

    def _build_optimizer(self, **kwargs):
        learner = kwargs.get("learner", self.learner).lower()
        weight_decay = kwargs.get("weight_decay", self.weight_decay)
        if learner != "adamw" or not weight_decay or "params" in kwargs:
            return super()._build_optimizer(**kwargs)
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or any(m in name for m in NO_DECAY_MARKERS) else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return optim.AdamW(groups, lr=kwargs.get("learning_rate", self.learning_rate))

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        if not distributed.is_main():
            return
        checkpoint.save(path, config=self.config, state_dict=self.model.state_dict(), epoch=epoch,
                        cur_step=self.cur_step, best_valid_score=self.best_valid_score,
                        optimizer=self.optimizer.state_dict(), other_parameter=self.model.other_parameter(),
                        export=self.model.export_info() if hasattr(self.model, "export_info") else None,
                        dataset_sha256=self.dataset_sha256, **self._size_best_entry())
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def save_last_checkpoint(self, epoch, train_data=None, finished="", path=None):
        """The "last" checkpoint (beside the best one, atomically): weights, optimiser, scheduler, early
        stopping and every random generator, so that a resumed run continues bit for bit."""
        path = path or checkpoint.last_path(self.saved_model_file)
        if not distributed.is_main():  # multi-process runs: rank 0 writes
            return path
        scheduler = self.scheduler
        resume = {
            "best_epoch": int(self.best_epoch), "finished": str(finished or ""),
            "best_valid_result": checkpoint.plain(dict(self.best_valid_result or {})) or None,
            "train_loss": [[int(e), float(v)] for e, v in self.train_loss_dict.items()],
            "best_file": os.path.basename(self.saved_model_file), "rng": checkpoint.rng_state(train_data),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            **self._size_best_entry(),
        }
        checkpoint.save(path, config=self.config, state_dict=self.model.state_dict(), epoch=epoch,
                        cur_step=self.cur_step, best_valid_score=self.best_valid_score,
                        optimizer=self.optimizer.state_dict(), other_parameter=self.model.other_parameter(),
                        export=None, resume=resume, dataset_sha256=self.dataset_sha256)
        return path

    def _size_best_entry(self):
        return {ENTRY: self.size_bests.state()} if self.size_bests is not None else {}

    def resume_checkpoint(self, resume_file, train_data=None):
        """Continue from a checkpoint: a last one (``save_last_checkpoint``) restores everything, the
        best one (RecBole's way) weights, optimiser and early-stopping counters only."""
        state = checkpoint.load(resume_file, self.device)
        check_resumable(state, self.config, resume_file, self.dataset_sha256)
        resume = state.get("resume")
        self.saved_model_file = str(checkpoint.best_path(resume_file) if resume else resume_file)
        self.start_epoch, self.cur_step = state["epoch"] + 1, state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.attach_schedule(train_data)  # before the optimiser's state: that restores the scheduled lr
        self.optimizer.load_state_dict(state["optimizer"])
        if resume:
            self._restore_loop_state(resume, train_data)
        self.logger.info(f"Checkpoint {resume_file} loaded. Resume training from epoch {self.start_epoch}")

    def _restore_loop_state(self, resume, train_data):
        self.best_epoch = resume["best_epoch"]
        self.best_valid_result = OrderedDict(resume["best_valid_result"]) if resume["best_valid_result"] else None
        self.train_loss_dict = {int(e): float(v) for e, v in resume["train_loss"]}
        if self.scheduler is not None and resume.get("scheduler") is not None:
            self.scheduler.load_state_dict(resume["scheduler"])
        checkpoint.set_rng_state(resume["rng"], train_data)
        if self.size_bests is not None and resume.get(ENTRY):
            self.size_bests.load_state(resume[ENTRY])
        if resume["finished"] in ("early_stopped", "lr_zero"):  # nothing left to train: evaluate the best checkpoint
            self.start_epoch = self.epochs

    def load_weights(self, model_file=None):
        path = model_file or self.saved_model_file
        state = checkpoint.load(path, self.device) if distributed.is_main() else {}  # rank 0 reads, broadcasts
        if state:
            self.model.load_state_dict(state["state_dict"])
        self.best_slices, self.loaded_epoch = slices_of(state), state.get("epoch")
        self.model.load_other_parameter(distributed.broadcast_weights(self.model, state.get("other_parameter")))
        self.logger.info(f"Loading model structure and parameters from {path}")

    def _size_collector(self):
        """A collector for one size, with the training statistics ``fit`` gave the trainer's own collector
        (``data_collect``: item counts for ItemCoverage, AveragePopularity, GiniIndex, TailPercentage)."""
        collector = StatsCollector(self.config)
        for key in ("data.num_items", "data.num_users", "data.count_items", "data.count_users"):
            if collector.register.need(key):
                if key not in self.eval_collector.data_struct:
                    raise InputError(f"metrics: {', '.join(self.config['metrics'])} need training statistics "
                                     f"({key}); evaluate through driver.prepare or after fit")
                collector.data_struct.set(key, self.eval_collector.data_struct.get(key))
        return collector

    def _full_sort_batch_eval(self, batched_data):  # RecBole's path (baselines, single-size models)
        interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
        if self.mask_history and hasattr(self.model, "ITEM_SEQ"):
            mask_history(scores, interaction[self.model.ITEM_SEQ].to(scores.device))
        return interaction, scores, positive_u, positive_i

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self.load_weights(model_file)
        if not (hasattr(self.model, "full_sort_predict_sizes") and isinstance(eval_data, FullSortEvalDataLoader)):
            self.size_results = None
            if distributed.active(self.config):  # RecBole's own pads the user list (PR 1872)
                return distributed.evaluate_plain(self, eval_data)
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        self.model.eval()
        sizes = self.model.sizes
        collectors = [self._size_collector() for _ in sizes]
        for weights, members in self._weight_groups(sizes):
            with pasted(self.model.network, weights):
                self._collect(eval_data, [collectors[i] for i in members], members, show_progress)
        distributed.merge_collected(collectors, self.config)  # every rank: all users, in batch order
        self.size_results = OrderedDict()
        for size, collector in zip(sizes, collectors):
            collector.model_collect(self.model)
            self.size_results[size] = self.evaluator.evaluate(collector.get_data_struct())
        result = self.size_results[sizes[-1]]
        self.wandblogger.log_eval_metrics(result, head="eval")
        return result

    def _weight_groups(self, sizes):
        """[(slice or None, size indices)]: the sizes the loaded weights serve, then each size whose own
        best epoch (per-size selection) differs, with its slice."""
        own = [(i, self.best_slices[m]) for i, m in enumerate(sizes) if m in self.best_slices
               and self.best_slices[m][0] != self.loaded_epoch]
        shared = [i for i in range(len(sizes)) if i not in {j for j, _ in own}]
        return ([(None, shared)] if shared else []) + [(weights, [i]) for i, (_, weights) in own]

    def _collect(self, eval_data, collectors, members, show_progress):
        """One pass over ``eval_data``: every size's scores, collected for the sizes ``members``."""
        batches = distributed.eval_batches(eval_data, self.config)  # this process's share of the batches
        batches = tqdm(batches, total=len(eval_data), ncols=100, desc=set_color("Evaluate   ", "pink")) \
            if show_progress else batches
        for interaction, history_index, positive_u, positive_i in batches:
            interaction = interaction.to(self.device)
            scores = self.model.full_sort_predict_sizes(interaction)  # [K B N+1]
            scores[..., 0] = -torch.inf
            if history_index is not None:
                scores[:, history_index[0], history_index[1]] = -torch.inf
            if self.mask_history:
                mask_history(scores, interaction[self.model.ITEM_SEQ])
            for collector, i in zip(collectors, members):
                collector.eval_batch_collect(scores[i], interaction, positive_u, positive_i)
