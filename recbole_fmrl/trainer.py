"""FMRLTrainer: RecBole's Trainer with per-size evaluation, safe checkpoints and tidy outputs.

- Models with ``full_sort_predict_sizes`` are evaluated at every nested size from one forward
  pass per batch; ``evaluate`` returns the largest size's metrics (early stopping uses them) and
  keeps all sizes in ``self.size_results``.
- Checkpoints reload under torch >= 2.6 (see ``checkpoint.py``).
- AdamW decays only weight matrices, not biases, norms or the LRU's log-parameters.
"""
from collections import OrderedDict

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch import optim
from tqdm import tqdm

from recbole_fmrl import checkpoint
from recbole_fmrl.outputs import tensorboard_under

NO_DECAY_MARKERS = ("bias", "ln1.", "ln2.", "norm", "params_log")


class FMRLTrainer(Trainer):
    def __init__(self, config, model):
        with tensorboard_under(config["fmrl_output_dir"]):
            super().__init__(config, model)
        self.size_results = None

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
                        optimizer=self.optimizer.state_dict(), other_parameter=self.model.other_parameter())
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
