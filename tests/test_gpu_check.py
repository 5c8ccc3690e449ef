"""``benchmarks/gpu_check.py`` (issue [K] item 4) is prepared for a session with a GPU: its CPU smoke mode runs
every phase on the toy model, and the compiled calls reuse the graphs its compiled steps built."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_run_on_the_cpu(tmp_path):
    output = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    command += ["--backend", "eager", "--size", "64", "--steps", "2", "--repeats", "1", "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["rows"]) == ["step, eager", "call, eager", "step, compiled", "call, compiled"]
    for phase in report["rows"].values():
        for name, stats in phase.items():
            if "median_s" in stats:
                assert stats["median_s"] > 0 and stats["x_time"] > 0, name
    compiled_steps = report["rows"]["step, compiled"]
    assert compiled_steps["graph_breaks"]["total"] == 0
    assert compiled_steps["plain"]["graphs_compiled"] == compiled_steps["re-weighted"]["graphs_compiled"] == 1
    # The pipelines' calls run the graphs the steps compiled: the step rows measure what a call runs.
    assert report["rows"]["call, compiled"]["graphs_compiled_by_the_calls"]["total"] == 0


def test_gpu_check_refuses_cuda_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal does not apply")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cuda"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 2
    assert "--device cuda: no CUDA device here" in completed.stderr
