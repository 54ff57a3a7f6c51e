"""``torch.compile`` with inductor (its default mode) of the merged model equals eager, on the CPU.

The GPU inference path is ``torch.compile(mode="reduce-overhead")``: inductor's kernels replayed as CUDA graphs,
one launch per forward. On the CPU that mode is inductor without the graphs, which is what this checks;
``tests/test_cuda.py`` checks the CUDA graphs on a GPU. (``tests/test_stateless.py`` checks export and a fullgraph
compile with the ``aot_eager`` backend, which generates no kernels.)
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_residual import ResiDualConfig, embed_images, fit_residual_bases

from .conftest import images, loader, make_model


@pytest.fixture(autouse=True)
def one_thread():
    """Inductor's CPU kernels run OpenMP threads; on 2 shared cores a second one mostly waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_inductor_compile_of_the_merged_model_equals_eager():
    model = get_peft_model(make_model("dinov2", num_hidden_layers=1), ResiDualConfig.preset("residual"))
    fit_residual_bases(model, loader(), progress=False)
    model.merge_adapter()
    inputs = [images(3, seed=seed) for seed in (3, 4)]
    with torch.no_grad():
        eager = [embed_images(model, x) for x in inputs]
        compiled = torch.compile(lambda x: embed_images(model, x))
        for x, expected in zip(inputs, eager, strict=True):
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
