"""Many tasks from one backbone pass: PEFT's per-sample ``adapter_names`` and ``embed_all_adapters``."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, ResiDualInputError, embed_all_adapters, embed_images, fit_residual_bases

from .conftest import images, loader, make_model

TASKS = {  # three adapters that differ in every way a readout can: units, k, conventions, remainder
    "default": ResiDualConfig(k=4),
    "all-units": ResiDualConfig.preset("residual"),
    "mean-rest": ResiDualConfig(k=3, units="heads+mlps", rest="mean", ln_mean="unit", seed=7),
}


@pytest.fixture(scope="module", params=["clip_vision_projection", "dinov2", "vit"])
def multitask(request):
    """A model with every adapter of :data:`TASKS` fitted on its own reference images."""
    model = get_peft_model(make_model(request.param), TASKS["default"])
    for seed, (name, config) in enumerate(TASKS.items()):
        if name != "default":
            model.add_adapter(name, config)
        model.set_adapter(name)
        fit_residual_bases(model, loader(seed=seed + 10), progress=False)
    return model


def each_alone(model, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every adapter's embedding, one adapted forward each."""
    alone = {}
    with torch.no_grad():
        for name in TASKS:
            model.set_adapter(name)
            alone[name] = embed_images(model, pixel_values)
        with model.disable_adapter():
            alone["__base__"] = embed_images(model, pixel_values)
    model.set_adapter("default")
    return alone


def embedding_of(output) -> torch.Tensor:
    """What embed_images takes from a forward's output: the projection, else the normed CLS token."""
    return output.image_embeds if hasattr(output, "image_embeds") else output.last_hidden_state[:, 0]


def embedding_calls(model):
    """A hook counting the images of each embedding (backbone) call, and its handle."""
    calls = []
    embedding = model.base_model.arch.module(model.base_model.arch.spec.embedding)
    return calls, embedding.register_forward_hook(lambda module, args, output: calls.append(len(output)))


def test_every_adapter_from_one_backbone_pass_equals_each_alone(multitask):
    x = images(6, seed=3)
    alone = each_alone(multitask, x)
    calls, handle = embedding_calls(multitask)
    with torch.no_grad():
        together = embed_all_adapters(multitask, x)
    handle.remove()
    assert calls == [6]  # one backbone pass for all three tasks
    assert list(together) == list(TASKS)
    for name in TASKS:
        assert torch.equal(together[name], alone[name]), name
    assert not torch.allclose(together["default"], together["all-units"])  # the tasks do differ
    subset = embed_all_adapters(multitask, x, adapter_names=["mean-rest", "__base__"])
    assert torch.equal(subset["mean-rest"], alone["mean-rest"]) and torch.equal(subset["__base__"], alone["__base__"])


def test_a_mixed_batch_gives_each_sample_its_adapters_output_exactly(multitask):
    x = images(7, seed=4)
    alone = each_alone(multitask, x)
    names = ["all-units", "default", "__base__", "mean-rest", "all-units", "default", "mean-rest"]
    with torch.no_grad():
        mixed = embedding_of(multitask(pixel_values=x, adapter_names=names))
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], alone[name][row]), (row, name)


def test_a_mixed_batch_keeps_its_gradient_per_sample(multitask):
    x = images(2, seed=5).requires_grad_()
    embedding = embedding_of(multitask(pixel_values=x, adapter_names=["all-units", "__base__"]))
    (grad,) = torch.autograd.grad(embedding[0].sum(), x)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0  # each sample depends on its own image only


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["default", "nope"], "unknown adapter"),
        ("default", "a list of adapter names"),
        (["default"], "1 names for a batch of 2"),
    ],
)
def test_bad_adapter_names_are_errors(multitask, names, message):
    with pytest.raises(ResiDualInputError, match=message), torch.no_grad():
        multitask(pixel_values=images(2, seed=6), adapter_names=names)


def test_embed_all_adapters_refuses_a_model_without_residual_adapters():
    with pytest.raises(ResiDualInputError, match="needs a PeftModel with ResiDual adapters"):
        embed_all_adapters(make_model("dinov2"), images(2))
