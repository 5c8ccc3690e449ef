import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import HfApi
from peft import LoraConfig

from realign_pipeline.cli import main
from realign_pipeline.hub import STAGING_MARKER, build_model_card, build_upload_folder, commit_operations
from realign_pipeline.training.export import save_lora_adapter, save_unet


@pytest.fixture(scope="module")
def toy_model(toy_pipeline_folder):
    """The tiny random Stable Diffusion folder of tests/conftest.py."""
    return toy_pipeline_folder


def lora_unet(toy_model):
    unet = UNet2DConditionModel.from_pretrained(toy_model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # a trained-looking adapter, not the zero init
    return unet


def unet_output(unet):
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def trained(toy_model, tmp_path_factory):
    """A training output folder as the trainers leave it."""
    folder = tmp_path_factory.mktemp("trained")
    unet = lora_unet(toy_model)
    save_unet(unet, folder / "unet")
    save_lora_adapter(unet, folder / "lora")
    summary = {
        "config": {
            "pretrained_model": str(toy_model),
            "method": "refl",
            "use_lora": True,
            "lora_rank": 4,
            "learning_rate": 1e-5,
            "rewards": [{"name": "concept_matching", "weight": 1.0}, {"name": "caption", "weight": 0.5}],
            "prompts": "color_train.txt",
        },
        "num_prompts": 700,
        "global_step": 2000,
        "validation_table": [{"when": "before", "total": -3.2}, {"when": "after", "total": -2.5}],
    }
    (folder / "training_summary.json").write_text(json.dumps(summary))
    from PIL import Image

    Image.new("RGB", (64, 32), "gray").save(folder / "samples_before.png")
    Image.new("RGB", (64, 32), "white").save(folder / "samples_after.png")
    return folder, unet_output(unet)


def test_saved_unet_has_the_lora_merged_in(toy_model, trained):
    folder, expected = trained
    merged = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
    assert not any("lora" in key for key in merged.state_dict())
    assert torch.allclose(unet_output(merged), expected, atol=1e-5)
    base = UNet2DConditionModel.from_pretrained(toy_model, subfolder="unet")
    assert not torch.allclose(unet_output(base), expected, atol=1e-3)


def test_adapter_alone_loads_with_load_lora_weights(toy_model, trained):
    folder, expected = trained
    pipe = StableDiffusionPipeline.from_pretrained(toy_model)
    pipe.load_lora_weights(folder / "lora")
    assert torch.allclose(unet_output(pipe.unet), expected, atol=1e-5)


def test_full_pipeline_folder_loads_through_every_documented_path(trained, tmp_path):
    folder, expected = trained
    upload = build_upload_folder(folder, tmp_path / "upload", "me/realign-sd15")
    index = json.loads((upload / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (upload / "pipeline.py").is_file() and (upload / "images" / "samples_after.png").is_file()

    plain = StableDiffusionPipeline.from_pretrained(upload)
    assert torch.allclose(unet_output(plain.unet), expected, atol=1e-5)
    generic = DiffusionPipeline.from_pretrained(upload)
    assert type(generic).__name__ == "StableDiffusionPipeline"
    custom = DiffusionPipeline.from_pretrained(upload, custom_pipeline=str(upload), trust_remote_code=True)
    assert type(custom).__name__ == "RealignDiffPipeline"
    assert torch.allclose(unet_output(custom.unet), expected, atol=1e-5)

    card = (upload / "README.md").read_text()
    front_matter = card.split("---")[1]
    for tag in ("diffusers", "text-to-image", "realign-diff", "lora"):
        assert f"- {tag}" in front_matter
    # The base is a local folder here: the metadata names Hub ids only, the body names the folder by its last part.
    assert "base_model:" not in front_matter and "license: creativeml-openrail-m" in front_matter
    for fact in (
        "concept_matching",
        "| 0.5",
        "learning_rate",
        "color_train.txt",
        "700 prompts",
        "images/samples_before.png",
    ):
        assert fact in card, fact
    assert "| after | -2.5000 |" in card
    assert 'custom_pipeline="me/realign-sd15"' in card


def test_unet_only_folder_holds_just_the_unet_and_the_card(trained, tmp_path):
    folder, expected = trained
    upload = build_upload_folder(
        folder, tmp_path / "upload", "me/realign-unet", unet_only=True, eval_table="| a |\n|---|"
    )
    files = sorted(p.relative_to(upload).as_posix() for p in upload.rglob("*") if p.is_file())
    assert files == [
        STAGING_MARKER,  # marks the folder as a build (never uploaded: commit_operations leaves it out)
        "README.md",
        "images/samples_after.png",
        "images/samples_before.png",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert torch.allclose(
        unet_output(UNet2DConditionModel.from_pretrained(upload, subfolder="unet")), expected, atol=1e-5
    )
    card = (upload / "README.md").read_text()
    assert 'realign_unet="me/realign-unet"' in card and "## Evaluation" in card


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub endpoints a one-commit upload uses; every file is stored as a regular (non-LFS) blob."""

    requests: list = []
    repos: dict = {}
    deleted: list = []
    fail_commits = False

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.partition("?")[0]
        self.requests.append((path, ""))
        repo = path.removeprefix("/api/models/")
        if path.startswith("/api/models/") and repo in self.repos:
            return self.reply({"id": repo, "private": False, "sha": "0" * 40})
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_DELETE(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.requests.append((self.path, ""))
        repo = f"{body.get('organization') or 'me'}/{body['name']}"
        self.repos.pop(repo, None)
        FakeHub.deleted.append(repo)
        return self.reply({})

    def reply(self, payload, status=200):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path, _, query = self.path.partition("?")
        self.requests.append((path, query))
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.repos[f"{payload['organization'] or 'me'}/{payload['name']}"] = payload
            return self.reply({"url": f"http://{self.headers['Host']}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return self.reply({})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self.reply(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/branch/" in path:
            return self.reply({})
        if "/commit/" in path and FakeHub.fail_commits:
            return self.reply({"error": "Forbidden: you cannot write to this repository"}, 403)
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            stored = {}
            for line in lines:
                if line["key"] == "file":
                    stored[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            FakeHub.commits.append({"path": path, "query": query, "header": lines[0]["value"], "files": stored})
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            base = f"http://{self.headers['Host']}/{repo}"
            return self.reply(
                {
                    "commitUrl": f"{base}/commit/{'1' * 40}",
                    "commitOid": "1" * 40,
                    "pullRequestUrl": f"{base}/discussions/1",
                }
            )
        return self.reply({"error": f"unexpected {path}"}, 404)


@pytest.fixture
def fake_hub():
    FakeHub.requests, FakeHub.repos, FakeHub.commits, FakeHub.deleted, FakeHub.fail_commits = [], {}, [], [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HfApi(endpoint=f"http://127.0.0.1:{server.server_port}")
    server.shutdown()
    server.server_close()


PUSH_DRIVER = """
import argparse, json, sys
from realign_pipeline.training.command import add_push_parser
parser = argparse.ArgumentParser(prog="realign")
add_push_parser(parser.add_subparsers(dest="command", required=True))
for argv in json.loads(sys.argv[1]):
    args = parser.parse_args(argv)
    args.run(args)
"""


def test_push_commands_make_one_commit_each_holding_exactly_the_folder(trained, tmp_path, fake_hub):
    folder, expected = trained
    full, unet_only = tmp_path / "full", tmp_path / "unet_only"
    runs = [
        ["push", str(folder), "--repo-id", "me/realign-sd15", "--private", "--staging-dir", str(full)],
        [
            "push",
            str(folder),
            "--repo-id",
            "me/r",
            "--unet-only",
            "--revision",
            "experiment",
            "--staging-dir",
            str(unet_only),
        ],
        ["push", str(folder), "--repo-id", "me/r", "--unet-only", "--create-pr"],
    ]
    # huggingface_hub refuses every request in offline mode, even to 127.0.0.1: push from a
    # process where it is off, pointed at the local stand-in Hub.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": fake_hub.endpoint,
        "HF_TOKEN": "hf_test",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    done = subprocess.run(
        [sys.executable, "-c", PUSH_DRIVER, json.dumps(runs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(FakeHub.commits) == 3
    first, branch, pull_request = FakeHub.commits

    assert first["path"] == "/api/models/me/realign-sd15/commit/main"
    local = {p.relative_to(full).as_posix(): p.read_bytes() for p in full.rglob("*") if p.is_file()}
    assert local.pop(STAGING_MARKER) and first["files"] == local
    assert {"model_index.json", "pipeline.py", "README.md", "unet/diffusion_pytorch_model.safetensors"} <= set(local)
    repo = FakeHub.repos["me/realign-sd15"]
    assert repo.get("visibility") == "private" or repo.get("private") is True

    # What the Hub received is a loadable pipeline with the fine-tuned UNet.
    received = tmp_path / "received"
    for name, content in first["files"].items():
        (received / name).parent.mkdir(parents=True, exist_ok=True)
        (received / name).write_bytes(content)
    assert torch.allclose(unet_output(StableDiffusionPipeline.from_pretrained(received).unet), expected, atol=1e-5)

    assert any(path == "/api/models/me/r/branch/experiment" for path, _ in FakeHub.requests)
    assert branch["path"] == "/api/models/me/r/commit/experiment"
    assert branch["files"] == {
        p.relative_to(unet_only).as_posix(): p.read_bytes()
        for p in unet_only.rglob("*")
        if p.is_file() and p.name != STAGING_MARKER
    }
    assert "create_pr=1" in pull_request["query"] and pull_request["path"] == "/api/models/me/r/commit/main"
    assert "pushed: http://127.0.0.1" in done.stdout and "/me/r/discussions/1" in done.stdout


def test_push_refuses_a_staging_folder_with_stray_files(trained, tmp_path):
    folder, _ = trained
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "secret.txt").write_text("do not upload")
    with pytest.raises(FileExistsError):
        build_upload_folder(folder, tmp_path / "staging", "me/x")


def test_push_help_reads_well():
    import argparse

    from realign_pipeline.training.command import add_push_parser, add_train_parser

    parser = argparse.ArgumentParser(prog="realign")
    subparsers = parser.add_subparsers(dest="command")
    help_texts = [add_train_parser(subparsers).format_help(), add_push_parser(subparsers).format_help()]
    assert "--config" in help_texts[0] and "accelerate launch" in help_texts[0]
    assert "--unet-only" in help_texts[1] and "custom_pipeline" in help_texts[1]
    args = parser.parse_args(["train", "--config", "run.yaml", "--set", "max_train_steps=3"])
    assert args.overrides == ["max_train_steps=3"] and args.run.__name__ == "run_train"


@pytest.fixture
def unet_folder(tmp_path):
    """A training output folder with a UNet folder shaped as diffusers writes it (its weights are not read)."""
    folder = tmp_path / "trained"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    return folder


def push_fails_with(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"realign push: error: {message}\n"


def test_push_names_what_is_missing_before_anything_is_written(unet_folder, tmp_path, capsys):
    staging = tmp_path / "staging"
    missing = tmp_path / "no-such-run"
    push_fails_with(
        capsys,
        [str(missing), "--repo-id", "me/x", "--staging-dir", str(staging), "--dry-run"],
        f"trained: no such folder {str(missing)!r} (a training output folder or a UNet folder)",
    )
    push_fails_with(
        capsys,
        [str(tmp_path), "--repo-id", "me/x", "--dry-run", "--staging-dir", str(staging)],
        f"trained: {str(tmp_path)!r} holds no diffusers UNet (config.json + safetensors, in it or in unet/)",
    )
    push_fails_with(
        capsys,
        [str(unet_folder), "--repo-id", "me/x", "--unet-only", "--dry-run", "--staging-dir", str(staging)],
        f"--base-model is needed: {str(unet_folder)!r} has no training_summary.json naming the base pipeline",
    )
    push_fails_with(
        capsys,
        [str(unet_folder), "--repo-id", "me/x", "--base-model", "b/m", "--dry-run"],
        "--dry-run needs --staging-dir DIR to leave the folder somewhere to look at",
    )
    push_fails_with(
        capsys,
        [str(unet_folder), "--repo-id", "me/x", "--base-model", "b/m", "--eval-table", str(tmp_path / "t.md")],
        f"--eval-table {tmp_path / 't.md'}: no such file (a Markdown table)",
    )
    push_fails_with(
        capsys,
        [str(unet_folder), "--repo-id", "me/my model", "--base-model", "b/m"],
        "--repo-id me/my model: not a Hub repo id (Repo id must use alphanumeric chars, '-', '_' or '.'. The name "
        "cannot start or end with '-' or '.' and the maximum length is 96: 'me/my model'.)",
    )
    assert not staging.exists()
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    push_fails_with(
        capsys,
        [str(unet_folder), "--repo-id", "me/x", "--base-model", "b/m", "--staging-dir", str(staging)],
        f"--staging-dir {staging}: not empty, and not a folder realign push made; everything in it would be "
        "uploaded, so use an empty or new folder",
    )


def test_a_dry_runs_staging_folder_is_built_again_and_its_marker_never_uploaded(unet_folder, tmp_path, capsys):
    staging = tmp_path / "staging"
    argv = ["push", str(unet_folder), "--repo-id", "me/x", "--base-model", "b/m", "--unet-only"]
    main([*argv, "--staging-dir", str(staging), "--dry-run"])
    (staging / "unet" / "stale.safetensors").write_bytes(b"from an older build")
    main([*argv, "--staging-dir", str(staging), "--dry-run", "--license", "apache-2.0"])
    assert "license: apache-2.0" in (staging / "README.md").read_text()
    assert not (staging / "unet" / "stale.safetensors").exists()
    uploaded = {operation.path_in_repo for operation in commit_operations(staging)}
    assert uploaded == {"README.md", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert (staging / STAGING_MARKER).is_file()


def test_the_model_card_shows_no_local_absolute_path(tmp_path):
    summary = {
        "config": {
            "pretrained_model": "/home/me/models/sd15",
            "prompts": "/home/me/data/prompts.txt",
            "pretrain_data": "/home/me/data/laion-pairs",
            "rewards": [{"name": "/home/me/code/my_reward.py:Score", "weight": 1.0}],
            "method": "refl",
        }
    }
    card = str(build_model_card(summary, "me/x", "/home/me/models/sd15", unet_only=True))
    assert "/home/me" not in card
    assert "`prompts.txt`" in card and "my_reward.py:Score" in card and '"laion-pairs"' in card
    assert "base_model" not in card.split("---")[1]  # the metadata names Hub ids only
    hub_card = str(build_model_card({"config": {"prompts": "color.txt"}}, "me/x", "org/sd15", unet_only=True))
    assert "base_model: org/sd15" in hub_card


PUSH_MAIN = """
import sys
from realign_pipeline.cli import main
main(sys.argv[1:])
"""


def test_push_offline_or_failing_is_one_line_and_leaves_no_empty_repository(unet_folder, tmp_path, fake_hub):
    argv = ["push", str(unet_folder), "--repo-id", "me/new", "--base-model", "b/m", "--unet-only"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test", "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run(
        [sys.executable, "-c", PUSH_MAIN, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.startswith("realign push: error: --repo-id me/new: cannot reach the Hub: ")
    assert "offline mode is enabled" in done.stderr and len(done.stderr.splitlines()) == 1

    FakeHub.fail_commits = True
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=fake_hub.endpoint)
    done = subprocess.run(
        [sys.executable, "-c", PUSH_MAIN, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.startswith("realign push: error: --repo-id me/new: the upload failed: ")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "me/new" not in FakeHub.repos and FakeHub.deleted == ["me/new"]  # created, then deleted again

    FakeHub.repos["me/old"] = {"name": "old"}  # a repository that was there before is never deleted
    argv[3] = "me/old"
    done = subprocess.run(
        [sys.executable, "-c", PUSH_MAIN, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "me/old" in FakeHub.repos and FakeHub.deleted == ["me/new"]
