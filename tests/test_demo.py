"""`make demo`'s script end to end (one short epoch): every step a user sees must work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_OUT=str(tmp_path / "demo"), DEMO_EPOCHS="1", DEMO_STEPS="20", DEMO_IMAGES="2",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    out = tmp_path / "demo"
    assert (out / "run" / "plots" / "history.png").exists()
    assert "map50" in json.loads((out / "metrics.json").read_text())
    assert (out / "models" / "yolo_af_shapes" / "1" / "saved_model.pb").exists()

    # What the gRPC client got back from `vislearn serve`, one JSON line per image.
    served = [json.loads(line) for line in (out / "served_detections.jsonl").read_text().splitlines()]
    assert len(served) == 2
    for line in served:
        assert Path(line["image"]).is_file() and isinstance(line["detections"], list)
        for found in line["detections"]:
            assert set(found) == {"box", "score", "class", "label"}
            assert len(found["box"]) == 4 and all(0.0 <= v <= 1.0 for v in found["box"])
            assert 0.25 <= found["score"] <= 1.0 and 0 <= found["class"] < 5 and found["label"]
        annotated = Path(line["annotated"])
        assert annotated.parent == out / "detections"
        assert annotated.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "server stopped" in result.stdout
