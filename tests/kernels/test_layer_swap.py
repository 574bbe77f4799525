"""lerp_: in place buf = (1 − α)·buf + α·other, for layer swapping (Bandarkar et al. 2024)."""
import pytest
import torch

from workbench.kernels.layer_swap import lerp_
from workbench.kernels.layer_swap import lerp_reference

# Tolerance against the reference: zero for every dtype (same two fp32 products and one sum on every
# backend, then one rounding to the storage dtype). Against the textbook formula in float64:
FORMULA = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
           torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_matches_reference(backend, make, size, dtype, alpha):
    buf, other = make.tensor(size, dtype), make.tensor(size, dtype)
    want = lerp_reference(buf.clone(), other, alpha)
    textbook = (1 - alpha) * buf.double() + alpha * other.double()
    mine = buf.to(backend)                                           # on CPU: buf itself
    result = lerp_(mine, other.to(backend), alpha)
    assert result is mine
    assert same_bits(mine.cpu(), want)
    torch.testing.assert_close(mine.cpu().double(), textbook, **FORMULA[dtype])


def test_large_tensor_on_cpu_path(cpu_backend, make, dtype):
    buf, other = make.tensor(1000003, dtype), make.tensor(1000003, dtype)
    want = lerp_reference(buf.clone(), other, 0.3)
    assert same_bits(lerp_(buf, other, 0.3), want)


def test_alpha_one_is_a_bitwise_copy(backend, make, size, dtype):
    buf, other = make.tensor(size, dtype).to(backend), make.tensor(size, dtype).to(backend)
    other[..., 0] = float("nan")                                     # copied as is, NaN payload included
    ptr = buf.data_ptr()
    lerp_(buf, other, 1.0)
    assert buf.data_ptr() == ptr and same_bits(buf, other)


def test_alpha_zero_does_not_write(backend, make, size, dtype):
    buf, other = make.tensor(size, dtype).to(backend), make.tensor(size, dtype).to(backend)
    before, ptr, version = buf.clone(), buf.data_ptr(), buf._version
    lerp_(buf, other, 0.0)
    assert buf.data_ptr() == ptr and buf._version == version       # no in-place op ran at all
    assert same_bits(buf, before)


def test_other_of_another_dtype_is_read_in_fp32(backend, make):
    buf, other = make.tensor(4099, torch.bfloat16), make.tensor(4099, torch.float32)
    want = lerp_reference(buf.clone(), other, 0.4)
    assert same_bits(lerp_(buf.to(backend), other.to(backend), 0.4).cpu(), want)
    copied = lerp_(buf.clone(), other, 1.0)                          # α = 1: PyTorch's cast to bf16
    assert same_bits(copied, other.to(torch.bfloat16))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        lerp_(torch.zeros(3), torch.zeros(4), 0.5)
