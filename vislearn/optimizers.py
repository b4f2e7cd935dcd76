"""Optimizers and learning-rate schedules, built by name from a recipe.

`OPTIMIZERS` and `SCHEDULES` are the explicit name -> class mappings recipes
use. Schedules whose length is the run's length take `decay_steps: null`,
which `build_optimizer` fills with the total number of training steps.
"""

import keras
from keras import ops

from vislearn.config import ConfigError, pick


@keras.saving.register_keras_serializable(package="vislearn")
class DANNAnnealing(keras.optimizers.schedules.LearningRateSchedule):
    """DANN's annealing: mu_p = mu_0 / (1 + alpha * p) ** beta, p = step / decay_steps.

    Args:
        initial_learning_rate: mu_0 (paper: 0.01).
        alpha: paper: 10.
        beta: paper: 0.75.
        decay_steps: steps over which p runs from 0 to 1 (the whole run).

    Reference:
        Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016.
    """

    def __init__(self, initial_learning_rate=0.01, alpha=10.0, beta=0.75, decay_steps=1000):
        self.initial_learning_rate = float(initial_learning_rate)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.decay_steps = int(decay_steps)

    def __call__(self, step):
        progress = ops.minimum(ops.cast(step, "float32") / self.decay_steps, 1.0)
        return self.initial_learning_rate / ops.power(1.0 + self.alpha * progress, self.beta)

    def get_config(self):
        return dict(initial_learning_rate=self.initial_learning_rate, alpha=self.alpha,
                    beta=self.beta, decay_steps=self.decay_steps)


@keras.saving.register_keras_serializable(package="vislearn")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `initial_learning_rate`, then cosine decay to 0."""

    def __init__(self, initial_learning_rate=0.1, warmup_steps=0, decay_steps=1000):
        self.initial_learning_rate = float(initial_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.initial_learning_rate * step / max(self.warmup_steps, 1)
        span = max(self.decay_steps - self.warmup_steps, 1)
        done = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = 0.5 * self.initial_learning_rate * (1.0 + ops.cos(3.141592653589793 * done))
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return dict(initial_learning_rate=self.initial_learning_rate,
                    warmup_steps=self.warmup_steps, decay_steps=self.decay_steps)


@keras.saving.register_keras_serializable(package="vislearn")
class WarmupStep(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then a step schedule with boundaries as fractions of the run.

    The rate rises linearly from `warmup_factor * initial_learning_rate` to
    `initial_learning_rate` over `warmup_steps`, stays there, and is
    multiplied by `factors[k]` from step `boundaries[k] * decay_steps` on.
    Fractions keep a recipe valid whatever the dataset size; YOLOv1's VOC
    schedule (135 epochs: warm-up from 1e-3 to 1e-2, 1e-2 until epoch 75 after
    the warm-up, 1e-3 for 30 epochs, 1e-4 for 30) is `warmup_factor: 0.1`,
    `boundaries: [0.56, 0.78]`, `factors: [0.1, 0.01]`.

    Args:
        initial_learning_rate: the rate after warm-up.
        warmup_steps: length of the linear warm-up.
        warmup_factor: the starting rate as a fraction of `initial_learning_rate`.
        boundaries: increasing fractions of `decay_steps` in (0, 1).
        factors: multipliers of `initial_learning_rate` from each boundary on.
        decay_steps: the run's length in steps (`null` in a recipe: filled in).

    Reference:
        Redmon et al., "You Only Look Once: Unified, Real-Time Object
        Detection", CVPR 2016, section 2.2.
    """

    def __init__(self, initial_learning_rate=0.01, warmup_steps=0, warmup_factor=0.1,
                 boundaries=(0.56, 0.78), factors=(0.1, 0.01), decay_steps=1000):
        if len(boundaries) != len(factors):
            raise ConfigError(f"optimizer.schedule: boundaries {list(boundaries)} and factors {list(factors)} "
                              "must have the same length")
        if list(boundaries) != sorted(boundaries) or any(not 0 < b < 1 for b in boundaries):
            raise ConfigError(f"optimizer.schedule.boundaries: expected increasing fractions of the run in (0, 1), "
                              f"received {list(boundaries)}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.boundaries = [float(b) for b in boundaries]
        self.factors = [float(f) for f in factors]
        self.decay_steps = int(decay_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.ones_like(step) * self.initial_learning_rate
        for boundary, factor in zip(self.boundaries, self.factors):
            rate = ops.where(step >= boundary * self.decay_steps, self.initial_learning_rate * factor, rate)
        progress = ops.clip(step / max(self.warmup_steps, 1), 0.0, 1.0)
        warm = self.initial_learning_rate * (self.warmup_factor + (1.0 - self.warmup_factor) * progress)
        return ops.where(step < self.warmup_steps, warm, rate)

    def get_config(self):
        return dict(initial_learning_rate=self.initial_learning_rate, warmup_steps=self.warmup_steps,
                    warmup_factor=self.warmup_factor, boundaries=self.boundaries, factors=self.factors,
                    decay_steps=self.decay_steps)


def _constant(initial_learning_rate=0.001):
    return float(initial_learning_rate)


SCHEDULES = {
    "constant": _constant,
    "dann": DANNAnnealing,
    "cosine": WarmupCosine,
    "piecewise": keras.optimizers.schedules.PiecewiseConstantDecay,
    "warmup_step": WarmupStep,
}

OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
}


def build_schedule(spec, total_steps, where="optimizer.schedule"):
    spec = dict(spec)
    name = spec.pop("name", "constant")
    builder = pick(SCHEDULES, name, f"{where}.name")
    if "decay_steps" in spec and spec["decay_steps"] is None:
        spec["decay_steps"] = int(total_steps)
    return builder(**spec)


def build_optimizer(spec, total_steps):
    """`{"name": "sgd", "learning_rate": 0.01, "schedule": {...}, ...}` -> optimizer."""
    spec = dict(spec)
    name = spec.pop("name", "adam")
    builder = pick(OPTIMIZERS, name, "optimizer.name")
    schedule = spec.pop("schedule", None)
    if schedule:
        schedule = dict(schedule)
        schedule.setdefault("initial_learning_rate", spec.get("learning_rate", 0.001))
        spec["learning_rate"] = build_schedule(schedule, total_steps)
    return builder(**spec)
