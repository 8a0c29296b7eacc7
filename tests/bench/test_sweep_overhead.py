"""Orchestration overhead: the demo sweep's wall time against its trials' own training time.

overhead = wall time / (sum of the trials' time inside epochs / slots). Everything else counts
against it: process start-up, imports, data preparation, MLflow and Optuna. Goal: <= 1.15.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_sweep_overhead(tmp_path):
    spec = REPO / "sweeps" / "demo.yaml"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(spec)], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    assert done.returncode in (0, 1), done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "mlruns" / "sweeps" / "demo").glob("*/result.json")]
    train = sum(r.get("train_seconds", 0.0) for r in results)
    trial_wall = sum(r.get("wall_seconds", 0.0) for r in results)
    slots = int(os.environ.get("FER_BENCH_SLOTS", "2"))
    ratio = wall / (train / slots)
    print(f"\ndemo sweep: {len(results)} trials, wall {wall:.0f}s, training {train:.0f}s over {slots} slots, "
          f"trials' own wall {trial_wall:.0f}s")
    print(f"orchestration overhead  wall / (training / slots) = {ratio:.2f}   goal <= 1.15")
    print(f"demo sweep wall time    {wall / 60:.1f} min   goal <= 10 min (issue 3), <= 5 min (issue 8)")
