"""GPTQ's torch path (float32 on a torch device, as upstream) against the numpy float64 reference path.

Both must reach the same grid and levels and the same GPTQ objective |X W_q - X W|^2, well below round-to-nearest's,
so a torch path that stopped propagating the error (plain RTN) fails here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmship.quantize.gptq import dequantize, find_params, gptq_device, gptq_weight, quantize_column

K, N, GROUP, BITS = 256, 96, 64, 4
DEAD_INPUT = 5


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated activations x [n, K] (one dead input channel), their Hessian 2/n x^T x and a weight [K, N]."""
    rng = np.random.default_rng(0)
    samples = 1024
    x = rng.standard_normal((samples, K)) @ (rng.standard_normal((K, K)) / np.sqrt(K))
    x[:, DEAD_INPUT] = 0
    hessian = 2 / samples * x.T @ x
    weight = rng.standard_normal((K, N)).astype(np.float32)
    return x, hessian, weight


def objective(x: np.ndarray, weight: np.ndarray, quantized: np.ndarray) -> float:
    return float(np.sum((x @ (quantized.astype(np.float64) - weight)) ** 2))


def round_to_nearest(weight: np.ndarray, symmetric: bool) -> np.ndarray:
    """The same per-group grid as GPTQ, without error propagation (dequantized, [K, N])."""
    out = np.empty_like(weight)
    for start in range(0, K, GROUP):
        block = weight[start:start + GROUP].T.astype(np.float64)  # [N, group]: rows are output channels
        scale, zero = find_params(block, BITS, symmetric)
        levels = quantize_column(block, scale[:, None], zero[:, None], BITS)
        out[start:start + GROUP] = ((levels - zero[:, None]) * scale[:, None]).T
    return out


def assert_matches_numpy(problem, device: str, symmetric: bool, actorder: bool) -> None:
    x, hessian, weight = problem
    options = {"bits": BITS, "group_size": GROUP, "symmetric": symmetric, "actorder": actorder}
    reference = gptq_weight(weight, hessian, **options)
    levels, scales, zeros = gptq_weight(weight, hessian, device=device, **options)
    assert (levels.dtype, scales.dtype, zeros.dtype) == (np.uint8, np.float32, np.uint8)
    assert levels.shape == (K, N) and scales.shape == zeros.shape == (K // GROUP, N)
    np.testing.assert_allclose(scales, reference[1], rtol=1e-4)
    np.testing.assert_array_equal(zeros, reference[2])
    assert np.mean(levels == reference[0]) >= 0.99
    ours = objective(x, weight, dequantize(levels, scales, zeros, GROUP))
    theirs = objective(x, weight, dequantize(*reference, GROUP))
    assert ours == pytest.approx(theirs, rel=0.01)
    assert ours < 0.7 * objective(x, weight, round_to_nearest(weight, symmetric))


@pytest.mark.parametrize("actorder", [False, True], ids=["in-order", "actorder"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_torch_cpu_matches_numpy(problem, symmetric: bool, actorder: bool) -> None:
    assert_matches_numpy(problem, "cpu", symmetric, actorder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("actorder", [False, True], ids=["in-order", "actorder"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_cuda_matches_numpy(problem, symmetric: bool, actorder: bool) -> None:
    assert_matches_numpy(problem, "cuda", symmetric, actorder)


def test_dead_input_is_zero_after_dequantization(problem) -> None:
    _, hessian, weight = problem
    levels, scales, zeros = gptq_weight(weight, hessian, bits=BITS, group_size=GROUP, device="cpu")
    np.testing.assert_array_equal(dequantize(levels, scales, zeros, GROUP)[DEAD_INPUT], 0)


def test_hessian_not_positive_definite_is_a_value_error() -> None:
    hessian = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1; damping of 0.01 cannot fix it
    with pytest.raises(ValueError, match="not positive definite in float32"):
        gptq_weight(np.ones((2, 3), dtype=np.float32), hessian, group_size=2, device="cpu")


def test_gptq_device_follows_the_provider() -> None:
    assert gptq_device("cpu") is None
    assert gptq_device("cuda") == ("cuda" if torch.cuda.is_available() else None)


@pytest.mark.parametrize("actorder", [False, True])
def test_a_large_weight_in_chunks_of_output_channels_is_the_whole_weight_bit_for_bit(actorder, monkeypatch):
    """GPTQ quantizes each output channel on its own given the Hessian, so a weight that goes through in chunks of
    them (ROW_CHUNK_BYTES, for a 7B lm_head's memory) gives exactly the whole weight's levels, scales and zeros."""
    import llmship.quantize.gptq as gptq

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2048, 256)) @ rng.standard_normal((256, 256)) * 0.1
    hessian = 2 / len(x) * x.T @ x
    weight = (rng.standard_normal((256, 1000)) * 0.02).astype(np.float32)
    whole = gptq.gptq_weight(weight, hessian, group_size=64, actorder=actorder)
    monkeypatch.setattr(gptq, "ROW_CHUNK_BYTES", 8 * 256 * 300)  # 300, 300, 300 and 100 channels
    chunked = gptq.gptq_weight(weight, hessian, group_size=64, actorder=actorder)
    for a, b in zip(whole, chunked, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)


def test_a_large_hessian_is_inverted_by_cholesky_factors_as_numpy_inverts_it(monkeypatch):
    """Above LARGE_HESSIAN_BYTES the inverse's upper factor comes from upstream's Cholesky route in float64 (two K x K
    arrays at a time, not numpy inv's three): the same factor to float64 rounding and the same GPTQ levels."""
    import llmship.quantize.gptq as gptq

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2048, 300)) @ rng.standard_normal((300, 300)) * 0.1
    hessian = 2 / len(x) * x.T @ x + 0.01 * np.eye(300)
    weight = (rng.standard_normal((300, 200)) * 0.02).astype(np.float32)
    small = gptq.upper_cholesky_of_inverse([hessian.copy()]), gptq.gptq_weight(weight, hessian)
    monkeypatch.setattr(gptq, "LARGE_HESSIAN_BYTES", 0)
    large = gptq.upper_cholesky_of_inverse([hessian.copy()]), gptq.gptq_weight(weight, hessian)
    assert np.abs(small[0] - large[0]).max() <= 1e-12 * np.abs(small[0]).max()
    for a, b in zip(small[1], large[1], strict=True):
        assert np.array_equal(a, b)
