import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOY_REWARDS = Path(__file__).with_name("toy_rewards.py")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def signal_processes_mentioning(text: str, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to every process whose command line contains ``text`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command_line:
            try:
                os.kill(int(entry.name), signum)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_two_cpu_processes_see_different_prompts_and_end_with_identical_weights(toy_config, tmp_path):
    log_dir = tmp_path / "prompt_logs"
    log_dir.mkdir()
    options = toy_config(
        max_train_steps=2,
        train_batch_size=2,
        checkpointing_steps=2,
        rewards=[{"name": f"{TOY_REWARDS}:RecordingBrightness", "log_dir": str(log_dir)}],
    )
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (several CPU
    # processes need mpirun). `--multi_gpu` spawns them through torch.distributed.run, and
    # ACCELERATE_USE_CPU=true makes each set up accelerate's MULTI_CPU (gloo) instead of looking for GPUs.
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps(options))
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "realign_pipeline.training", "--config", str(config_file),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # no user accelerate config file can interfere
        "ACCELERATE_USE_CPU": "true",
        # Under load, a rank once hung at exit (gloo's teardown; see ``training.run.leave_process_group``). With
        # the fault handler on, SIGABRT makes each process print every thread's Python stack into the log, so a
        # failure below says where it stopped.
        "PYTHONFAULTHANDLER": "1",
    }
    # Output goes to files, not pipes: a worker that outlives the launcher must not block the test.
    # The launcher gets a new session so that on a timeout it can be killed with its process group;
    # torch.distributed.run starts each worker in a session of its own, so those are found by command line.
    stderr_path = tmp_path / "launcher.log"
    with stderr_path.open("w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            launcher.wait(timeout=240)
        except subprocess.TimeoutExpired:
            signal_processes_mentioning(str(config_file), signal.SIGABRT)
            time.sleep(3)
            os.killpg(launcher.pid, signal.SIGKILL)
            signal_processes_mentioning(str(config_file))
            launcher.wait()
            pytest.fail(f"the two-process run did not finish in 240 s:\n{stderr_path.read_text()[-12000:]}")
    signal_processes_mentioning(str(config_file))  # none should be left; never leave a stray worker behind
    assert launcher.returncode == 0, stderr_path.read_text()[-4000:]

    # The gradient calls of each process, step by step (validation calls run without grad).
    seen = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (log_dir / f"prompts-{rank}.jsonl").read_text().splitlines()]
        seen[rank] = [record["prompts"] for record in records if record["grad"]]
    assert len(seen[0]) == len(seen[1]) == 2
    for step in range(2):
        assert not set(seen[0][step]) & set(seen[1][step]), f"both processes trained on one prompt at step {step}"

    summary = json.loads((Path(options["output_dir"]) / "training_summary.json").read_text())
    assert summary["num_processes"] == 2
    first, second = summary["process_weight_fingerprints"]
    assert first == second
    assert (Path(options["output_dir"]) / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").is_file()
