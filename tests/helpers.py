"""Test helpers shared across the suite (round-trips, fresh-process loads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

REPO = Path(__file__).resolve().parent.parent
VISLEARN = [sys.executable, "-m", "vislearn.cli"]


def layer_round_trip(layer, inputs):
    """A layer rebuilt from its config gives the same outputs."""
    clone = layer.__class__.from_config(layer.get_config())
    np.testing.assert_allclose(np.asarray(layer(inputs)), np.asarray(clone(inputs)), rtol=1e-6)
    return clone


def load_in_fresh_process(export_dir, signature, inputs_code):
    """Load a SavedModel in a new Python process that imports only TensorFlow,
    call `signature` with `inputs_code` (a Python expression), and return the
    outputs as lists plus whether vislearn/keras were imported."""
    script = f"""
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load({str(export_dir)!r})
fn = loaded.signatures[{signature!r}]
outputs = fn({inputs_code})
print(json.dumps({{"outputs": {{k: v.numpy().tolist() if v.dtype != tf.string else [x.decode() for x in v.numpy().ravel()]
                                for k, v in outputs.items()}},
                  "vislearn_imported": "vislearn" in sys.modules}}))
"""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(script)  # a file, not -c: the inputs can exceed argv limits
    result = subprocess.run([sys.executable, file.name], capture_output=True, text=True, timeout=300)
    os.unlink(file.name)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def count_params(model):
    return int(sum(np.prod(w.shape) for w in model.weights))


def two_step_fit(model, dataset, **compile_kwargs):
    """Compile and fit two steps; returns the history dict."""
    model.compile(**({"optimizer": keras.optimizers.SGD(0.01)} | compile_kwargs))
    return model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0).history


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `vislearn ARGS...` in a fresh process; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([*VISLEARN, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO)


def quick_fit_args(root, run_dir, epochs=1, steps=2):
    """`fit` arguments for a seconds-long DANN run on the session's data."""
    return ["fit", "dann_digits", "--run-dir", run_dir, "--set", f"data.root={root}",
            "--set", f"train.epochs={epochs}", "--set", f"train.steps_per_epoch={steps}",
            "--set", "data.batch_size=32"]
