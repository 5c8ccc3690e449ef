"""RealignDiff under ``torch.compile`` (issue [K] item 1): no graph breaks, one graph for every step, eager's outputs.

Graphs and graph breaks are counted from ``torch._dynamo.utils.counters``; "no recompilation" is asserted with
``torch._dynamo.config.error_on_recompile`` (a recompile raises) and ``fullgraph=True`` (a graph break raises).
The whole-UNet and whole-pipeline tests trace with dynamo only (``backend="eager"``: graphs,
guards and breaks are dynamo's, whatever the backend); the numerics of inductor's generated code are checked on
attention layers, where compiling takes seconds instead of minutes on a CPU.
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch._dynamo.utils import counters

from realign_pipeline import AttentionModulationState, RealignAttnProcessor, RealignDiffPipeline
from realign_pipeline.pipeline_realign_diff import (
    install_realign_processors,
    realign_processors_installed,
    reweighted_attention_fast,
    reweighted_attention_reference,
)

from .test_fast_reweighting import overlapping_state

PROMPT = "a red book and a yellow vase"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with no compiled code and zeroed counters (dynamo's caches are per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def step_tensors(state: AttentionModulationState, timestep: float, modulate: bool) -> None:
    """What the pipeline's loop does each step: ``timestep`` and ``modulate`` as new 0-d tensors."""
    state.timestep = torch.tensor(timestep)
    state.modulate = torch.tensor(modulate)


@pytest.fixture(scope="module")
def toy_unet(toy_pipeline_folder):
    return UNet2DConditionModel.from_pretrained(toy_pipeline_folder, subfolder="unet").eval()


# (timestep, modulate): a run's schedule, the first steps re-weighted and the rest plain.
SCHEDULE = [(981.0, True), (901.0, True), (701.0, False), (401.0, False)]


@pytest.mark.parametrize("function", [reweighted_attention_fast, reweighted_attention_reference])
def test_every_step_of_a_run_runs_one_graph_without_breaks(toy_unet, function):
    generator = torch.Generator().manual_seed(3)
    state = overlapping_state((16, 16), 1, 3, generator)
    latents = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, toy_unet.config.cross_attention_dim, generator=generator)
    compiled = torch.compile(toy_unet, backend="eager", fullgraph=True)
    with realign_processors_installed(toy_unet, RealignAttnProcessor(function)), torch.no_grad():
        for index, (timestep, modulate) in enumerate(SCHEDULE):
            step_tensors(state, timestep, modulate)
            kwargs = dict(encoder_hidden_states=text, cross_attention_kwargs={"realign_state": state})
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                output = compiled(latents, torch.tensor(int(timestep)), **kwargs).sample
            eager = toy_unet(latents, torch.tensor(int(timestep)), **kwargs).sample
            plain = toy_unet(latents, torch.tensor(int(timestep)), encoder_hidden_states=text).sample
            assert torch.allclose(output, eager, atol=1e-5, rtol=0)
            # The re-weighted steps change the conditional half; with the switch off the graph is plain attention.
            assert torch.allclose(output, plain, atol=1e-5, rtol=0) is not modulate
    assert compiled_graphs() == 1
    assert graph_breaks() == 0


def test_the_plain_compiled_unet_is_the_baseline_of_one_graph(toy_unet):
    """The count the issue compares against: the same UNet with diffusers' processors, compiled."""
    latents = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, toy_unet.config.cross_attention_dim)
    toy_unet.set_attn_processor(AttnProcessor2_0())
    compiled = torch.compile(toy_unet, backend="eager")
    with torch.no_grad():
        compiled(latents, torch.tensor(981), encoder_hidden_states=text)
    assert (compiled_graphs(), graph_breaks()) == (1, 0)


def layer_pair():
    torch.manual_seed(0)
    self_attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    cross_attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    return self_attn, cross_attn


@pytest.mark.slow
def test_inductor_code_equals_eager_on_attention_layers():
    """Inductor's generated kernels (range pass, q′/k′/v′, SDPA) against the eager fast function and the
    reference, on a self- and a cross-attention layer of a CFG batch, re-weighted and switched off."""
    self_attn, cross_attn = layer_pair()
    for attn in (self_attn, cross_attn):
        attn.set_processor(RealignAttnProcessor())

    def two_layers(hidden, text, state):
        hidden = self_attn(hidden, realign_state=state)
        return cross_attn(hidden, encoder_hidden_states=text, realign_state=state)

    compiled = torch.compile(two_layers, fullgraph=True, dynamic=False)
    generator = torch.Generator().manual_seed(5)
    state = overlapping_state((12, 20), 2, 3, generator)
    hidden = 3 * torch.randn(4, 12 * 20, 64, generator=generator)
    text = torch.randn(4, 77, 32, generator=generator)
    with torch.no_grad():
        for index, (timestep, modulate) in enumerate(SCHEDULE):
            step_tensors(state, timestep, modulate)
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                output = compiled(hidden, text, state)
            eager = two_layers(hidden, text, state)
            state.attention_function = reweighted_attention_reference
            reference = two_layers(hidden, text, state)
            state.attention_function = None
            assert (output - eager).abs().max() < 1e-5
            assert (output - reference).abs().max() < 1e-4
    assert compiled_graphs() == 1


def test_whole_pipeline_with_a_compiled_unet(toy_pipeline_folder):
    """``pipe.unet = torch.compile(pipe.unet)``: a default call (coarse pass recording attention maps, masks,
    re-weighted fine pass) and a call with user regions give eager's images; the first call compiles three
    graphs (coarse pass: its first step, then with maps to add to; fine pass) and no call after it compiles any.
    """
    pipe = RealignDiffPipeline.from_pretrained(toy_pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    install_realign_processors(pipe.unet)
    left = np.zeros((64, 64), dtype=np.float32)
    left[:, :32] = 1.0
    calls = {
        "default": dict(),
        "regions": dict(regions=[("a red book", left), ("a yellow vase", 1.0 - left)]),
    }

    def run(name):
        # 6 steps: the coarse pass stops after 2 (coarse_stop_fraction=0.3), so it has a step with maps recorded.
        common = dict(num_inference_steps=6, output_type="np", generator=torch.Generator().manual_seed(0))
        return pipe(PROMPT, **common, **calls[name]).images

    eager = {name: run(name) for name in calls}
    eager_unet = pipe.unet
    pipe.unet = torch.compile(eager_unet, backend="eager", fullgraph=True)
    try:
        assert np.allclose(run("default"), eager["default"], atol=1e-5)
        assert compiled_graphs() == 3
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert np.allclose(run("regions"), eager["regions"], atol=1e-5)
            assert np.allclose(run("default"), eager["default"], atol=1e-5)
    finally:
        pipe.unet = eager_unet
    assert compiled_graphs() == 3
    assert graph_breaks() == 0
