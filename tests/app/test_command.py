"""``realign app`` as a service manager runs it: started as a process, stopped with SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def download_folders(folder):
    return [path for path in folder.iterdir() if path.name.startswith("realign-app-")]


def test_sigterm_closes_the_server_and_removes_its_download_folder(tmp_path):
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]' (make test installs it)")
    port = free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    log_path = tmp_path / "app.log"
    env = {
        **os.environ,
        "TMPDIR": str(scratch),  # where tempfile puts the app's download folder
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "realign_pipeline.app", "--port", str(port), "--device", "cpu"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no answer in 240 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
        assert len(download_folders(scratch)) == 1

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert download_folders(scratch) == []  # (gradio's own cache folder there is gradio's to keep)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
