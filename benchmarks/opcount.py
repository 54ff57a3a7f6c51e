"""Aten ops per forward: what a GPU launches (about one kernel each), counted on any device.

:func:`count_ops` runs a function under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` and counts the
aten ops that reach the dispatcher's backend, by name, less those in :data:`METADATA_ONLY`: ops that only make a
new view of existing storage (sizes, strides, offset) or drop autograd history, and so never launch a kernel on a
GPU. Everything else counts once per call, ``copy_`` and allocations (``new_zeros``, ``empty``) included.

The function runs under ``no_grad`` and outside ``inference_mode``: there composite ops reach the mode as the ops
their kernels run (``linear`` as ``t`` and ``addmm``, ``reshape`` as ``view`` or ``clone``), where under
``inference_mode`` they would reach it whole (the autograd keys that decompose them are skipped), though the same
kernels run below. So the count is that of an inference forward either way. Used by ``benchmarks.overhead`` and
``tests/test_opcount.py``; the library never imports it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

METADATA_ONLY = frozenset(
    {
        # views: a new size/stride/offset over the same storage
        "view", "_unsafe_view", "_reshape_alias", "view_as", "as_strided", "alias", "t", "transpose", "permute",
        "expand", "expand_as", "squeeze", "unsqueeze", "select", "slice", "narrow", "split", "split_with_sizes",
        "unbind", "chunk", "diagonal", "unflatten", "flatten", "unfold", "movedim", "view_as_real", "view_as_complex",
        "_unsafe_split", "_unsafe_split_with_sizes",
        # no data at all: autograd history dropped, a constant lifted, a shape, dtype or device read
        "detach", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride",
        "dim", "numel", "is_contiguous", "is_same_size", "promote_types", "result_type", "can_cast",
        "prim.device", "prim.layout",
    }
)  # fmt: skip
"""Op names that :func:`count_ops` leaves out: aten overload packets (``"view"`` for ``aten.view.default``), other
namespaces' ops with their namespace (``"prim.device"``)."""


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by overload-packet name (``"addmm"``, ``"copy_"``), all of
    them: :attr:`counts`; :meth:`kernels` leaves out :data:`METADATA_ONLY`. :attr:`views` names the ops seen whose
    schema says they return a view (every one should be in :data:`METADATA_ONLY`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.views: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        self.counts[name] += 1
        if func.is_view:
            self.views.add(name)
        return func(*args, **(kwargs or {}))

    def kernels(self) -> Counter[str]:
        """The counted ops less the metadata-only ones."""
        return Counter({name: n for name, n in self.counts.items() if name not in METADATA_ONLY})


def op_name(func: torch._ops.OpOverload) -> str:
    """``"addmm"`` for ``aten.addmm.default``; ``"prim.device"`` for an op outside aten."""
    name = func.overloadpacket.__name__
    return name if func.namespace == "aten" else f"{func.namespace}.{name}"


def count_ops(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Counter[str]:
    """The aten ops that ``function(*args, **kwargs)`` runs without gradients, by name, less :data:`METADATA_ONLY`;
    ``sum(....values())`` is the total.

    Example:
        >>> count_ops(lambda x: (x.t() @ x).relu().view(-1) + 1, torch.ones(2, 2))
        Counter({'mm': 1, 'relu': 1, 'add': 1})
    """
    with torch.inference_mode(False), torch.no_grad(), OpCounter() as counter:
        function(*args, **kwargs)
    return counter.kernels()
