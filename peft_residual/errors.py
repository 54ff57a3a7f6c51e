"""ResiDual's error type for bad user input. A leaf module: it imports nothing from the package, so every folder
(tuner, models, data, training, analysis) can raise it without importing another."""

from __future__ import annotations


class ResiDualInputError(ValueError):
    """A configuration, data set, file or argument that ResiDual cannot use; the message says how to fix it. The one
    exception type for bad user input, so that callers (the CLI) can tell it from a bug."""
