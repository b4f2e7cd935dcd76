"""benchmarks/serving.py runs end to end (short windows, short soak) and fails no request."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"


@pytest.mark.slow
def test_benchmark_short_soak(base):
    spec = importlib.util.spec_from_file_location("serving_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--model", f"classifier={base / 'classifier'}", "--seconds", "1", "--soak-seconds", "3",
                           "--calls", "20", "--clients", "8", "--json", "--threads", "0"])
    assert results["soak_failed"] == 0 and results["batching_on_failures"] == 0
    assert results["batching_off_failures"] == 0 and results["soak_requests"] > 0
    assert results["soak_p99_ms"] >= results["soak_p50_ms"] > 0
    assert set(results["in_process_ms_per_image"]) == {1, 8, 32} and results["graph_batching_ceiling"] > 0
