"""``realign app`` as a service manager runs it: started as a process, stopped with SIGTERM."""

import signal
import urllib.request

import pytest

from tests.app.app_process import start_app, stop_app


def download_folders(folder):
    return [path for path in folder.iterdir() if path.name.startswith("realign-app-")]


def test_sigterm_closes_the_server_and_removes_its_download_folder(tmp_path):
    pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]' (make test installs it)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    log_path = tmp_path / "app.log"
    # TMPDIR: where tempfile puts the app's download folder.
    process, url = start_app(log_path, TMPDIR=str(scratch))
    try:
        assert len(download_folders(scratch)) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        stop_app(process)
    assert download_folders(scratch) == []  # (gradio's own cache folder there is gradio's to keep)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=5)
