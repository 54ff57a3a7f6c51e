"""On a real GPU (marked ``cuda``, skipped without one): the adapted forward equals the CPU's, gradients and
bfloat16 run, training on the unit cache and under Accelerate works, and ``torch.compile(mode="reduce-overhead")``
(CUDA graphs) of the merged model equals eager with no graph skipped. ``benchmarks/gpu_check.sh`` runs them with
the GPU benchmarks; ``tests/test_fake_cuda.py`` checks device placement on every machine."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_residual import (
    CentroidClassifier,
    ResiDualConfig,
    embed_all_adapters,
    embed_images,
    fit_residual_bases,
    train_residual,
)

from .conftest import KINDS, image_dataset, images, loader, make_model, model_output

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"),
]

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # float32 on both, TF32 off: only the kernels' summation order differs


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off (cuDNN's convolutions use it by default), so that the GPU's float32 is the CPU's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def fitted(kind: str) -> torch.nn.Module:
    """A tiny ``kind`` with two fitted adapters, ResiDual ("default", active) and k=4 heads ("heads"), on the CPU."""
    model = get_peft_model(make_model(kind), ResiDualConfig.preset("residual"))
    model.add_adapter("heads", ResiDualConfig(k=4))
    for name in ("heads", "default"):
        model.set_adapter(name)
        fit_residual_bases(model, loader(n=64), progress=False)
    return model


@pytest.mark.parametrize("merged", [False, True], ids=["live", "merged"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_on_cuda_equals_the_cpu(kind, merged):
    model = fitted(kind)
    if merged:
        model.merge_adapter()
    x = images(4)
    with torch.no_grad():
        expected, expected_all = model_output(model, x), embed_all_adapters(model, x)
        model.to("cuda")
        got, got_all = model_output(model, x.cuda()), embed_all_adapters(model, x.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)
    for name, embedding in got_all.items():
        torch.testing.assert_close(embedding.cpu(), expected_all[name], **TOLERANCE)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_and_bfloat16_on_cuda(kind):
    model = fitted(kind)
    x = images(3).requires_grad_()
    (expected,) = torch.autograd.grad(model_output(model, x).square().sum(), x)
    model.to("cuda")
    x_cuda = images(3).cuda().requires_grad_()
    model_output(model, x_cuda).square().sum().backward()
    torch.testing.assert_close(x_cuda.grad.cpu(), expected, rtol=1e-3, atol=1e-4)
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    model.to(torch.bfloat16)
    with torch.no_grad():
        half = model_output(model, images(3).cuda().bfloat16())
    assert half.dtype == torch.bfloat16 and half.device.type == "cuda" and torch.isfinite(half).all()


def model_and_classifier(device: str | None = "cuda"):
    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4, units="heads+mlps"))
    fit_residual_bases(model, loader(n=128), progress=False)
    data = image_dataset(128)
    classifier = CentroidClassifier.from_model(model, [data[:]], list("abcd"), progress=False)
    return (model.to(device) if device else model), classifier, data


def scales_of(model) -> torch.Tensor:
    """The active adapter's scales (its trainable parameters), flat, on the CPU."""
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]).cpu()


def check_trained(model, result, before: torch.Tensor) -> None:
    """Trained from the cache: the loss fell, the scales moved and stayed on the GPU, and the model on the GPU gives
    what the same model gives on the CPU."""
    trained = [p for p in model.parameters() if p.requires_grad]
    assert result.cached and all(p.device.type == "cuda" and torch.isfinite(p).all() for p in trained)
    assert not torch.equal(scales_of(model), before)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    x = images(4)
    with torch.no_grad():
        on_cuda = embed_images(model, x.cuda()).cpu()
        torch.testing.assert_close(embed_images(model.cpu(), x), on_cuda, **TOLERANCE)


def test_training_on_the_cache_on_cuda():
    model, classifier, data = model_and_classifier()
    before = scales_of(model)
    result = train_residual(model, classifier, data, max_epochs=3, batch_size=16, cache=True, progress=False)
    check_trained(model, result, before)


def test_training_under_accelerate_on_cuda():
    from accelerate import Accelerator

    accelerator = Accelerator()
    assert accelerator.device.type == "cuda"
    model, classifier, data = model_and_classifier(accelerator.device)
    before = scales_of(model)
    options = {"max_epochs": 3, "batch_size": 16, "progress": False}
    result = train_residual(model, classifier, data, accelerator=accelerator, **options)
    check_trained(model, result, before)


def test_training_a_model_left_on_the_cpu():
    model, classifier, data = model_and_classifier(device=None)
    result = train_residual(model, classifier, data, max_epochs=2, batch_size=16, cache=True, progress=False)
    assert result.epochs_run == 2


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision_projection", "open_clip"])
def test_reduce_overhead_compile_of_the_merged_model_equals_eager(kind):
    """CUDA graphs (``mode="reduce-overhead"``), the GPU inference path: equal to eager, and no graph skipped
    (a CPU tensor or a mutated input in the graph would make inductor fall back to launching every kernel)."""
    from torch._dynamo.utils import counters

    model = fitted(kind).cuda()
    model.merge_adapter()
    inputs = [images(2, seed=seed).cuda() for seed in (3, 4, 5)]
    with torch.no_grad():
        eager = [embed_images(model, x) for x in inputs]
        counters.clear()
        compiled = torch.compile(lambda x: embed_images(model, x), mode="reduce-overhead")
        for x, expected in zip(inputs, eager, strict=True):  # warm-up, recording, replay
            torch.testing.assert_close(compiled(x).clone(), expected, **TOLERANCE)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
