"""The paper's analyses of the units: intrinsic dimension, spectral similarity between fits, TextSpan/SOMP.

Every function takes direct contributions ``[images, units, dim]`` (``UnitStore.contributions()`` or
``decompose_units``) and the unit names, so one backbone pass serves all of them.

Example:
    >>> units = collect_units(model, DataLoader(images, batch_size=64))
    >>> dims = unit_dimensions(units.contributions(), Architecture(model).unit_names)
    >>> is_hunchback(layer_profile(dims)["two_nn"]["heads"])
"""

from .intrinsic_dimension import is_hunchback, layer_profile, linear_dimension, two_nn_dimension, unit_dimensions
from .spectral import Spectrum, similarity_matrix, spectral_similarity, unit_spectra
from .textspan import default_text_bank, embed_texts, somp, text_span

__all__ = [
    "Spectrum",
    "default_text_bank",
    "embed_texts",
    "is_hunchback",
    "layer_profile",
    "linear_dimension",
    "similarity_matrix",
    "somp",
    "spectral_similarity",
    "text_span",
    "two_nn_dimension",
    "unit_dimensions",
    "unit_spectra",
]
