"""fit_dense (SPEC section 6): the SVD start, an error that never increases and never exceeds
truncated SVD's, and recovery of weights that have NanoMoE structure.

Every expected value comes from torch.linalg.svd or nanomoe.reference, never from fit_dense.
"""

from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor

import nanomoe
from nanomoe.budget import MIXINGS, gate_shapes
from nanomoe.fit import DenseFit
from nanomoe.layers import init_variances
from nanomoe.reference import dense_weight_reference

# fit_dense reads its errors off normal equations, ||W||^2 - 2 <x, rhs> + <x, H x>, whose terms
# cancel: squared relative errors wobble by rounding, up to 2e-13 seen, between iterations.
ROUNDING = 1e-11

# (out_features, in_features, rank, (K_out, K_in)): 4 x 4 blocks of 32 x 32 at rank 8, and
# 3 x 2 blocks of 32 x 32 at rank 4.
SQUARE = (128, 128, 8, (4, 4))
UNEVEN = (96, 64, 4, (3, 2))


def svd_error(weight: Tensor, rank: int) -> float:
    """Relative Frobenius error of the truncated SVD at ``rank``."""
    values = torch.linalg.svdvals(weight)
    return (values[rank:].square().sum() / values.square().sum()).sqrt().item()


def svd_truncation(weight: Tensor, rank: int) -> Tensor:
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :rank] * s[:rank] @ vh[:rank]


def dense(fit: DenseFit) -> Tensor:
    return dense_weight_reference(fit.down, fit.mix, fit.up, fit.mix_left, fit.mix_right)


def relative_error(approximation: Tensor, weight: Tensor) -> float:
    return ((approximation.double() - weight.double()).norm() / weight.double().norm()).item()


def gaussian(out_features: int, in_features: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)


def structured(
    out_features: int,
    in_features: int,
    rank: int,
    blocks: Tuple[int, int],
    mixing: str,
    seed: int = 0,
    noise: float = 0.01,
) -> Tensor:
    """The weight of a random NanoMoE layer (standard normal factors, so gates have both signs
    and some are near 0) plus ``noise`` times its RMS of Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: Tuple[int, ...], scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    k_out, k_in = blocks
    shapes = gate_shapes(mixing, k_out, k_in, rank)  # type: ignore[arg-type]
    outer: Optional[Tuple[Tensor, Tensor]] = None
    if mixing == "diagonal_outer":  # scaled so mix_left mix_right^T carries as much as diag(mix)
        outer = (normal(shapes[1], rank**-0.25), normal(shapes[2], rank**-0.25))
    weight = dense_weight_reference(
        normal((k_in, rank, in_features // k_in)),
        normal(shapes[0]),
        normal((k_out, out_features // k_out, rank)),
        *(outer or (None, None)),
    )
    return weight + noise * weight.norm() / weight.numel() ** 0.5 * normal(tuple(weight.shape))


def assert_history(fit: DenseFit, weight: Tensor, rank: int, iters: int) -> None:
    """Starts at truncated SVD's error, never increases, and ends at the factors' true error."""
    errors = fit.errors
    svd = svd_error(weight, rank)
    assert len(errors) == iters + 1
    assert errors[0] == pytest.approx(svd, rel=1e-9, abs=1e-12)
    for before, after in zip(errors, errors[1:]):
        assert after**2 <= before**2 + ROUNDING
    assert max(errors) ** 2 <= svd**2 + ROUNDING
    assert errors[-1] == pytest.approx(relative_error(dense(fit), weight), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_error_never_increases_nor_exceeds_svd(mixing: str) -> None:
    weight = gaussian(48, 40)
    fit = nanomoe.fit_dense(weight, 5, (4, 2), mixing, iters=20, tol=0)
    assert_history(fit, weight, 5, 20)
    # A random matrix has no NanoMoE structure, but the richer class still fits it better.
    assert fit.errors[-1] < fit.errors[0] * (1 - 1e-4)
    # Annealed steps can raise the error (a strong penalty at first): errors follows the best.
    annealed = nanomoe.fit_dense(weight, 5, (4, 2), mixing, iters=20, tol=0, anneal=1.0)
    assert_history(annealed, weight, 5, 20)
    # One or two iterations: the last is plain, so annealing cannot leave the SVD start as it was.
    for iters in (1, 2):
        short = nanomoe.fit_dense(weight, 5, (4, 2), mixing, iters=iters, tol=0, anneal=1.0)
        assert_history(short, weight, 5, iters)
        assert short.errors[-1] < short.errors[0]


@pytest.mark.parametrize("mixing", MIXINGS)
def test_start_is_the_truncated_svd(mixing: str) -> None:
    weight = gaussian(40, 48, seed=1)  # wide, where the others are tall: the other Gram matrix
    fit = nanomoe.fit_dense(weight, 6, (4, 2), mixing, iters=0)
    assert fit.errors == [pytest.approx(svd_error(weight, 6), rel=1e-9)]
    torch.testing.assert_close(dense(fit), svd_truncation(weight, 6), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 56), (56, 40)], ids=["wide", "tall"])
def test_start_through_float32_eigh_is_the_truncated_svd(
    shape: Tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large weights take their singular vectors from float32 eigh refined in float64; forced here
    # at a small size. Singular values 1/i: a spectrum with a tail, unlike a Gaussian's.
    monkeypatch.setattr(nanomoe.fit, "EXACT_EIGH", 8)
    u, _, vh = torch.linalg.svd(gaussian(*shape, seed=4), full_matrices=False)
    weight = u / torch.arange(1, min(shape) + 1, dtype=torch.float64) @ vh
    fit = nanomoe.fit_dense(weight, 6, 2, "diagonal", iters=0)
    assert fit.errors == [pytest.approx(svd_error(weight, 6), rel=1e-9)]
    torch.testing.assert_close(dense(fit), svd_truncation(weight, 6), rtol=0, atol=1e-10)
    # float32 holds the Gram matrix only after scaling: these would overflow and underflow it.
    for scale in (1e25, 1e-25):
        fit = nanomoe.fit_dense(weight * scale, 6, 2, "diagonal", iters=0)
        assert fit.errors == [pytest.approx(svd_error(weight, 6), rel=1e-9)]


@pytest.mark.parametrize("mixing", MIXINGS)
def test_one_block_is_the_truncated_svd(mixing: str) -> None:
    # With K = 1 every variant is a rank-r factorization: nothing can beat the SVD, and ALS
    # must not wander off it.
    weight = gaussian(30, 20, seed=2)
    fit = nanomoe.fit_dense(weight, 4, 1, mixing, iters=12, tol=0)
    assert_history(fit, weight, 4, 12)
    assert fit.errors[-1] == pytest.approx(svd_error(weight, 4), rel=1e-9)
    torch.testing.assert_close(dense(fit), svd_truncation(weight, 4), rtol=0, atol=1e-8)
    # Nothing to gain, so by default it stops once 5 iterations have gained nothing.
    assert len(nanomoe.fit_dense(weight, 4, 1, mixing, iters=12).errors) == 1 + 5
    # Annealed, the stall test waits for 5 plain iterations: 20 of 30 are annealed.
    annealed = nanomoe.fit_dense(weight, 4, 1, mixing, iters=30, anneal=0.5)
    assert len(annealed.errors) == 1 + 20 + 5


@pytest.mark.parametrize("config", [SQUARE, UNEVEN], ids=["square", "uneven"])
@pytest.mark.parametrize("mixing", MIXINGS)
def test_recovers_nanomoe_structure(mixing: str, config: tuple) -> None:
    out_features, in_features, rank, blocks = config
    for seed in range(3):
        weight = structured(out_features, in_features, rank, blocks, mixing, seed)
        fit = nanomoe.fit_dense(weight, rank, blocks, mixing)
        assert_history(fit, weight, rank, len(fit.errors) - 1)
        # Truncated SVD is far off: 0.2 to 0.6.
        assert fit.errors[-1] < 0.5 * svd_error(weight, rank)
        # Down to the noise (1%; a little of it is fitted too), except diagonal_outer: 0.3 of
        # SVD's error on the square configuration, 0.03 to 0.12 on the uneven one.
        if mixing != "diagonal_outer":
            assert fit.errors[-1] < 0.011


def test_annealing_recovers_diagonal_outer_at_larger_ranks() -> None:
    # Plain ALS crawls here: 0.50 to 0.52 of SVD's error after 150 iterations. Annealed, 0.28.
    rank = 32
    for seed in range(2):
        weight = structured(256, 256, rank, (4, 4), "diagonal_outer", seed)
        fit = nanomoe.fit_dense(weight, rank, 4, "diagonal_outer", iters=150, tol=0, anneal=0.5)
        assert_history(fit, weight, rank, 150)
        assert fit.errors[-1] < 0.35 * svd_error(weight, rank)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_annealed_gate_step_is_the_penalized_least_squares_solution(mixing: str) -> None:
    # The gate step with a Tikhonov weight, against a brute-force solve per block: the block's
    # model is linear in its gate unknowns x (for diagonal_outer, (g, a) with b fixed), W_ij ~ D x,
    # and the step minimizes ||W_ij - D x||^2 + ridge ||x - x_now||^2 + shrink c ||x||^2, with c
    # the mean of diag(D^T D) and ridge = RIDGE c.
    generator = torch.Generator().manual_seed(5)
    k, rank, block = 2, 3, 4
    up = torch.randn(k, block, rank, generator=generator, dtype=torch.float64)
    down = torch.randn(k, rank, block, generator=generator, dtype=torch.float64)
    shapes = gate_shapes(mixing, k, k, rank)  # type: ignore[arg-type]
    gate = nanomoe.fit.Gate(
        *(torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes)
    )
    weight = torch.randn(k * block, k * block, generator=generator, dtype=torch.float64)
    rows = weight.view(k, block, -1)
    shrink = 0.3
    fitted = nanomoe.fit._fit_gate(
        gate, (up.mT @ up)[:, None], (down @ down.mT)[None], up.mT @ rows, down, shrink
    )
    for i in range(k):
        for j in range(k):
            columns = [up[i][:, c, None] * down[j][c] for c in range(rank)]  # u_c d_c^T
            now = [gate.mix[i, j].reshape(-1)]
            if mixing == "scalar":
                columns = [up[i] @ down[j]]
            elif mixing == "full":
                columns = [up[i][:, a, None] * down[j][b] for a in range(rank) for b in range(rank)]
            elif mixing == "diagonal_outer":
                pulled = down[j].T @ gate.right[i, j]  # a's columns: u_c (down_j^T b)^T
                columns += [up[i][:, c, None] * pulled for c in range(rank)]
                now.append(gate.left[i, j])
            design = torch.stack([column.reshape(-1) for column in columns], 1)
            curvature = design.T @ design
            mean = curvature.diagonal().mean()
            ridge = nanomoe.fit.RIDGE * mean
            system = curvature + (ridge + shrink * mean) * torch.eye(
                len(curvature), dtype=torch.float64
            )
            target = design.T @ weight[
                i * block : (i + 1) * block, j * block : (j + 1) * block
            ].reshape(-1)
            expected = torch.linalg.solve(system, target + ridge * torch.cat(now))
            got = [fitted.mix[i, j].reshape(-1)]
            if mixing == "diagonal_outer":
                got.append(fitted.left[i, j])
            torch.testing.assert_close(torch.cat(got), expected, rtol=1e-10, atol=1e-12)


def test_full_gates_come_out_scaled_like_a_fresh_layer() -> None:
    # Unbalanced, ALS's full gates reached RMS 10 to 140 against factors of RMS 1 to 2 on these
    # weights: fine for the weight, a poor start for fine-tuning.
    out_features, in_features, rank, blocks = SQUARE
    for seed in range(3):
        weight = structured(out_features, in_features, rank, blocks, "full", seed)
        fit = nanomoe.fit_dense(weight, rank, blocks, "full")
        assert fit.errors[-1] == pytest.approx(relative_error(dense(fit), weight), rel=1e-9)
        fresh = nanomoe.NanoMoELinear(in_features, out_features, rank, blocks, mixing="full")
        variances = init_variances("full", rank, blocks[1], in_features // blocks[1])
        rms = {name: getattr(fit, name).square().mean().sqrt().item() for name in variances}
        for name in ("up", "down"):
            ratio = rms[name] / rms["mix"]
            assert ratio == pytest.approx((variances[name] / variances["mix"]) ** 0.5, rel=1e-9)
            assert ratio == pytest.approx(
                (getattr(fresh, name).var() / fresh.mix.var()).sqrt().item(), rel=0.2
            )
        # Each up[i] (and down[j]) orthonormal times one common scale.
        scale = rms["up"] ** 2 * fit.up.shape[1]
        eye = torch.eye(rank, dtype=torch.float64).expand(blocks[0], -1, -1)
        torch.testing.assert_close(fit.up.mT @ fit.up, scale * eye)
        scale = rms["down"] ** 2 * fit.down.shape[2]
        torch.testing.assert_close(fit.down @ fit.down.mT, scale * eye[: blocks[1]])


@pytest.mark.parametrize("mixing", MIXINGS)
def test_factors_follow_the_spec_layout(mixing: str) -> None:
    weight = structured(36, 20, 3, (3, 2), mixing)
    fit = nanomoe.fit_dense(weight, 3, (3, 2), mixing, iters=3)
    assert fit.down.shape == (2, 3, 10)
    assert fit.up.shape == (3, 12, 3)
    shapes = gate_shapes(mixing, 3, 2, 3)  # type: ignore[arg-type]
    assert fit.mix.shape == shapes[0]
    outer = mixing == "diagonal_outer"
    assert (fit.mix_left is not None, fit.mix_right is not None) == (outer, outer)
    if fit.mix_left is not None and fit.mix_right is not None:
        assert fit.mix_left.shape == fit.mix_right.shape == shapes[1]
    x = gaussian(5, 20, seed=3)
    gate = {"mix_left": fit.mix_left, "mix_right": fit.mix_right}
    y = nanomoe.nanomoe_linear(x, fit.down, fit.mix, fit.up, None, **gate)
    torch.testing.assert_close(y, x @ dense(fit).T)
    assert relative_error(x @ dense(fit).T, x @ weight.T) < 0.5


@pytest.mark.parametrize("mixing", MIXINGS)
def test_float32_weight_gives_float32_factors(mixing: str) -> None:
    weight = structured(*UNEVEN, mixing).float()
    fit = nanomoe.fit_dense(weight, 4, (3, 2), mixing, iters=10)
    factors = [fit.down, fit.mix, fit.up, fit.mix_left, fit.mix_right]
    assert all(t.dtype == torch.float32 for t in factors if t is not None)
    assert all(t.is_contiguous() for t in factors if t is not None)
    reference = nanomoe.fit_dense(weight.double(), 4, (3, 2), mixing, iters=10)
    # The work is float64 either way; only the input and the factors are rounded to float32.
    assert relative_error(dense(fit), weight) == pytest.approx(reference.errors[-1], abs=1e-5)


def test_edge_cases() -> None:
    zero = torch.zeros(8, 6, dtype=torch.float64)
    fit = nanomoe.fit_dense(zero, 2, 2, "diagonal_outer", iters=3)
    assert fit.errors == [0.0] * 4
    assert dense(fit).abs().max() == 0
    # Rank past min(m, n) and past the block sizes: exact, with zero padding.
    weight = gaussian(8, 6)
    for mixing in MIXINGS:
        fit = nanomoe.fit_dense(weight, 7, 2, mixing, iters=3)
        assert fit.up.shape == (2, 4, 7)
        assert max(fit.errors) < 1e-6
        torch.testing.assert_close(dense(fit), weight)
    # Rank past the block size but below min(m, n): the fit only improves on the SVD.
    fit = nanomoe.fit_dense(gaussian(16, 16), 6, 4, "scalar", iters=5)
    assert fit.errors[-1] < fit.errors[0]


def test_bad_input_raises() -> None:
    weight = gaussian(8, 6)
    with pytest.raises(TypeError, match="floating-point"):
        nanomoe.fit_dense(weight.long(), 2)
    with pytest.raises(TypeError, match="floating-point"):
        nanomoe.fit_dense(weight.numpy(), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        nanomoe.fit_dense(weight[0], 2, 1)
    with pytest.raises(ValueError, match="rank"):
        nanomoe.fit_dense(weight, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        nanomoe.fit_dense(weight, 2.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="K_in=4 blocks do not divide"):
        nanomoe.fit_dense(weight, 2, (2, 4))
    with pytest.raises(ValueError, match="unknown mixing"):
        nanomoe.fit_dense(weight, 2, 2, "dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iters"):
        nanomoe.fit_dense(weight, 2, 2, iters=-1)
    with pytest.raises(ValueError, match="tol"):
        nanomoe.fit_dense(weight, 2, 2, tol=1.0)
    for anneal in (-0.5, 1.5, float("inf"), True):
        with pytest.raises(ValueError, match="anneal"):
            nanomoe.fit_dense(weight, 2, 2, anneal=anneal)
    with pytest.raises(ValueError, match="non-finite"):
        nanomoe.fit_dense(weight.clone().fill_(float("nan")), 2, 2)
    with pytest.raises(ValueError, match="overflows"):
        nanomoe.fit_dense(weight * 1e200, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("mixing", MIXINGS)
def test_cuda_matches_cpu(mixing: str) -> None:
    weight = structured(*UNEVEN, mixing).float()
    cpu = nanomoe.fit_dense(weight.double(), 4, (3, 2), mixing)
    fit = nanomoe.fit_dense(weight.cuda(), 4, (3, 2), mixing)
    factors = [fit.down, fit.mix, fit.up, fit.mix_left, fit.mix_right]
    assert all(t.is_cuda and t.dtype == torch.float32 for t in factors if t is not None)
    assert fit.errors[0] == pytest.approx(cpu.errors[0], rel=1e-9)
    on_cpu = DenseFit(*(None if t is None else t.cpu().double() for t in factors), fit.errors)
    assert relative_error(dense(on_cpu), weight) == pytest.approx(fit.errors[-1], rel=1e-3)
    # Other solvers round differently, so the iterations may take slightly different paths, to
    # the same place: the noise, or below half of SVD's error for diagonal_outer.
    assert fit.errors[-1] == pytest.approx(cpu.errors[-1], rel=0.5)
    assert fit.errors[-1] < 0.5 * fit.errors[0]
