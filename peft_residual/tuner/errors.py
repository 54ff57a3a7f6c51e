"""The one exception type for bad user input, so that callers (the CLI) can tell it from a bug."""


class ResiDualInputError(ValueError):
    """A configuration, data set, file or argument that ResiDual cannot use; the message says how to fix it."""
