"""The adapted forward is a function of its inputs: threads, nested calls, gradients, export and compile."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, fit_residual_bases, records
from peft_residual.recording import record_backbone

from .conftest import images, loader, make_model, model_output, run_model

KINDS = ["clip_vision_projection", "dinov2", "open_clip", "timm"]


def fitted(kind: str, config: ResiDualConfig | None = None, dtype: torch.dtype = torch.float32):
    model = get_peft_model(make_model(kind).to(dtype), config or ResiDualConfig.residual())
    fit_residual_bases(model, [{"pixel_values": b["pixel_values"].to(dtype)} for b in loader()], progress=False)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_on_one_model_give_single_threaded_results(kind):
    model = fitted(kind)
    inputs = [images(2, seed=seed) for seed in range(8)]
    with torch.no_grad():
        expected = [model_output(model, x) for x in inputs]
    wrong, errors = [], []

    def work(thread: int) -> None:
        for step in range(40):
            index = (thread + 2 * step) % len(inputs)
            try:
                with torch.no_grad():
                    out = model_output(model, inputs[index])
                if not torch.allclose(out, expected[index], rtol=1e-5, atol=1e-6):
                    wrong.append((thread, step))
            except Exception as error:
                errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(wrong), errors) == (0, [])


@pytest.mark.parametrize("kind", KINDS)
def test_a_forward_nested_inside_another_gives_both_their_own_outputs(kind):
    model = fitted(kind)
    outer_x, inner_x = images(3, seed=11), images(2, seed=12)
    with torch.no_grad():
        outer_expected, inner_expected = model_output(model, outer_x), model_output(model, inner_x)
    inner = []
    arch = model.base_model.arch
    mlp = arch.model.get_submodule(arch.spec.mlp_out.format(i=0))

    def run_inner(module, args, output) -> None:
        if not inner:  # the inner pass fires this hook too: run it once
            inner.append(None)
            inner[0] = model_output(model, inner_x)

    handle = mlp.register_forward_hook(run_inner)
    try:
        with torch.no_grad():
            outer = model_output(model, outer_x)
    finally:
        handle.remove()
    assert len(inner) == 1
    torch.testing.assert_close(outer, outer_expected, rtol=0, atol=0)
    torch.testing.assert_close(inner[0], inner_expected, rtol=0, atol=0)
    assert records.current_record() is None


def test_a_forward_that_raises_leaves_no_record_behind():
    model = fitted("dinov2")
    with pytest.raises(RuntimeError, match="boom"):
        _raise_inside(model)
    assert records.current_record() is None
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, images(2)), model_output(model, images(2)))


def test_a_tower_run_alone_leaves_no_record_behind():
    """BLIP-retrieval's readout wraps vision_proj, outside the vision tower: the tower alone never reaches it."""
    model, x = fitted("blip"), images(2)
    with torch.no_grad():
        fresh = model_output(model, x)
        model.base_model.model.vision_model(pixel_values=images(2, seed=3))
        assert records._STACK.records == []
        torch.testing.assert_close(model_output(model, x), fresh, rtol=0, atol=0)
        assert records._STACK.records == [] and records._STACK.handed_over is None


def _raise_inside(model) -> None:
    arch = model.base_model.arch
    mlp = arch.model.get_submodule(arch.spec.mlp_out.format(i=1))

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = mlp.register_forward_hook(fail)
    try:
        run_model(model, images(2))
    finally:
        handle.remove()


def _directional_check(function, point: torch.Tensor, gradient: torch.Tensor, seed: int = 0) -> None:
    """``<gradient, v>`` equals the float64 central difference of ``function`` along a random ``v``."""
    direction = torch.randn(point.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step = 1e-5
    with torch.no_grad():
        difference = (function(point + step * direction) - function(point - step * direction)) / (2 * step)
    analytic = (gradient * direction).sum()
    assert float(analytic.abs()) > 1e-6  # a zero gradient would pass a difference of zero
    torch.testing.assert_close(analytic, difference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("merged", [False, True], ids=["live", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_the_input_and_equals_a_central_difference(kind, merged):
    model = fitted(kind, dtype=torch.float64)
    if merged:  # the fold's norm statistics must stay differentiable there too
        model.merge_adapter()
    weights = torch.randn(model_output(model, images(1).double()).shape[-1], dtype=torch.float64)
    x = images(2, seed=5).double().requires_grad_(True)
    loss = lambda pixels: (model_output(model, pixels) * weights).sum()  # noqa: E731
    (gradient,) = torch.autograd.grad(loss(x), x)
    _directional_check(loss, x.detach(), gradient)
    with model.disable_adapter():
        (base_gradient,) = torch.autograd.grad(loss(x), x)
    assert not torch.allclose(gradient, base_gradient)  # the adapter's own gradient, not the base model's


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_a_trainable_backbone_weight(kind):
    model = fitted(kind, dtype=torch.float64)
    arch = model.base_model.arch
    block = arch.model.get_submodule(arch.spec.mlp_out.format(i=0).rpartition(".")[0])
    queries = ("q_proj.weight", "query.weight", "qkv.weight", "in_proj_weight")  # timm and open_clip pack q, k, v
    weight = next(param for name, param in block.named_parameters() if name.endswith(queries))
    weight.requires_grad_(True)
    x, original = images(2, seed=6).double(), weight.detach().clone()
    probe = torch.randn(model_output(model, x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(value: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight.copy_(value)
        return (model_output(model, x) * probe).sum()

    (gradient,) = torch.autograd.grad(loss(original), weight)
    _directional_check(loss, original, gradient)


def test_no_grad_keeps_no_graph_and_the_cached_path_none():
    model = fitted("clip_vision_projection")
    with torch.no_grad():
        out = model_output(model, images(2))
    assert out.grad_fn is None and records.current_record() is None
    record = record_backbone(model.base_model.arch, images(2))
    assert all(piece.grad_fn is None for piece in [record.embedding, *record.heads.values(), *record.mlps.values()])


@pytest.mark.parametrize("merged", [False, True], ids=["live", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_and_fullgraph_compile_equal_eager(kind, merged):
    torch._dynamo.reset()  # each case compiles the same code objects anew: no recompile limit carried across cases
    model = fitted(kind)
    if merged:
        model.merge_adapter()
    x = images(3, seed=9)
    with torch.no_grad():
        eager = model_output(model, x)
    traced = model.base_model.model.visual if kind == "open_clip" else model  # its CLIP's forward needs text
    positional = kind in ("open_clip", "timm")
    args, kwargs = ((x,), {}) if positional else ((), {"pixel_values": x})
    exported = torch.export.export(traced, args, kwargs)
    torch.testing.assert_close(_embedding(exported.module()(*args, **kwargs)), eager, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(_embedding(compiled(*args, **kwargs)), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fullgraph_compile_with_gradients_on_equals_eager(kind):
    """Training, or a forward outside ``no_grad``: the compiled model is one graph there too, even as the first
    forward with gradients on (its first lookups happen inside the trace), and gives eager's input gradient."""
    torch._dynamo.reset()
    model = fitted(kind)
    traced = model.base_model.model.visual if kind == "open_clip" else model
    positional = kind in ("open_clip", "timm")
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    gradients = []
    for forward in (compiled, traced):  # compiled first: nothing looked up by an eager forward before
        pixels = images(3, seed=9).requires_grad_()
        output = forward(pixels) if positional else forward(pixel_values=pixels)
        _embedding(output).square().sum().backward()
        gradients.append(pixels.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-6)


def _embedding(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):  # open_clip, timm
        return output
    return output.image_embeds if getattr(output, "image_embeds", None) is not None else output.pooler_output
