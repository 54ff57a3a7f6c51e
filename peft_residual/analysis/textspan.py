"""Text descriptions of CLIP heads: TextSpan (Gandelsman et al., 2024) and simultaneous orthogonal matching pursuit.

Both pick, from a bank of text embeddings in the image embedding space, the few texts that best explain a head's
direct contributions ``C`` ``[n, dim]`` over some images (centred):

- TextSpan: repeatedly take the text whose direction carries the most variance of ``C``, then project that
  direction out of ``C`` and out of every text;
- SOMP: repeatedly take the text most correlated with the residual of ``C`` (summed over images), then refit
  ``C`` by least squares on all texts taken so far.

Only meaningful with real CLIP weights; on a random model the descriptions are arbitrary (but deterministic).
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from ..classifiers import text_embedder
from ..errors import ResiDualInputError


def default_text_bank() -> list[str]:
    """The shipped bank of short image descriptions (one per line of ``analysis/text_bank.txt``)."""
    text = resources.files("peft_residual").joinpath("analysis/text_bank.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings ``[texts, projection_dim]`` (on the CPU) from the text tower of a CLIP, BLIP or
    open_clip ``model`` (see :func:`peft_residual.classifiers.text_embedder`).

    Example:
        >>> bank = embed_texts(clip, tokenizer, default_text_bank())
    """
    embed = text_embedder(model, tokenizer)
    return F.normalize(
        torch.cat([embed(texts[i : i + batch_size]).cpu() for i in range(0, len(texts), batch_size)]), dim=-1
    )


def _check(contributions: torch.Tensor, texts: torch.Tensor, steps: int) -> None:
    if contributions.dim() != 2 or texts.dim() != 2 or contributions.shape[1] != texts.shape[1]:
        raise ResiDualInputError(
            f"Need contributions [images, dim] and texts [texts, dim] of one dim, got {tuple(contributions.shape)} "
            f"and {tuple(texts.shape)}."
        )
    if not 0 < steps <= len(texts):
        raise ResiDualInputError(f"steps must be in 1..{len(texts)} (the bank's size), got {steps}.")


@torch.no_grad()
def text_span(contributions: torch.Tensor, texts: torch.Tensor, steps: int = 5) -> list[tuple[int, float]]:
    """``(text index, share of the head's variance it explains)`` for ``steps`` greedy TextSpan picks."""
    _check(contributions, texts, steps)
    data = contributions.double() - contributions.double().mean(0)
    bank = texts.double().clone()
    total = float(data.pow(2).sum())
    picks = []
    for _ in range(steps):
        directions = F.normalize(bank, dim=-1)
        variance = (data @ directions.T).pow(2).sum(0)
        variance[[i for i, _ in picks]] = -1.0
        best = int(variance.argmax())
        direction = directions[best]
        picks.append((best, float(variance[best]) / total if total > 0 else 0.0))
        data = data - torch.outer(data @ direction, direction)
        bank = bank - torch.outer(bank @ direction, direction)
    return picks


@torch.no_grad()
def somp(contributions: torch.Tensor, texts: torch.Tensor, steps: int = 5) -> list[tuple[int, float]]:
    """``(text index, share of the head's variance explained by the texts so far)`` for ``steps`` SOMP picks."""
    _check(contributions, texts, steps)
    data = contributions.double() - contributions.double().mean(0)
    bank = texts.double()
    total = float(data.pow(2).sum())
    residual, chosen, picks = data, [], []
    for _ in range(steps):
        correlation = (residual @ bank.T).abs().sum(0)
        correlation[chosen] = -1.0
        chosen.append(int(correlation.argmax()))
        atoms = bank[chosen]  # least squares of every image on the chosen texts
        coefficients = torch.linalg.lstsq(atoms.T, data.T).solution
        residual = data - coefficients.T @ atoms
        picks.append((chosen[-1], 1.0 - float(residual.pow(2).sum()) / total if total > 0 else 0.0))
    return picks
