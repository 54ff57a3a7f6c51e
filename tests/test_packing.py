import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_residual import ResiDualConfig, ResiDualInputError
from peft_residual.packing import canonical_signs, pack_orthonormal, packed_size, unpack_orthonormal

from .conftest import make_model
from .testing_utils import fitted


def random_rows(rank: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0].T


@pytest.mark.parametrize(("rank", "dim"), [(1, 7), (3, 9), (8, 9), (9, 9), (64, 65)])
def test_reflectors_rebuild_the_rows_up_to_sign(rank, dim):
    rows = random_rows(rank, dim)
    packed = pack_orthonormal(rows)
    assert packed.shape == (packed_size(rank, dim),) == (rank * dim - rank * (rank + 1) // 2,)
    rebuilt = unpack_orthonormal(packed, rank, dim)
    torch.testing.assert_close(rebuilt, canonical_signs(rows), rtol=0, atol=1e-12)


def test_rows_already_on_the_axes_survive_zero_reflectors():
    """geqrf gives tau = 0 for a column already on its axis; the rebuilt tau = 2 then only flips a sign."""
    rows = torch.eye(5, dtype=torch.float64)[[0, 2, 1]] * torch.tensor([[1.0], [-1.0], [1.0]], dtype=torch.float64)
    rebuilt = unpack_orthonormal(pack_orthonormal(rows), 3, 5)
    torch.testing.assert_close(rebuilt, canonical_signs(rows), rtol=0, atol=0)


def test_rounded_reflectors_still_give_exactly_orthonormal_rows():
    rows = random_rows(16, 33, seed=3)
    rebuilt = unpack_orthonormal(pack_orthonormal(rows).half(), 16, 33)
    torch.testing.assert_close(rebuilt @ rebuilt.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-13)
    # the spanned subspace moves by float16 rounding only
    assert float((rebuilt.T @ rebuilt - rows.T @ rows).abs().max()) < 1e-3


def test_a_matrix_basis_from_an_older_version_is_a_clear_error(tmp_path):
    model = fitted("dinov2", ResiDualConfig(k=3))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(key for key in tensors if key.endswith("residual_basis"))
    tensors[key] = torch.zeros(4 * 3, 9)
    save_file(tensors, path)
    from peft import PeftModel

    with pytest.raises(ResiDualInputError, match=r"Householder.*Refit"):
        PeftModel.from_pretrained(make_model("dinov2"), tmp_path)
