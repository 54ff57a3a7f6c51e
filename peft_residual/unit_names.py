"""How a layer's units are named: ``layer3.head7``, ``layer3.mlp`` (the first unit is ``"embedding"``). A leaf
module: it imports nothing from the package, so model support writes the names and the tuner and the analyses read
them without importing one another."""

from __future__ import annotations

import re

UNIT_NAME = re.compile(r"layer(\d+)\.(?:head(\d+)|mlp)")
"""The one owner of the format: :func:`unit_name` writes it (``Architecture.unit_names``), :func:`head_of`, the
config's ``heads`` and the analyses read it."""


def unit_name(layer: int, head: int | None = None) -> str:
    """The name of head ``head`` of ``layer``, or of its MLP."""
    return f"layer{layer}.mlp" if head is None else f"layer{layer}.head{head}"


def head_of(name: str) -> tuple[int, int] | None:
    """``(layer, head)`` of a head's name, else ``None``."""
    match = UNIT_NAME.fullmatch(name)
    return (int(match[1]), int(match[2])) if match and match[2] is not None else None
