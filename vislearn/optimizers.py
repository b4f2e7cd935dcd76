"""Optimizers and learning-rate schedules, built by name from a recipe.

`OPTIMIZERS` and `SCHEDULES` are the explicit name -> class mappings recipes
use. Schedules whose length is the run's length take `decay_steps: null`,
which `build_optimizer` fills with the total number of training steps.
"""

import inspect
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


@keras.saving.register_keras_serializable(package="vislearn")
class LARS(keras.optimizers.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (LARS), as SimCLR trains.

    Every weight tensor's step is scaled by eta * ||w|| / ||g + wd * w||, so a
    layer moves by a fixed fraction of its norm whatever its gradient's scale,
    which keeps very large batches stable. Rank-0/1 weights (biases and
    batch-norm scales/offsets) get neither weight decay nor the trust ratio,
    as in SimCLR's implementation:

        g = grad + weight_decay * w                 (matrices and kernels only)
        r = eta * ||w|| / ||g||  (1 if either norm is 0; 1 for vectors)
        v = momentum * v + learning_rate * r * g
        w = w - v

    The paper's learning rate is 0.3 * global_batch / 256 (linear scaling,
    with warm-up then cosine decay: `schedule: {name: cosine, warmup_steps: ...}`);
    for small batches it notes that 0.075 * sqrt(global_batch) works better.
    vislearn does not rescale `learning_rate`: the recipe states the value.

    Args:
        learning_rate: float or schedule.
        momentum: 0.9 in SimCLR.
        weight_decay: 1e-6 in SimCLR (coupled: added to the gradient).
        eta: trust coefficient, 0.001.
        epsilon: guards the ratio's division.

    Reference:
        You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks",
        2017; Chen et al., SimCLR, ICML 2020, appendix B.1.
    """

    def __init__(self, learning_rate=0.3, momentum=0.9, weight_decay=1e-6, eta=0.001, epsilon=1e-9,
                 name="lars", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0 <= float(momentum) < 1:
            raise ConfigError(f"optimizer.momentum: expected a value in [0, 1), received {momentum}")
        self.momentum = float(momentum)
        self.weight_decay_rate = float(weight_decay)  # not the base class's decoupled `weight_decay`
        self.eta = float(eta)
        self.epsilon = float(epsilon)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = self.add_optimizer_variables(variables, "velocity")

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        velocity = self.velocities[self._get_variable_index(variable)]
        if len(variable.shape) > 1:
            gradient = gradient + self.weight_decay_rate * variable
            weight_norm = ops.sqrt(ops.sum(ops.square(variable)))
            gradient_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            ratio = ops.where(ops.logical_and(weight_norm > 0, gradient_norm > 0),
                              self.eta * weight_norm / (gradient_norm + self.epsilon), 1.0)
            learning_rate = learning_rate * ratio
        self.assign(velocity, self.momentum * velocity + learning_rate * gradient)
        self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.weight_decay_rate, eta=self.eta,
                      epsilon=self.epsilon)
        return config


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
    "lars": LARS,
}


def build_schedule(spec, total_steps, where="optimizer.schedule"):
    spec = dict(spec)
    name = spec.pop("name", "constant")
    builder = pick(SCHEDULES, name, f"{where}.name")
    # decay_steps null or left out: the whole run (a builder default such as 1000 would not scale with it).
    if spec.get("decay_steps") is None and "decay_steps" in inspect.signature(builder).parameters:
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
