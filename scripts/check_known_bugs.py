"""Plant each bug issue [G] listed, one at a time, in a copy of the package, and check that a test fails.

    .venv/bin/python scripts/check_known_bugs.py            # all 14, about 3 min on a 2-core CPU
    .venv/bin/python scripts/check_known_bugs.py swapped    # those whose names contain "swapped"

Each bug is a one-line edit of the method (a sign, a factor, which half, which steps, which tokens) that a
suite checking only "fast equals reference" or "the output changed" let through. The copy of ``src`` is put
first on ``PYTHONPATH``, so the tests import the planted code, not the installed package. A bug whose line is
no longer in the source is reported as STALE (update its pattern), one no test catches as MISSED; either makes
the script exit with status 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "pipeline_realign_diff.py"
METHOD_TESTS = ["tests/test_reweighting_method.py"]
REFL_TESTS = ["tests/training", "-m", "not slow"]
EVAL_TESTS = ["tests/shapes/test_evaluate.py"]

# name: (file under src/realign_pipeline, the line as it is, the line with the bug, the tests that must fail)
KNOWN_BUGS: dict[str, tuple[str, str, str, list[str]]] = {
    "no (t/T)^5 time factor": (
        PIPELINE,
        "strength = weight * state.time_factor() * area_factor",
        "strength = weight * area_factor",
        METHOD_TESTS,
    ),
    "self-attention pushes towards other regions": (
        PIPELINE,
        "            key_regions = query_regions\n        strength",
        "            key_regions = 1.0 - query_regions\n        strength",
        METHOD_TESTS,
    ),
    "area weighting's sign flipped": (
        PIPELINE,
        "(1.0 - self.area_weight * area_of_pixel)",
        "(1.0 + self.area_weight * area_of_pixel)",
        METHOD_TESTS,
    ),
    "the last modulation_fraction of the steps modulated": (
        PIPELINE,
        "state.modulate = torch.tensor(i < modulated_steps)",
        "state.modulate = torch.tensor(i >= len(timesteps) - modulated_steps)",
        METHOD_TESTS,
    ),
    "attention maps recorded from the unconditional half": (
        PIPELINE,
        "scores = torch.matmul(query[start:], key[start:].transpose(-1, -2)) * attn.scale",
        "scores = torch.matmul(query[: batch_size - start], key[: batch_size - start].transpose(-1, -2)) * attn.scale",
        METHOD_TESTS,
    ),
    "each pixel to the weakest region": (
        PIPELINE,
        "strongest = torch.where(above, stacked, torch.full_like(stacked, -1.0)).argmax(0)",
        "strongest = torch.where(above, stacked, torch.full_like(stacked, 2.0)).argmin(0)",
        METHOD_TESTS,
    ),
    "__call__ ignores the swapped region embeddings": (
        PIPELINE,
        "            initial_latents.clone(),\n            fine_embeds,\n",
        "            initial_latents.clone(),\n            prompt_embeds,\n",
        METHOD_TESTS,
    ),
    "region r takes region r+1's tokens": (
        PIPELINE,
        "region_tokens[index, region_index, region.token_indices] = True",
        "region_tokens[index, region_index, layout.regions[(region_index + 1) % len(layout.regions)].token_indices]"
        " = True",
        METHOD_TESTS,
    ),
    "ReFL's guidance terms swapped": (
        "training/refl.py",
        "output_uncond, output_cond = reward_part.chunk(2)",
        "output_cond, output_uncond = reward_part.chunk(2)",
        REFL_TESTS,
    ),
    "ReFL ignores its timestep window": (
        "training/refl.py",
        "grad_index = draw_refl_step(config.refl_step_range, generator)",
        "grad_index = config.num_inference_steps - 1",
        REFL_TESTS,
    ),
    "the regulariser weight ignored": (
        "training/refl.py",
        "loss = loss + config.pretrain_loss_weight * pretrain_loss",
        "loss = loss + pretrain_loss",
        REFL_TESTS,
    ),
    "EMA weights never copied": (
        "training/refl.py",
        "        ema.copy_to(parameters)\n",
        "        pass\n",
        REFL_TESTS,
    ),
    "realign eval's passed counts binding only": (
        "shapes/evaluate.py",
        "passed=sum(v.passed for v in verdicts),",
        "passed=sum(v.binding_correct for v in verdicts),",
        EVAL_TESTS,
    ),
    "re-weighting rows draw other noise": (
        "shapes/evaluate.py",
        "[initial_noise(settings.seed, position, index, shape, seed_index) for index, seed_index in samples]",
        "[initial_noise(settings.seed + configuration.realign, position, index, shape, seed_index)"
        " for index, seed_index in samples]",
        EVAL_TESTS,
    ),
}


def plant_and_test(workdir: Path, relative: str, line: str, bug: str, tests: list[str]) -> str:
    """CAUGHT, MISSED or STALE for one bug, in a fresh copy of ``src``."""
    source = workdir / "src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(ROOT / "src", source)
    path = source / "realign_pipeline" / relative
    text = path.read_text()
    if text.count(line) != 1:
        return "STALE"
    path.write_text(text.replace(line, bug))
    environment = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    return "CAUGHT" if result.returncode == 1 else ("MISSED" if result.returncode == 0 else "ERROR")


def main(selected: list[str]) -> int:
    """Plant every bug (or those whose names contain one of ``selected``) and report each."""
    bugs = {name: bug for name, bug in KNOWN_BUGS.items() if not selected or any(s in name for s in selected)}
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        for name, (relative, line, bug, tests) in bugs.items():
            verdict = plant_and_test(Path(workdir), relative, line, bug, tests)
            failures += verdict != "CAUGHT"
            print(f"{verdict:7} {name}", flush=True)
    print(f"{len(bugs) - failures} of {len(bugs)} planted bugs caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
