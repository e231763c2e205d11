"""Learning-rate schedule: linear warm-up, then constant or cosine decay, stepped after every optimiser step.

The fMRLRec reference trains with ``get_cosine_schedule_with_warmup`` (100 warm-up steps, cosine over
500 epochs' steps, so it barely decays before early stopping); ``fmrl_lr_warmup_steps`` and
``fmrl_lr_decay_epochs`` give that schedule and shorter ones. Unlike that function, the multiplier
stays at 0 once the decay ends (the cosine does not climb back), and the trainer ends the run there:
later epochs could not change the weights, only repeat the last validation score for ``stopping_step``
epochs.
Both keys default to 0 (properties/overall.yaml): RecBole's constant learning rate.
"""
import math

from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """The learning-rate multiplier at optimiser step ``step`` (a LambdaLR lambda; its fields are saved
    in the scheduler's state, so a resumed run continues the same curve)."""

    def __init__(self, warmup_steps, decay_epochs, steps_per_epoch):
        self.warmup_steps, self.decay_epochs, self.steps_per_epoch = warmup_steps, decay_epochs, steps_per_epoch

    def __call__(self, step):
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if not self.decay_epochs:
            return 1.0
        decay_steps = self.decay_epochs * self.steps_per_epoch - self.warmup_steps
        if decay_steps <= 0:
            return 0.0
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def ended(self, step):
        """True when the multiplier is 0 at ``step`` and every later step: training can change nothing more."""
        return bool(self.decay_epochs) and step >= max(self.warmup_steps, self.decay_epochs * self.steps_per_epoch)


def attach_schedule(optimizer, warmup_steps, decay_epochs, steps_per_epoch):
    """A LambdaLR over ``optimizer`` that steps itself after every ``optimizer.step()``; None when both
    ``fmrl_lr_warmup_steps`` and ``fmrl_lr_decay_epochs`` are 0 (RecBole's constant learning rate)."""
    if not warmup_steps and not decay_epochs:
        return None
    scheduler = LambdaLR(optimizer, WarmupCosine(warmup_steps, decay_epochs, steps_per_epoch))
    # a post-step hook rather than a call in the loop: RecBole's _train_epoch stays untouched, and a step
    # the AMP grad scaler skips (inf gradients) does not advance the schedule
    optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: scheduler.step())
    return scheduler


def schedule_ended(scheduler, model):
    """Has the schedule brought the learning rate to 0 for good? Then no later step changes the weights
    (the optimiser's update and its decoupled weight decay both scale with it), unless the model keeps
    running statistics (batch norm), which move in training mode whatever the rate."""
    if scheduler is None or any(getattr(m, "track_running_stats", False) for m in model.modules()):
        return False
    return all(getattr(f, "ended", lambda _step: False)(scheduler.last_epoch) for f in scheduler.lr_lambdas)
