import math

import numpy as np
import pytest

from vislearn.config import ConfigError
from vislearn.models.dann import grl_lambda
from vislearn.optimizers import DANNAnnealing, WarmupCosine, build_optimizer


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999, 1000, 5000])
def test_dann_annealing_matches_closed_form(step):
    schedule = DANNAnnealing(0.01, alpha=10.0, beta=0.75, decay_steps=1000)
    p = min(step / 1000, 1.0)
    assert float(schedule(step)) == pytest.approx(0.01 / (1 + 10 * p) ** 0.75, rel=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_grl_lambda_matches_closed_form(p):
    assert float(grl_lambda(p, 10.0)) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1, abs=1e-6)


def test_warmup_cosine_shape():
    schedule = WarmupCosine(0.1, warmup_steps=10, decay_steps=110)
    values = np.array([float(schedule(s)) for s in (0, 5, 10, 60, 110)])
    np.testing.assert_allclose(values, [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-6)


def test_build_optimizer_fills_decay_steps_and_rejects_unknown_names():
    optimizer = build_optimizer({"name": "sgd", "learning_rate": 0.01, "momentum": 0.9,
                                 "schedule": {"name": "dann", "decay_steps": None}}, total_steps=400)
    assert optimizer._learning_rate.decay_steps == 400
    # Left out is the same as null: the schedule spans the run, not the class default.
    optimizer = build_optimizer({"name": "adam", "learning_rate": 0.002,
                                 "schedule": {"name": "cosine", "warmup_steps": 0}}, total_steps=512)
    assert optimizer._learning_rate.decay_steps == 512
    optimizer = build_optimizer({"name": "adam", "schedule": {"name": "cosine", "decay_steps": 1000}}, 512)
    assert optimizer._learning_rate.decay_steps == 1000
    with pytest.raises(ConfigError, match="did you mean 'sgd'"):
        build_optimizer({"name": "sdg"}, 10)


def test_warmup_step_follows_yolo_v1_schedule():
    """YOLOv1's VOC schedule: warm-up 1e-3 -> 1e-2, then 1e-2, 1e-3, 1e-4 (fractions of the run)."""
    from vislearn.optimizers import WarmupStep, build_schedule

    schedule = build_schedule({"name": "warmup_step", "initial_learning_rate": 0.01, "warmup_steps": 100,
                               "boundaries": [0.5, 0.75], "factors": [0.1, 0.01], "decay_steps": None}, 1000)
    assert isinstance(schedule, WarmupStep) and schedule.decay_steps == 1000
    rates = [float(schedule(step)) for step in (0, 50, 100, 499, 500, 749, 750, 999)]
    np.testing.assert_allclose(rates, [1e-3, 5.5e-3, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-5)
    assert WarmupStep.from_config(schedule.get_config()).get_config() == schedule.get_config()
    with pytest.raises(ConfigError, match="boundaries: expected increasing fractions"):
        WarmupStep(boundaries=(0.8, 0.5), factors=(0.1, 0.01))
