"""Device placement without a GPU: every architecture's adapted model on torch's fake CUDA tensors.

``torch._subclasses.FakeTensorMode`` gives tensors a device and a shape but no data, so a CUDA build of torch
places them on ``cuda:0`` on a machine without a GPU, and raises wherever an op mixes devices as CUDA would (a CPU
tensor of more than zero dimensions beside a CUDA one). Each model is fitted on the CPU, then moved with
``.to("cuda")`` inside the mode. What cannot run there is anything that reads values: the readout's derived state
(its plan, the merged scales) is rebuilt from the fitted bases when the model moves. So the harness keeps a real
CPU twin of the model and, whenever a readout layer refreshes, refreshes the twin's instead and moves what it built
to the fake device as ``refresh`` moves it (``.to(device)`` of every tensor). The forward, its gradient graph,
per-sample ``adapter_names``, ``embed_all_adapters``, merge, disable and bfloat16 then run on fake CUDA tensors,
and an audit fails any op that touches a CPU tensor of more than zero dimensions (but for tensors made from Python
data, which go through the host on a GPU too, and :data:`THIRD_PARTY` ops). As the harness moves all that a refresh
builds, a refresh that left a tensor on the CPU is not seen here; ``tests/test_cuda.py`` sees it on a GPU.

The autograd engine itself cannot run a backward on fake CUDA tensors without a GPU (it asks the driver for the
device's context), so the gradient check builds the graph and checks that it reaches the pixels and the scales
and that every tensor it saves for the backward is on CUDA; ``tests/test_cuda.py`` runs real backwards on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from peft import get_peft_model
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import peft_residual
from peft_residual import ResiDualConfig, embed_all_adapters, embed_images, fit_residual_bases

from .conftest import KINDS, images, loader, make_model

pytestmark = pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build")

ADAPTERS = {"default": ResiDualConfig.preset("residual"), "heads": ResiDualConfig(k=4)}
FIT_IMAGES = {"default": 64, "heads": 32}  # all components of 32-dimensional units want more images than k=4 heads
THIRD_PARTY = {  # ops on the CPU that are not ResiDual's: (kind, op) -> why
    ("blip", "aten.ones.default"): "BlipForImageTextRetrieval.forward makes image_atts on the CPU (transformers)",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def fitted(kind: str, adapters: tuple[str, ...] = tuple(ADAPTERS)) -> torch.nn.Module:
    """A tiny ``kind`` with fitted ResiDual adapters (of :data:`ADAPTERS`; the first active), on the CPU."""
    model = get_peft_model(make_model(kind), ADAPTERS[adapters[0]], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, ADAPTERS[name])
    for name in reversed(adapters):
        model.set_adapter(name)
        fit_residual_bases(model, loader(n=FIT_IMAGES[name]), progress=False)
    return model


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Any, bool]:
    """``value`` with ``fn`` applied to every tensor inside it (dicts, lists, tuples, named tuples, dataclasses), and
    whether it held any; a value holding a module is returned as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value), True
    if isinstance(value, torch.nn.Module):
        return value, False
    if isinstance(value, dict):
        items = {key: _map_tensors(item, fn) for key, item in value.items()}
        if any(isinstance(item, torch.nn.Module) for item in value.values()):
            return value, False
        return type(value)((key, item) for key, (item, _) in items.items()), any(held for _, held in items.values())
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, torch.nn.Module) for item in value):
            return value, False
        items = [_map_tensors(item, fn) for item in value]
        mapped = [item for item, _ in items]
        rebuilt = type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
        return rebuilt, any(held for _, held in items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        if any(held for _, held in fields.values()):
            return dataclasses.replace(value, **{name: item for name, (item, _) in fields.items()}), True
    return value, False


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data (strings, numbers, and lists, tuples, sets and dicts of them)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_plain(key) and _plain(item) for key, item in value.items())
    return False


@contextmanager
def fake_cuda(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[FakeTensorMode]:
    """``model`` (fitted, on the CPU) moved to fake ``cuda:0`` (and cast to ``dtype``) inside a ``FakeTensorMode``,
    which stays active for the block; it then takes no real tensor as input (move one in with :func:`to_cuda`).

    Each readout layer's refresh runs on a real CPU twin of the model (cast like it), and what it builds, every
    attribute holding tensors, is moved to the fake device; the twin takes the readout's plain state (merged and
    active adapters) first. The scales must not change inside the block (the twin keeps the fitted ones)."""
    twin = copy.deepcopy(model)
    if dtype is not None:
        twin.to(dtype)
    readout_type = peft_residual.ResiDualReadoutLayer
    names = {id(module): name for name, module in model.named_modules() if isinstance(module, readout_type)}
    original = readout_type.refresh
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = torch.device("cuda", 0)

    def refresh(layer, *args, **kwargs):
        if id(layer) not in names:  # the twin's own, or another model's
            return original(layer, *args, **kwargs)
        real = twin.get_submodule(names[id(layer)])
        for key, value in vars(layer).items():  # merged and active adapters
            if not key.startswith("_") and _plain(value):
                setattr(real, key, copy.copy(value))
        with _disable_current_modes():  # real arithmetic on the twin, outside the fake mode and any audit
            original(real, *args, **kwargs)
            with mode:
                for key, value in vars(real).items():  # what the refresh built: plans, merged scales
                    if key not in ("_parameters", "_buffers", "_modules"):
                        moved, held = _map_tensors(value, lambda t: mode.from_tensor(t).to(device))
                        if held:
                            setattr(layer, key, moved)

    readout_type.refresh = refresh
    try:
        with mode:
            model.to(device, dtype) if dtype is not None else model.to(device)
            mode.allow_non_fake_inputs = False  # from here any real tensor left in the model is an error
            yield mode
    finally:
        readout_type.refresh = original


def to_cuda(mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    return mode.from_tensor(tensor).to("cuda")


class DeviceAudit(TorchDispatchMode):
    """Notes every op that takes or gives a CPU tensor of more than zero dimensions (a CPU scalar beside CUDA
    tensors is what CUDA itself allows), but for a tensor made from Python data (``torch.tensor(..., device=)``
    goes through the host on a GPU too) and its copy to the device."""

    LIFTED = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)

    def __init__(self) -> None:
        super().__init__()
        self.off_device: Counter[str] = Counter()
        self.lifted: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.LIFTED:
            self.lifted.append(out)
            return out
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        off = [t for t in tensors if t.device.type != "cuda" and t.dim() > 0]
        if any(all(t is not lifted for lifted in self.lifted) for t in off):
            self.off_device[str(func)] += 1
        return out


def tensors_in(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # a ModelOutput too
        return [t for value in output.values() for t in tensors_in(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in tensors_in(value)]
    return []


@contextmanager
def step(kind: str, name: str) -> Iterator[None]:
    """Fails the test naming the step, for a device mismatch (or any other error) raised inside."""
    try:
        yield
    except Exception as error:
        pytest.fail(f"{kind}, {name}: {type(error).__name__}: {error}")


def assert_on_cuda(kind: str, name: str, output: Any, dtype: torch.dtype | None = None) -> None:
    tensors = tensors_in(output)
    assert tensors, f"{kind}, {name}: no tensor in the output"
    wrong = [(tuple(t.shape), str(t.device)) for t in tensors if t.device.type != "cuda"]
    assert not wrong, f"{kind}, {name}: outputs off CUDA: {wrong}"
    if dtype is not None:
        assert tensors[0].dtype == dtype, f"{kind}, {name}: {tensors[0].dtype}"


def forward_with_adapter_names(model: torch.nn.Module, kind: str, x: torch.Tensor, names: list[str]) -> Any:
    """PEFT's ``model(..., adapter_names=)``, with the text inputs the two-tower models' forward asks for."""
    if kind in ("open_clip", "timm"):
        return model(x, adapter_names=names)
    if kind in ("clip", "blip"):
        ids = torch.tensor([[0, 5, 6, 2]] * len(x), device=x.device)
        extra = {"use_itm_head": False} if kind == "blip" else {}
        return model(pixel_values=x, input_ids=ids, adapter_names=names, **extra)
    return model(pixel_values=x, adapter_names=names)


def graph_leaves(output: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors ``output``'s autograd graph reaches."""
    seen, stack, leaves = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("kind", KINDS)
def test_every_tensor_is_on_cuda(kind):
    model = fitted(kind)
    half = copy.deepcopy(model)
    x = images(3)
    with fake_cuda(model) as mode:
        pixels = to_cuda(mode, x)
        pixels_with_grad = pixels.clone().requires_grad_()
        with DeviceAudit() as audit:
            with step(kind, "forward"):
                assert_on_cuda(kind, "forward", embed_images(model, pixels))

            with step(kind, "gradient graph"):
                saved: list[str] = []
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(str(t.device)) or t, lambda t: t):
                    embedding = embed_images(model, pixels_with_grad)
                leaves = graph_leaves(embedding)
            assert_on_cuda(kind, "gradient graph", embedding)
            assert any(leaf is pixels_with_grad for leaf in leaves), f"{kind}: the graph does not reach the pixels"
            trainable = [p for p in model.parameters() if p.requires_grad]  # the active adapter's scales
            assert trainable and all(any(leaf is p for leaf in leaves) for p in trainable), f"{kind}: scales off graph"
            assert saved and set(saved) == {"cuda:0"}, f"{kind}: saved for backward on {Counter(saved)}"

            with step(kind, "adapter_names"):
                mixed = forward_with_adapter_names(model, kind, pixels, ["default", "heads", "__base__"])
            assert_on_cuda(kind, "adapter_names", mixed)
            with step(kind, "embed_all_adapters"):
                every = embed_all_adapters(model, pixels)
            assert sorted(every) == sorted(ADAPTERS)
            assert_on_cuda(kind, "embed_all_adapters", list(every.values()))
            with step(kind, "merged"):
                model.merge_adapter()
                assert_on_cuda(kind, "merged", embed_images(model, pixels))
                model.unmerge_adapter()
            with step(kind, "disabled"), model.disable_adapter():
                assert_on_cuda(kind, "disabled", embed_images(model, pixels))
    off_device = {op: n for op, n in audit.off_device.items() if (kind, op) not in THIRD_PARTY}
    assert not off_device, f"{kind}: ops on CPU tensors: {off_device}"

    with fake_cuda(half, torch.bfloat16) as mode:
        pixels = to_cuda(mode, x).to(torch.bfloat16)
        with DeviceAudit() as audit, step(kind, "bfloat16"):
            assert_on_cuda(kind, "bfloat16", embed_images(half, pixels), torch.bfloat16)
            half.merge_adapter()
            assert_on_cuda(kind, "bfloat16 merged", embed_images(half, pixels), torch.bfloat16)
    assert not audit.off_device, f"{kind}, bfloat16: ops on CPU tensors: {dict(audit.off_device)}"


def test_a_cpu_tensor_in_the_model_fails():
    """The harness sees a misplaced tensor: a norm weight left on the CPU makes the forward fail, and the audit
    notes it."""
    model = fitted("dinov2", ("heads",))
    with fake_cuda(model) as mode:
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
        with unset_fake_temporarily():
            on_cpu = torch.ones(norm.weight.shape)
        norm.weight = torch.nn.Parameter(mode.from_tensor(on_cpu), requires_grad=False)
        with pytest.raises(RuntimeError, match="device"), DeviceAudit() as audit:
            embed_images(model, to_cuda(mode, images(2)))
    assert audit.off_device


def test_a_cache_encoded_on_the_cpu_trains_with_scales_on_cuda():
    """``train_residual`` on a GPU machine with the model left on the CPU: the cache is where the model is, the
    scales on the accelerator's device; the training product must bring the cache's rows over."""
    from peft_residual import ScaleSet, encode_dataset

    from .conftest import image_dataset

    model = get_peft_model(make_model("dinov2"), ResiDualConfig(k=4))
    fit_residual_bases(model, loader(), progress=False)
    cache = encode_dataset(model, image_dataset(32), progress=False)
    scales = ScaleSet(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        scales.values = torch.nn.Parameter(scales.values.to("cuda"))
        scales.components = scales.components.to("cuda", torch.float32)
        output = scales.output(cache.scores[:8], cache.offset[:8])
        assert output.device.type == "cuda"
