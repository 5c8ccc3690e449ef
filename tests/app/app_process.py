"""Test support: ``python -m realign_pipeline.app`` as a real process on a free loopback port.

Shared by the browser test (``test_ui.py``) and the SIGTERM test (``test_command.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(log_path: Path, **extra_env: str) -> tuple[subprocess.Popen, str]:
    """Start the app (CPU, one thread, offline) with its output in ``log_path``; return it and its URL once the
    page answers 200. Fails the test, with the log's tail, if it exits or does not answer in time."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
        **extra_env,
    }
    command = [sys.executable, "-m", "realign_pipeline.app", "--port", str(port), "--device", "cpu"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_app(process)
            pytest.fail(f"the app did not answer on {url} in {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def stop_app(process: subprocess.Popen) -> None:
    """Terminate the app if it still runs (kill it after 20 s)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
