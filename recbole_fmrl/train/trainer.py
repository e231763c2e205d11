"""FMRLTrainer: RecBole's Trainer with per-size evaluation, safe checkpoints and tidy outputs.

- ``fit`` is RecBole's loop (same early stopping, checkpoints and random numbers) opened up: every
  validation produces an epoch record (times, scores, per-size results) handed to ``on_evaluation``,
  which the CLI, Ray Tune trials and the benchmark harness use alike.
- Models with ``full_sort_predict_sizes`` are evaluated at every nested size from one forward
  pass per batch; ``evaluate`` returns the largest size's metrics (early stopping uses them) and
  keeps all sizes in ``self.size_results``.
- Checkpoints reload under torch >= 2.6 (see ``checkpoint.py``).
- AdamW decays only weight matrices, not biases, norms or the LRU's log-parameters.
"""
import time
from collections import OrderedDict

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector
from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, set_color
from torch import optim
from tqdm import tqdm

from recbole_fmrl.train import checkpoint
from recbole_fmrl.train.outputs import tensorboard_under

NO_DECAY_MARKERS = ("bias", "ln1.", "ln2.", "norm", "params_log")


class FMRLTrainer(Trainer):
    def __init__(self, config, model):
        with tensorboard_under(config["fmrl_output_dir"]):
            super().__init__(config, model)
        self.size_results = None
        self.best_epoch = -1
        # Per-epoch validation of every size costs K top-k sorts; early stopping reads the largest only.
        self.valid_every_size = bool(config["fmrl_valid_every_size"]) if "fmrl_valid_every_size" in config else True

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None,
            on_evaluation=None):
        """Train with early stopping on validation; ``on_evaluation(record)`` after every validation.

        Returns ``(best_valid_score, best_valid_result)`` as RecBole's ``fit``. Training stops after the
        last epoch that is validated (an unvalidated tail could never be selected).
        """
        if self.eval_step <= 0 or not valid_data:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self.eval_collector.data_collect(train_data)
        if (self.config["train_neg_sample_args"] or {}).get("dynamic", False):
            train_data.get_model(self.model)
        last_eval = (self.epochs // self.eval_step) * self.eval_step - 1
        for epoch in range(self.start_epoch, last_eval + 1):
            record = self._train_one_epoch(train_data, epoch, verbose, show_progress)
            if (epoch + 1) % self.eval_step:
                continue
            stop = self._validate(valid_data, record, saved, verbose, show_progress)
            record["finished"] = "early_stopped" if stop else ("max_epochs" if epoch >= last_eval else "")
            if callback_fn:
                callback_fn(epoch, record["valid_score"])
            if on_evaluation:
                on_evaluation(record)
            if stop:
                if verbose:
                    self.logger.info(f"Finished training, best eval result in epoch {self.best_epoch}")
                break
        self._add_hparam_to_tensorboard(self.best_valid_score)
        return self.best_valid_score, self.best_valid_result

    def _train_one_epoch(self, train_data, epoch, verbose, show_progress):
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
        record.update(valid_seconds=time.perf_counter() - start, valid_cpu_seconds=time.process_time() - cpu,
                      valid_score=float(score), valid_result=dict(result), size_results=self.size_results,
                      improved=bool(improved))
        if verbose:
            self.logger.info(set_color("epoch %d evaluating", "green") + " [" + set_color("time", "blue")
                             + f": {record['valid_seconds']:.2f}s, " + set_color("valid_score", "blue") + f": {score:f}]")
            self.logger.info(set_color("valid result", "blue") + ": \n" + dict2str(result))
        self.tensorboard.add_scalar("Vaild_score", score, epoch)
        if improved:
            self.best_epoch, self.best_valid_result = epoch, result
            if saved:
                self._save_checkpoint(epoch, verbose=verbose)
        record.update(best_valid_score=float(self.best_valid_score), best_epoch=self.best_epoch)
        return stop

    def _valid_epoch(self, valid_data, show_progress=False):
        if self.valid_every_size:
            return super()._valid_epoch(valid_data, show_progress)
        self.size_results = None
        result = Trainer.evaluate(self, valid_data, load_best_model=False, show_progress=show_progress)
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
        checkpoint.save(path, config=self.config, state_dict=self.model.state_dict(), epoch=epoch,
                        cur_step=self.cur_step, best_valid_score=self.best_valid_score,
                        optimizer=self.optimizer.state_dict(), other_parameter=self.model.other_parameter(),
                        export=self.model.export_info() if hasattr(self.model, "export_info") else None)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {path}")

    def resume_checkpoint(self, resume_file):
        self.saved_model_file = str(resume_file)
        state = checkpoint.load(resume_file, self.device)
        if state["config"]["model"].lower() != self.config["model"].lower():
            raise ValueError(f"{resume_file}: checkpoint of model {state['config']['model']}, not {self.config['model']}")
        self.start_epoch, self.cur_step = state["epoch"] + 1, state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def load_weights(self, model_file=None):
        path = model_file or self.saved_model_file
        state = checkpoint.load(path, self.device)
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.logger.info(f"Loading model structure and parameters from {path}")

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self.load_weights(model_file)
        if not (hasattr(self.model, "full_sort_predict_sizes") and isinstance(eval_data, FullSortEvalDataLoader)):
            self.size_results = None
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        self.model.eval()
        sizes = self.model.sizes
        collectors = [Collector(self.config) for _ in sizes]
        batches = tqdm(eval_data, total=len(eval_data), ncols=100, desc=set_color("Evaluate   ", "pink")) \
            if show_progress else eval_data
        for interaction, history_index, positive_u, positive_i in batches:
            interaction = interaction.to(self.device)
            scores = self.model.full_sort_predict_sizes(interaction)  # [K B N+1]
            scores[..., 0] = -torch.inf
            if history_index is not None:
                scores[:, history_index[0], history_index[1]] = -torch.inf
            for collector, size_scores in zip(collectors, scores):
                collector.eval_batch_collect(size_scores, interaction, positive_u, positive_i)
        self.size_results = OrderedDict()
        for size, collector in zip(sizes, collectors):
            collector.model_collect(self.model)
            self.size_results[size] = self.evaluator.evaluate(collector.get_data_struct())
        result = self.size_results[sizes[-1]]
        self.wandblogger.log_eval_metrics(result, head="eval")
        return result
