"""The CLI contract end to end: fit, resume after a kill, evaluate, export, predict."""

import json
import signal
import subprocess
import time

import pytest
import yaml

from helpers import VISLEARN, REPO, quick_fit_args, run_cli


@pytest.fixture(scope="module")
def trained_run(digits_m_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "dann"
    # The real console command in its own process (elsewhere the suite runs the CLI in-process).
    result = run_cli(*quick_fit_args(digits_m_root, run_dir, epochs=1, steps=3), fresh_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_run_dir_contents(trained_run):
    for name in ("recipe.yaml", "history.csv", "metrics.json", "plots/history.png",
                 "checkpoints/best.weights.h5", "checkpoints/last.weights.h5"):
        assert (trained_run / name).exists(), name
    assert list((trained_run / "logs").rglob("events.out.tfevents.*"))
    recipe = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    # The resolved recipe carries the overrides and what vislearn derived.
    assert recipe["train"]["epochs"] == 1 and recipe["model"]["num_classes"] == 10
    assert recipe["model"]["total_steps"] == 3


def test_evaluate_json_prints_the_metrics_keys(trained_run):
    result = run_cli("evaluate", trained_run, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"accuracy", "source_accuracy", "domain_accuracy"}
    assert metrics == pytest.approx(json.loads((trained_run / "metrics.json").read_text()), abs=1e-6)
    # The representation protocol's metrics belong to encoders' runs, not to a DANN run.
    result = run_cli("evaluate", trained_run, "--protocol", "knn")
    assert result.returncode == 2 and "--protocol knn expected a run scored by the representation protocol " \
        "(knn_top1); this run's metrics are ['accuracy', 'domain_accuracy', 'source_accuracy']" in result.stderr


def test_finished_run_and_other_recipe_are_refused_without_loss(trained_run, digits_m_root):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    args = quick_fit_args(digits_m_root, trained_run, epochs=1, steps=3)
    result = run_cli(*args)
    assert result.returncode == 2 and "holds a finished run" in result.stderr, result.stderr[-2000:]
    result = run_cli(*args, "--set", "model.mode=source_only")
    assert result.returncode == 2 and "run of another recipe (model.mode: 'dann' -> 'source_only')" in result.stderr
    after = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    assert before == after


def test_unknown_strategy_and_missing_checkpoint(tmp_path, digits_m_root):
    result = run_cli(*quick_fit_args(digits_m_root, tmp_path / "r"), "--strategy", "mirorred")
    assert result.returncode == 2 and "--strategy: unknown value 'mirorred' (did you mean 'mirrored'?)" in result.stderr
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "recipe.yaml").write_text((REPO / "recipes" / "dann_digits.yaml").read_text())
    result = run_cli("export", tmp_path / "empty_run", "--out", tmp_path / "exports")
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "exports").exists()


def test_killed_fit_resumes_at_the_next_epoch(digits_m_root, tmp_path):
    run_dir = tmp_path / "killed"
    args = quick_fit_args(digits_m_root, run_dir, epochs=3, steps=40)
    process = subprocess.Popen([*VISLEARN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=REPO)
    history = run_dir / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(history.read_text().splitlines()) == 2, "the kill must land during epoch 2"
    assert not (run_dir / "metrics.json").exists()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    epochs_run = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs_run == ["2/3", "3/3"]
    rows = history.read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]
    assert (run_dir / "metrics.json").exists() and not (run_dir / "backup").exists()
