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
    call `signature` with `inputs_code` (a Python expression of keyword
    arguments), and return the outputs as lists plus whether vislearn was imported."""
    result = call_in_fresh_process({"call": (str(export_dir), signature, f"dict({inputs_code})")})
    assert "error" not in result["call"], result["call"]
    return {"outputs": result["call"], "vislearn_imported": result["vislearn_imported"]}


def call_in_fresh_process(calls):
    """Run {label: (export dir, signature, inputs code)} in ONE new process that
    imports only TensorFlow (one process: TensorFlow's import dominates the
    cost). Returns {label: {output: list} or {"error": message}} and
    "vislearn_imported"."""
    script = f"""
import json, sys
import numpy as np
import tensorflow as tf
out, loaded = {{}}, {{}}
for label, (path, signature, code) in {calls!r}.items():
    loaded.setdefault(path, tf.saved_model.load(path))
    try:
        result = loaded[path].signatures[signature](**eval(code))
        out[label] = {{k: v.numpy().tolist() if v.dtype != tf.string else
                      np.char.decode(v.numpy().astype(bytes)).tolist() for k, v in result.items()}}
    except tf.errors.InvalidArgumentError as error:
        out[label] = {{"error": error.message}}
out["vislearn_imported"] = "vislearn" in sys.modules
print(json.dumps(out))
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


def run_cli(*args, env=None, timeout=600, cwd=None, fresh_process=False):
    """Run `vislearn ARGS...`; returns a CompletedProcess (returncode, stdout, stderr).

    By default in this process through click's CliRunner: a new process costs
    ~10 s of TensorFlow start-up, and the suite runs the CLI dozens of times.
    `fresh_process=True` (or `cwd`) runs the real console command instead.
    An exception the CLI lets escape shows as a traceback in stderr and
    return code 1, as it would in a terminal.
    """
    if fresh_process or cwd is not None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run([*VISLEARN, *map(str, args)], capture_output=True, text=True,
                              env=full_env, timeout=timeout, cwd=cwd or REPO)
    import traceback

    from click.testing import CliRunner

    from vislearn.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def fit_on_two_workers(fit_args, run_dir):
    """`vislearn FIT_ARGS... --strategy multi_worker` as two local worker
    processes (TF_CONFIG); checks both exit 0 and the run dir is the chief's
    alone. Returns the chief's stderr."""
    import socket

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen([*VISLEARN, *map(str, fit_args), "--strategy", "multi_worker"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    assert "CollectiveAllReduceStrategy" in outputs[0][1]  # MultiWorkerMirroredStrategy
    history = (Path(run_dir) / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]
    assert (Path(run_dir) / "checkpoints" / "last.weights.h5").exists()
    assert not (Path(run_dir) / "workers").exists() or not any((Path(run_dir) / "workers").iterdir())
    return outputs[0][1]


def quick_fit_args(root, run_dir, epochs=1, steps=2):
    """`fit` arguments for a seconds-long DANN run on the session's data."""
    return ["fit", "dann_digits", "--run-dir", run_dir, "--set", f"data.root={root}",
            "--set", f"train.epochs={epochs}", "--set", f"train.steps_per_epoch={steps}",
            "--set", "data.batch_size=32"]


def tiny_yolo_v1_overrides(n_train=16, n_test=8, image=64, epochs=1, steps=2):
    """`--set` values shrinking the `yolo_shapes` recipe to a seconds-long run
    (a 4x4 grid behind a 32-wide fc head, no pretraining step; steps=None:
    whole epochs)."""
    overrides = ["model.backbone.pretrain=null", "model.fc_units=32", "model.grid_size=4", "model.head=fc",
                 f"data.image_size=[{image},{image}]", "data.batch_size=8", f"data.n_train={n_train}",
                 f"data.n_test={n_test}", "data.source_size=96", f"train.epochs={epochs}"]
    return overrides + ([f"train.steps_per_epoch={steps}"] if steps else [])


def as_set_args(overrides):
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for override in overrides for arg in ("--set", override)]


# ---------------------------------------------------------------- mirrored fits, all in one process
#
# Every method's recipe must fit under MirroredStrategy on two logical CPUs, and
# that needs a process of its own (logical devices are fixed when TensorFlow
# starts). One subprocess per method cost ~25-45 s each, mostly start-up, so
# test modules register their fit here at import and the session fixture
# `mirrored_runs` (conftest.py) runs all of them in ONE subprocess.

MIRRORED_FITS = {}


def register_mirrored_fit(name, recipe, overrides, make_data=None, fixtures=()):
    """Ask for `vislearn fit RECIPE --strategy mirrored --set OVERRIDES...`.

    make_data: optional `(data_dir, **fixtures) -> root`; its result is passed
        as `data.root`. fixtures: names of session fixtures it needs.
    The run lands in `mirrored_runs[name] / "run"`, the data in `.../data`.
    """
    MIRRORED_FITS[name] = {"recipe": recipe, "overrides": list(overrides), "make_data": make_data,
                           "fixtures": tuple(fixtures)}


MIRRORED_SCRIPT = """
import json, logging, sys, traceback
logging.basicConfig(level=logging.INFO, format="%(message)s")
from vislearn import recipes
jobs, results = json.loads(sys.argv[1]), {}
for name, job in jobs.items():
    try:
        config, source = recipes.load_recipe(job["recipe"], job["overrides"])
        recipes.fit(config, source, job["run_dir"], "mirrored", verbose=0)
        results[name] = "ok"
    except BaseException:
        results[name] = traceback.format_exc()[-3000:]
print(json.dumps(results))
"""


def run_mirrored_fits(root, fixture_value):
    """Run every registered fit in one subprocess; returns {name: (run root, error or None, stderr)}."""
    jobs = {}
    for name, job in MIRRORED_FITS.items():
        job_root = Path(root) / name
        job_root.mkdir(parents=True, exist_ok=True)
        overrides = list(job["overrides"])
        if job["make_data"] is not None:
            kwargs = {f: fixture_value(f) for f in job["fixtures"]}
            overrides.append(f"data.root={job['make_data'](job_root / 'data', **kwargs)}")
        jobs[name] = {"recipe": job["recipe"], "overrides": overrides, "run_dir": str(job_root / "run")}
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(jobs)], capture_output=True,
                            text=True, timeout=1200, env=dict(os.environ, VISLEARN_LOGICAL_CPUS="2"), cwd=REPO)
    try:
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        outcome = {name: f"the mirrored-fit process failed: {result.stderr[-3000:]}" for name in jobs}
    return {name: (Path(root) / name, None if outcome.get(name) == "ok" else outcome.get(name, "no result"),
                   result.stderr) for name in jobs}


def mirrored_run(runs, name):
    """The run root of a registered fit, after checking it trained under MirroredStrategy."""
    root, error, log = runs[name]
    assert error is None, error
    assert f"run in {root / 'run'} (MirroredStrategy)" in log, log[-3000:]
    return root
