"""ResiDual's error type for bad user input, and its warnings. A leaf module: it imports nothing from the package, so
every folder (tuner, models, data, training, analysis) can raise or warn without importing another."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

_LIBRARIES = ("peft_residual", "torch", "peft", "transformers")
"""The packages whose frames a warning skips: this one, and the libraries that call into it (``nn.Module.__call__``,
PEFT's forward, torch's ``no_grad`` decorator)."""


class ResiDualInputError(ValueError):
    """A configuration, data set, file or argument that ResiDual cannot use; the message says how to fix it. The one
    exception type for bad user input, so that callers (the CLI) can tell it from a bug."""


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the caller's own line: the first frame outside this package and the libraries it runs under, however
    deep the call (Python shows each distinct message once per such line).

    Example:
        >>> warn_caller("too few reference images; see FitReport.undersampled")
    """
    directories = tuple(
        str(Path(module.__file__).parent)
        for module in map(sys.modules.get, _LIBRARIES)
        if getattr(module, "__file__", None) is not None
    )
    directories += (contextlib.__file__,)  # a ``with`` around a forward (PEFT's forward hooks) runs in contextlib
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(directories):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
