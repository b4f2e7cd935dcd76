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
    with pytest.raises(ConfigError, match="did you mean 'sgd'"):
        build_optimizer({"name": "sdg"}, 10)
