"""`make demo`'s script end to end (one epoch): every step a user sees must work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DEMO_EPOCHS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    out = tmp_path / "demo"
    assert (out / "run" / "plots" / "history.png").exists()
    assert len(list((out / "predictions").glob("*.png"))) == 6
    served = [json.loads(line) for line in (out / "served_predictions.jsonl").read_text().splitlines()]
    assert len(served) == 6
