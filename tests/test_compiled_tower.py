"""The compiled DToMe block (`Options.compile_tower`): the functional block `static_block` against the
module block, torch.compile of it against the plain function (inductor's CPU backend, the same
fusion passes the GPU path gets), and the fallbacks to the uncompiled path."""

from __future__ import annotations

import math

import pytest
import torch
from clip_models import blocky_pixels, vitl_geometry_clip

import dymu
from dymu import cuda_graph
from dymu.blocks import (
    embed,
    functional_blocks,
    layers_to_run,
    run_blocks,
    static_block,
    static_forward,
    threshold_rule,
    vision_transformer,
)
from dymu.cuda_graph import graphed_forward
from dymu.tower import finish


@pytest.fixture(scope="module")
def tower():
    model = vitl_geometry_clip()
    pixels = blocky_pixels(4, model.config.image_size, seed=3)
    tau = dymu.calibrate(
        model,
        blocky_pixels(16, model.config.image_size, seed=4),
        target_tokens=48,
        batch_size=8,
        progress=False,
    )
    tau[5] = math.inf  # one block in the middle that never merges: the `tau is None` variant
    return model, pixels, tau


def _module_path(model, pixels, tau):
    vt = vision_transformer(model)
    layers = model.config.num_hidden_layers
    rule, may_merge = threshold_rule(tau, layers)
    with torch.no_grad():
        state = run_blocks(vt, embed(vt, pixels), 0, layers_to_run(layers, -2), rule, may_merge, static=True)
    return finish(state, layers)


def _functional_path(model, pixels, tau, step=static_block):
    vt = vision_transformer(model)
    layers = model.config.num_hidden_layers
    _, may_merge = threshold_rule(tau, layers)
    blocks = functional_blocks(vt)
    assert blocks is not None, "the CLIP test tower is the block the functional path knows"
    with torch.no_grad():
        state = static_forward(vt, pixels, tau.float(), may_merge, layers_to_run(layers, -2), blocks, step)
    return finish(state, layers)


def _assert_same_tower(got, want, rtol=1e-4, atol=1e-5) -> None:
    assert torch.equal(got.tokens_per_layer, want.tokens_per_layer)
    assert torch.equal(got.num_tokens, want.num_tokens)
    for b in range(len(want.mapping)):
        assert torch.equal(got.mapping[b], want.mapping[b])
        torch.testing.assert_close(got.sizes[b], want.sizes[b])
        torch.testing.assert_close(got.features[b], want.features[b], rtol=rtol, atol=atol)


def test_functional_block_equals_module_block(tower) -> None:
    model, pixels, tau = tower
    want = _module_path(model, pixels, tau)
    assert want.tokens_per_layer[:, -1].max() < want.tokens_per_layer[:, 0].min(), "every image should merge"
    _assert_same_tower(_functional_path(model, pixels, tau), want)


def test_functional_block_takes_each_activation(tower) -> None:
    """A tower whose config says plain GELU runs GELU in the functional block, like the module."""
    model, pixels, tau = tower
    gelu = vitl_geometry_clip()
    gelu.config.hidden_act = "gelu"
    for layer in vision_transformer(gelu).encoder.layers:
        layer.mlp.activation_fn = torch.nn.GELU()
    gelu.load_state_dict(model.state_dict())
    _assert_same_tower(_functional_path(gelu, pixels, tau), _module_path(gelu, pixels, tau))
    with_gelu, with_quick_gelu = _functional_path(gelu, pixels, tau), _functional_path(model, pixels, tau)
    differ = not torch.equal(
        with_gelu.tokens_per_layer, with_quick_gelu.tokens_per_layer
    ) or not torch.allclose(with_gelu.features[0], with_quick_gelu.features[0])
    assert differ, "the activation must matter, or this test shows nothing"


def test_unknown_towers_keep_the_module_path(tower) -> None:
    model, _, _ = tower
    vt = vision_transformer(model)
    original = model.config.hidden_act
    try:
        model.config.hidden_act = "relu"
        assert functional_blocks(vt) is None
    finally:
        model.config.hidden_act = original
    extra = vitl_geometry_clip()
    vision_transformer(extra).encoder.layers[3].register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
    assert functional_blocks(vision_transformer(extra)) is None


def test_compiled_block_equals_plain_block(tower) -> None:
    """torch.compile(static_block) (inductor, CPU) merges exactly like the plain function."""
    model, pixels, tau = tower
    compiled = torch.compile(static_block, fullgraph=True)
    try:
        got = _functional_path(model, pixels, tau, compiled)
    except RuntimeError as err:  # dynamo / inductor errors are RuntimeErrors
        missing = _missing_module(err)
        if missing not in ("pkg_resources", "setuptools"):  # only inductor's C++ build toolchain
            raise
        pytest.skip(f"inductor cannot build CPU kernels in this environment (no {missing!r} module): {err}")
    _assert_same_tower(got, _functional_path(model, pixels, tau))


def _missing_module(err: BaseException | None) -> str | None:
    """The module whose absence made a compile fail (torch 2.1's inductor imports pkg_resources,
    which setuptools >= 81 no longer ships), if that is what happened."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError):
            return err.name
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


def test_graphed_forward_runs_the_compiled_blocks(tower, monkeypatch) -> None:
    """`compiled_thresholds` routes the whole-tower call through `compiled_step` (off-GPU the graph
    cache runs it eagerly), and a tower the functional block does not know keeps the plain path."""
    model, pixels, tau = tower
    vt = vision_transformer(model)
    layers = model.config.num_hidden_layers
    rule, may_merge = threshold_rule(tau, layers)
    n_run = layers_to_run(layers, -2)
    steps = []

    def counting_step(*args):
        steps.append(args[5] is not None)
        return static_block(*args)

    monkeypatch.setattr(cuda_graph, "compiled_step", lambda: counting_step)
    with torch.no_grad():
        state = graphed_forward(vt, pixels, rule, may_merge, n_run, ("compiled-test",), 0, tau)
    assert steps == may_merge[:n_run]
    _assert_same_tower(finish(state, layers), _module_path(model, pixels, tau))

    steps.clear()
    monkeypatch.setattr(cuda_graph, "functional_blocks", lambda vt: None)
    with torch.no_grad():
        state = graphed_forward(vt, pixels, rule, may_merge, n_run, ("compiled-test",), 0, tau)
    assert steps == [], "an unknown tower must not reach the compiled step"
    _assert_same_tower(finish(state, layers), _module_path(model, pixels, tau))
