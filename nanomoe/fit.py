"""From a trained dense layer to NanoMoE factors (SPEC section 6).

``fit_dense`` starts from the truncated SVD laid out as NanoMoE factors (gates of ones or
identities), which reproduces the SVD approximation exactly, and refines it by alternating least
squares: gate, down-projections, gate, up-projections, each the exact minimizer of
``||W - W_nanomoe||_F`` over its own factors with the others fixed. Two more moves are each kept
only where they lower the error: a line search along the last iteration's direction, and, after
the first iteration, for scalar and diagonal gates, a direct re-alignment of the factors' bases
(``_aligned``), without which ALS stalls on weights that do have NanoMoE structure. So the error
never increases, and the result is never worse than truncated SVD at the same rank. With
``anneal``, the first iterations also pay a fading Tikhonov penalty and may raise the error; the
best factors met are returned, so the result is still never worse than the start.

Every step works on ``r x r`` summaries of the weight (``up[i]^T W_ij``, ``up[i]^T up[i]``, ...)
for all blocks at once with batched linear algebra: an iteration costs two products of the
weight with a rank-``r`` factor (``2 r m n`` flops each) plus ``r x r`` work per block.
"""

from typing import Iterable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from nanomoe.budget import BlockCount, Mixing, check_layer
from nanomoe.layers import init_variances

# Iterations of fit_dense at most, by default. On weights with NanoMoE structure plus 1% noise at
# ranks 4 and 8 (tests/test_fit.py) scalar, diagonal and full gates get to the noise in 6 to 30;
# diagonal_outer, the slowest, to 0.03-0.35 of SVD's error. On unstructured weights 30
# iterations take 75-100% of the gain of 200.
DEFAULT_ITERS = 30

# fit_dense stops early once its error has fallen by less than a fraction DEFAULT_TOL over the
# last STALL iterations: where the fit has converged, or creeps (as on a large random matrix,
# where 30 iterations of scalar gates gain 0.005% over the SVD at 4096 x 4096).
DEFAULT_TOL = 1e-4
STALL = 5

# Every solve minimizes its least-squares error plus RIDGE * (mean curvature) * ||x - x_old||^2.
# The proximal term pulls towards the current factors, not towards zero, so a step still cannot
# increase the error (x_old is a candidate), while directions the error leaves undetermined (a
# gate vector multiplying zero, a rank-deficient factor) keep their value instead of making the
# system singular. At 1e-10 of the curvature it does not change the solution in float64 otherwise.
RIDGE = 1e-10

# The SVD start (_top_left_subspace): float64 eigh of the Gram matrix up to EXACT_EIGH rows, else
# float32 eigh with OVERSAMPLE more vectors and REFINE float64 steps of subspace iteration.
EXACT_EIGH = 1024
OVERSAMPLE = 16
REFINE = 2

# fit_dense(anneal=...): the Tikhonov weight falls geometrically over the first ANNEAL_SHARE of
# the iterations, to ANNEAL_END of its start, and is 0 after.
ANNEAL_SHARE = 2 / 3
ANNEAL_END = 1e-4

# Line search (_extrapolate): the step starts at 1, grows by STEP_GROWTH after each step that
# lowers the error, up to MAX_STEP, and falls back to 1 after one that does not.
STEP_GROWTH = 1.5
MAX_STEP = 8.0


class DenseFit(NamedTuple):
    """NanoMoE factors fitted to a dense weight, laid out as in SPEC section 3."""

    down: Tensor  # (K_in, r, n_b)
    mix: Tensor  # (K_out, K_in), (K_out, K_in, r) or (K_out, K_in, r, r)
    up: Tensor  # (K_out, m_b, r)
    mix_left: Optional[Tensor]  # (K_out, K_in, r) for "diagonal_outer", else None
    mix_right: Optional[Tensor]
    # ||W - W_fit||_F / ||W||_F after the SVD initialization and after each iteration.
    errors: List[float]


class Gate(NamedTuple):
    """G_ij = mix (scalar, diagonal or full) + left right^T (diagonal_outer), in float64."""

    mix: Tensor
    left: Optional[Tensor] = None
    right: Optional[Tensor] = None

    def transposed(self) -> "Gate":
        """The gate of the transposed problem ``W^T``: pair ``(j, i)`` holds ``G_ij^T``."""
        mix = self.mix.transpose(0, 1)
        if self.left is None or self.right is None:
            return Gate(mix.mT if mix.dim() == 4 else mix)
        return Gate(mix, self.right.transpose(0, 1), self.left.transpose(0, 1))


class Factors(NamedTuple):
    """The factors being fitted, in float64."""

    up: Tensor  # (K_out, m_b, r)
    gate: Gate
    down: Tensor  # (K_in, r, n_b)


def fit_dense(
    weight: Tensor,
    rank: int,
    num_blocks: BlockCount = 4,
    mixing: Mixing = "scalar",
    iters: int = DEFAULT_ITERS,
    tol: float = DEFAULT_TOL,
    anneal: float = 0.0,
) -> DenseFit:
    """NanoMoE factors whose equivalent weight approximates ``weight`` (SPEC section 6).

    Args:
        weight: ``(out_features, in_features)``, as ``nn.Linear.weight``; any floating dtype, CPU
            or CUDA.
        rank, num_blocks, mixing: the NanoMoE configuration, as in ``NanoMoELinear``.
        iters: at most this many alternating least-squares iterations after the SVD
            initialization.
        tol: stop before ``iters`` once the error has fallen by less than this fraction over the
            last 5 iterations (5 plain ones, past any annealed); 0 runs all ``iters``.
        anneal: 0 for plain ALS. Else, at most 1 (stronger penalties drifted the factors'
            scales apart, gaining nothing): over the first two thirds of the iterations, every
            ALS subproblem also pays ``anneal * (mean curvature) * ||x||^2``, a weight that falls
            geometrically to 1e-4 of that, then 0 (see below). Annealed steps may raise the
            error; ``errors`` follows the best factors so far, which are the ones returned.

    Returns:
        A ``DenseFit``: the factors in the weight's dtype and device, and the relative error
        ``||W - W_fit||_F / ||W||_F`` after the initialization (that of truncated SVD at ``rank``)
        and after each iteration, of the best factors so far, so it never increases (a plain
        ALS step may raise its own error by rounding, squared by 1e-13 or so: the factors
        before it are then the best).
        Where both sides exceed EXACT_EIGH, the start's error is SVD's to within 1e-9 or so (see
        ``_top_left_subspace``). Full gates come out in a balanced gauge: the three factors scaled
        against each other as a fresh layer's and, where the rank is at most the block sizes,
        each ``up[i]`` and ``down[j]`` orthonormal times a scale (``_balanced_full_gate``), which
        suits fine-tuning.

    ALS finds a local optimum. A weight made by a NanoMoE layer plus 1% noise is recovered to the
    noise with scalar and full gates (ranks 4 to 64 measured, scalar also at 256 on 4096 x 4096)
    and with diagonal ones at ranks 4 and 8. Measured at 512 x 512 with K = 4 (three seeds),
    diagonal gates get to 0.02-0.12 of SVD's error at rank 32 (the noise after 100 iterations)
    and to 0.11-0.66 at rank 64; diagonal_outer to 0.3 of it at rank 8, 0.5 at rank 16 and
    0.6-0.7 at ranks 32 and 64 (300 iterations: 0.37-0.53 at ranks 16 and 32; re-aligning as for
    diagonal gates finds nothing better, its Jennrich step assumes diagonal gates).

    There ALS crawls through a swamp: its gates' rank-one parts grow (RMS 20 after 5 iterations,
    300 after 300, against 0.25 in the weight's own factors), traded against near-null directions
    of ``up`` and ``down``. ``anneal`` penalizes that trade while it lasts: with ``anneal=0.5,
    iters=150`` diagonal_outer gets to 0.06-0.24 of SVD's error at rank 8, 0.07-0.27 at rank 16,
    0.14-0.20 at rank 32 and 0.31-0.32 at rank 64 (against 0.21-0.26, 0.40-0.44, 0.51-0.55 and
    0.57-0.59 in 150 plain iterations), on the same weights. Diagonal gates at rank 64 get to
    0.10-0.17 (plain: 0.10-0.56): a better worst seed, worse other seeds, although they are
    re-aligned again after the annealing. On trained weights annealing gains nothing
    (all-MiniLM-L6-v2's MLP, 150 iterations: 0.957 of SVD's error with or without it) and needs
    the iterations, so it is off by default.

    The work is done in float64 whatever the weight's dtype: the solves go through normal
    equations, which square condition numbers, and the error is read off those same equations
    (``||W||^2 - 2 <x, rhs> + <x, H x>``), which cancels to the square of a small number. Both
    would leave float32 a few significant digits; float64 products cost about twice as much on a
    CPU and on datacenter GPUs.
    """
    _check_inputs(weight, rank, iters, tol, anneal)
    out_features, in_features = weight.shape
    k_out, k_in = check_layer(in_features, out_features, rank, num_blocks, mixing)
    w = weight.detach().to(torch.float64)
    norm_sq = torch.linalg.vector_norm(w).square()
    if not torch.isfinite(norm_sq):  # a NaN or an Inf makes it so; isfinite(w) needs a pass more
        finite = bool(torch.isfinite(w).all())
        raise ValueError(
            "weight's squared norm overflows" if finite else "weight has non-finite entries"
        )
    rows = w.view(k_out, out_features // k_out, in_features)
    # W^T, copied: the up step is the down step of the transposed problem.
    columns = w.T.contiguous().view(k_in, in_features // k_in, out_features)
    norm = norm_sq.sqrt().clamp_min(torch.finfo(torch.float64).tiny)  # an all-zero weight: 0
    up, down = _svd_factors(w, rank, k_out, k_in)
    factors = Factors(up, _identity_gate(mixing, k_out, k_in, rank, w.device), down)
    projected = _project(rows, up)  # always that of factors.up
    best = factors
    errors = [(_squared_error(projected, factors, norm_sq).clamp_min(0).sqrt() / norm).item()]
    current_errors = errors[:]  # of each iteration's factors, for the stall test
    realigns = mixing in ("scalar", "diagonal") and rank <= min(rows.shape[1], columns.shape[1])
    shrinks = _anneal_schedule(anneal, iters)
    annealed = sum(1 for shrink in shrinks if shrink)
    step = 1.0
    for iteration in range(iters):
        previous, previous_projected = factors, projected
        shrink = shrinks[iteration]
        factors, error_sq = _als_iteration(rows, columns, factors, norm_sq, projected, shrink)
        # Re-aligned after the first iteration and, where annealing pulled the factors off, after
        # the first plain one.
        if realigns and iteration in (0, annealed):
            factors, error_sq = _better(factors, error_sq, _aligned(rows, factors, norm_sq))
        projected = _project(rows, factors.up)
        if iteration > 0 and not shrink:  # line search: kept only where it lowers the error
            trial = _extrapolate(factors, previous, step)
            # The projection is linear in up: no product with the weight for the trial.
            trial_projected = torch.lerp(previous_projected, projected, 1 + step)
            trial_error_sq = _squared_error(trial_projected, trial, norm_sq)
            if trial_error_sq < error_sq:
                factors, error_sq, projected = trial, trial_error_sq, trial_projected
                step = min(step * STEP_GROWTH, MAX_STEP)
            else:
                step = 1.0
        current_errors.append((error_sq.clamp_min(0).sqrt() / norm).item())  # one sync a step
        if current_errors[-1] < errors[-1]:
            best = factors
        errors.append(min(errors[-1], current_errors[-1]))
        # Annealed steps may raise the error: the stall test looks only past them, and at the
        # iterate's own error (once annealing ends it may still be above the best, and falling).
        plain = iteration + 1 - annealed  # plain iterations so far
        if tol and plain >= STALL and current_errors[-1] >= (1 - tol) * current_errors[-1 - STALL]:
            break

    def result(tensor: Tensor) -> Tensor:
        return tensor.to(weight.dtype).contiguous()

    def optional(tensor: Optional[Tensor]) -> Optional[Tensor]:
        return None if tensor is None else result(tensor)

    if mixing == "full":
        best = _balanced_full_gate(best)
    up, gate, down = best
    return DenseFit(
        result(down),
        result(gate.mix),
        result(up),
        optional(gate.left),
        optional(gate.right),
        errors,
    )


def _balanced_full_gate(factors: Factors) -> Factors:
    """The same weight, with each ``up[i]`` and ``down[j]`` orthonormal times a common scale and
    the rest in the gate, the three scaled against each other as ``reset_parameters`` scales a
    fresh layer's.

    Full gates leave ALS free to wander along ``(up[i] A_i, A_i^-1 G_ij B_j^-1, B_j down[j])``:
    on weights with structure it ended with gates of RMS 10 to 140 (entries up to 1000) against
    up and down of RMS 1 to 2. The weight does not care, but fine-tuning does: an optimizer's
    steps are sized to each parameter, not to its share of the product.
    """
    up, gate, down = factors
    k_in, rank, block_in = down.shape
    mix = gate.mix
    if rank <= min(up.shape[1], block_in):  # else QR cannot give r orthonormal columns
        up, up_triangle = torch.linalg.qr(up)
        down_t, down_triangle = torch.linalg.qr(down.mT)  # down[j] = R_j^T Q_j^T
        mix = up_triangle[:, None] @ mix @ down_triangle.mT[None]
        down = down_t.mT
    variances = init_variances("full", rank, k_in, block_in)
    rms = [t.square().mean().sqrt() for t in (up, mix, down)]
    target = [variances[name] ** 0.5 for name in ("up", "mix", "down")]
    if not all(value > 0 for value in rms):  # a zero factor: nothing to balance
        return Factors(up, Gate(mix), down)
    # (a up, mix / (a b), b down) leaves the weight and rms product as they are; pick a and b so
    # that the three RMS are the targets times one common factor.
    common = (rms[0] * rms[1] * rms[2] / (target[0] * target[1] * target[2])) ** (1 / 3)
    scale_up, scale_down = common * target[0] / rms[0], common * target[2] / rms[2]
    return Factors(up * scale_up, Gate(mix / (scale_up * scale_down)), down * scale_down)


def _check_inputs(weight: Tensor, rank: int, iters: int, tol: float, anneal: float) -> None:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {_describe(weight)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got {weight.dim()}-D")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if isinstance(anneal, bool) or not isinstance(anneal, (int, float)) or not 0 <= anneal <= 1:
        raise ValueError(f"anneal must be a number in [0, 1], got {anneal!r}")


def _describe(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


def _svd_factors(w: Tensor, rank: int, k_out: int, k_in: int) -> Tuple[Tensor, Tensor]:
    """Truncated SVD ``U_r S_r V_r^T`` as ``up = U_r S_r^(1/2)`` and ``down = S_r^(1/2) V_r^T``,
    in blocks: ``(K_out, m_b, r)`` and ``(K_in, r, n_b)``; zero-padded past ``min(m, n)``.

    Projecting ``W`` onto a basis of (a little more than) its top singular subspace and taking
    the SVD of that small matrix gives the singular values and vectors (Rayleigh-Ritz).
    """
    m, n = w.shape
    keep = min(rank, m, n)
    if m <= n:
        left = _top_left_subspace(w, keep)
        u_small, s, vt = torch.linalg.svd(left.T @ w, full_matrices=False)
        u = left @ u_small
    else:
        right = _top_left_subspace(w.T, keep)
        vt_small, s, u_t = torch.linalg.svd(right.T @ w.T, full_matrices=False)
        u, vt = u_t.T, (right @ vt_small).T
    root = s[:keep].sqrt()
    up = w.new_zeros(m, rank)
    down = w.new_zeros(rank, n)
    up[:, :keep] = u[:, :keep] * root
    down[:keep] = root[:, None] * vt[:keep]
    return up.view(k_out, m // k_out, rank), down.view(rank, k_in, n // k_in).transpose(0, 1)


def _top_left_subspace(w: Tensor, keep: int) -> Tensor:
    """An orthonormal basis, ``(m, keep)`` or a little wider, of the span of ``w``'s top
    ``keep`` left singular vectors, for ``m <= n``: eigenvectors of the Gram matrix ``W W^T``.

    Up to EXACT_EIGH rows, of the float64 Gram matrix. Past that, ``eigh`` dominates the whole
    fit (7 s at 4096 x 4096 on two cores), so it runs in float32 (half the time) with
    OVERSAMPLE more vectors, refined by REFINE steps of subspace iteration in float64. The
    truncation error that leaves, squared, was measured within 1e-12 of the SVD's on Gaussian
    weights and within 1e-9 on a weight with singular values ``i^-0.7``.
    """
    gram = w @ w.T
    if len(gram) <= EXACT_EIGH:
        return torch.linalg.eigh(gram).eigenvectors[:, -keep:]
    wide = min(keep + OVERSAMPLE, len(gram))
    # Scaled to a largest diagonal of 1 first: float32 would overflow or underflow where float64
    # does not (weights of 1e17 or 1e-20).
    scale = gram.diagonal().max().clamp_min(torch.finfo(w.dtype).tiny)
    basis = torch.linalg.eigh((gram / scale).float()).eigenvectors[:, -wide:].to(w.dtype)
    for _ in range(REFINE):
        basis = torch.linalg.qr(gram @ basis).Q
    return basis


def _anneal_schedule(anneal: float, iters: int) -> List[float]:
    """The Tikhonov weight of each iteration (relative to the mean curvature): falling
    geometrically from ``anneal`` to ``anneal * ANNEAL_END`` over the first ANNEAL_SHARE of the
    iterations, 0 after."""
    annealed = int(iters * ANNEAL_SHARE) if anneal else 0  # 0 for one iteration: it must be plain
    ratio = ANNEAL_END ** (1 / max(annealed - 1, 1))
    return [anneal * ratio**t for t in range(annealed)] + [0.0] * (iters - annealed)


def _identity_gate(mixing: str, k_out: int, k_in: int, rank: int, device: torch.device) -> Gate:
    """``G_ij = I``: with the SVD factors, the truncated SVD exactly."""
    ones = torch.ones(k_out, k_in, dtype=torch.float64, device=device)
    if mixing == "scalar":
        return Gate(ones)
    if mixing == "full":
        eye = torch.eye(rank, dtype=torch.float64, device=device)
        return Gate(eye.expand(k_out, k_in, -1, -1).clone())
    diagonal = ones[..., None].expand(-1, -1, rank).clone()
    if mixing == "diagonal":
        return Gate(diagonal)
    # mix_left = 0 keeps G = I; mix_right must not be 0 too, or neither could ever move (each is
    # the other's coefficient). The gate step fits mix_left first.
    right = torch.full_like(diagonal, rank**-0.5)
    return Gate(diagonal, torch.zeros_like(diagonal), right)


def _als_iteration(
    rows: Tensor,
    columns: Tensor,
    factors: Factors,
    norm_sq: Tensor,
    projected: Tensor,
    shrink: float = 0.0,
) -> Tuple[Factors, Tensor]:
    """Gate, down, gate, up: each the exact minimizer given the rest (plus ``shrink`` times its
    mean curvature times ``||x||^2``); ``projected`` is ``_project(rows, factors.up)``. Returns
    the new factors and the squared error they leave."""
    up, gate, down = factors
    gate, down, _ = _update_gate_and_down(projected, up, gate, down, norm_sq, shrink)
    # The up-projections are the down-projections of W^T = [down[j]^T G_ij^T up[i]^T].
    up, gate, down = down.mT, gate.transposed(), up.mT
    columns_projected = _project(columns, up)
    gate, down, error_sq = _update_gate_and_down(columns_projected, up, gate, down, norm_sq, shrink)
    return Factors(down.mT, gate.transposed(), up.mT), error_sq


def _project(rows: Tensor, up: Tensor) -> Tensor:
    """``up[i]^T W_i``, ``(K_out, r, n)``, from ``rows``, the weight as ``(K_out, m_b, n)``: the
    one product with the weight in a step, ``2 r m n`` flops."""
    return up.mT @ rows


def _update_gate_and_down(
    projected: Tensor, up: Tensor, gate: Gate, down: Tensor, norm_sq: Tensor, shrink: float = 0.0
) -> Tuple[Gate, Tensor, Tensor]:
    """Best gate for the current ``up`` and ``down``, then best ``down`` for that gate (each with
    the Tikhonov weight ``shrink``, relative to its mean curvature).

    ``projected``: ``_project(rows, up)``. Returns the new gate, the new ``down`` and the squared
    error ``||W - W_fit||_F^2`` they leave.
    """
    up_gram = (up.mT @ up).unsqueeze(1)  # up[i]^T up[i], (K_out, 1, r, r)
    down_gram = (down @ down.mT).unsqueeze(0)  # down[j] down[j]^T, (1, K_in, r, r)
    gate = _fit_gate(gate, up_gram, down_gram, projected, down, shrink)
    hessian, rhs = _down_normal_equations(projected, up_gram, gate)
    down = _proximal_solve(hessian, rhs, down, shrink=shrink)
    return gate, down, _residual(hessian, rhs, down, norm_sq)


def _down_normal_equations(projected: Tensor, up_gram: Tensor, gate: Gate) -> Tuple[Tensor, Tensor]:
    """``down[j]`` minimizes ``sum_i ||W_ij - up[i] G_ij down[j]||^2``, whose normal equations are
    ``(sum_i G_ij^T up_gram_i G_ij) down[j] = sum_i G_ij^T up[i]^T W_ij``.

    Summed one output block at a time: a (K_out, K_in, r, n_b) temporary summed over i made this
    3 to 6 times slower at 4096 x 4096."""
    blocks = _blocks(projected, gate.mix.shape[1])
    if gate.mix.dim() == 4:
        hessian = _accumulate(g.mT @ up_gram[i] @ g for i, g in enumerate(gate.mix))
        return hessian, _accumulate(g.mT @ blocks[i] for i, g in enumerate(gate.mix))
    # The other gates scale rows (plus, for diagonal_outer, G^T = diag(g) + right left^T):
    # fused multiply-adds into the sums, no (K_in, r, n_b) or (K_in, r, r) temporary per block,
    # which took a fifth of a diagonal fit's time at K = 16.
    k_out, k_in, rank, block_in = blocks.shape
    scale = gate.mix[..., None] if gate.mix.dim() == 3 else gate.mix[..., None, None]
    rhs = projected.new_zeros(k_in, rank, block_in)
    for i in range(k_out):
        rhs.addcmul_(blocks[i], scale[i])
        if gate.left is not None and gate.right is not None:
            rhs.baddbmm_(gate.right[i, :, :, None], gate.left[i, :, None, :] @ blocks[i])
    if gate.mix.dim() == 2:  # sum_i g_ij^2 A_i is one GEMM (the loop: 4x slower at K=96)
        return torch.einsum("ij,iab->jab", gate.mix.square(), up_gram[:, 0]), rhs
    # diag(g) A diag(g) = A o g g^T
    hessian = projected.new_zeros(k_in, rank, rank)
    scaled = torch.empty_like(hessian)
    for i in range(k_out):
        torch.mul(up_gram[i], scale[i], out=scaled)
        hessian.addcmul_(scaled, gate.mix[i, :, None, :])
    if gate.left is not None and gate.right is not None:
        # The rest of G^T A G is w right^T + right w^T, w = g o (A left) + (left^T A left / 2)
        # right: over i, one (r x K_out) by (K_out x r) product per input block j.
        a_left = _gram_times(up_gram[:, 0], gate.left)  # A_i left_ij, (K_out, K_in, r)
        half_curvature = (gate.left * a_left).sum(-1, keepdim=True) / 2
        w = gate.mix * a_left + half_curvature * gate.right
        cross = w.permute(1, 2, 0) @ gate.right.transpose(0, 1)  # (K_in, r, r)
        hessian += cross
        hessian += cross.mT
    return hessian, rhs


def _gram_times(gram: Tensor, vectors: Tensor) -> Tensor:
    """``gram[i] @ vectors[i, j]`` for ``gram`` ``(K, r, r)`` and ``vectors`` ``(K, K', r)``: one
    product per block ``i``, the vectors as columns (``gram[:, None] @ vectors[..., None]``
    broadcast ``gram`` to every pair: a copy the size of the pairs' ``r x r`` blocks)."""
    return (gram @ vectors.mT).mT


def _accumulate(terms: Iterable[Tensor]) -> Tensor:
    """The sum of ``terms``, added in place into the first: each is a new tensor (a product)."""
    iterator = iter(terms)
    total = next(iterator)
    for term in iterator:
        total += term
    return total


def _blocks(projected: Tensor, k_in: int) -> Tensor:
    """``up[i]^T W_ij`` as ``(K_out, K_in, r, n_b)``: a view of ``projected``."""
    k_out, rank, _ = projected.shape
    return projected.view(k_out, rank, k_in, -1).transpose(1, 2)


def _cross(projected: Tensor, down: Tensor) -> Tensor:
    """``C_ij = up[i]^T W_ij down[j]^T``, ``(K_out, K_in, r, r)``: one product per input block
    ``j`` over the rows ``(i, a)`` of ``projected`` (a strided view, so nothing is copied)."""
    k_out, rank, _ = projected.shape
    k_in = down.shape[0]
    by_input_block = projected.view(k_out * rank, k_in, -1).transpose(0, 1)
    return (by_input_block @ down.mT).view(k_in, k_out, rank, rank).transpose(0, 1)


def _cross_diagonal(projected: Tensor, down: Tensor) -> Tensor:
    """The diagonals of the ``_cross`` blocks, ``(K_out, K_in, r)``: dot products of length
    ``n_b``, one output block at a time (all at once, they made a weight-sized temporary). With
    long ones, ``K_in x K_in`` products for each rank position instead, of which the diagonal is
    kept: K_in times the multiply-adds, but twice as fast at 4096 x 4096, K = 8 (and 8 times
    slower at K = 96, n_b = 4)."""
    k_out, rank, _ = projected.shape
    k_in, _, block_in = down.shape
    if block_in < 16 * k_in:
        blocks = _blocks(projected, k_in)
        return torch.stack([torch.linalg.vecdot(blocks[i], down) for i in range(k_out)])
    by_position = down.permute(1, 2, 0).contiguous()  # (r, n_b, K_in): else bmm copies per batch
    return torch.stack(
        [
            (projected[i].view(rank, k_in, -1) @ by_position).diagonal(dim1=-2, dim2=-1).T
            for i in range(k_out)
        ]
    )


def _cross_times(projected: Tensor, down: Tensor, vectors: Tensor) -> Tensor:
    """``C_ij @ vectors_ij`` for the ``_cross`` blocks ``C_ij = up[i]^T W_ij down[j]^T``,
    ``(K_out, K_in, r)``, without them: ``up[i]^T W_ij (down[j]^T vectors_ij)``, one pass over
    ``projected`` against ``r`` products with it per pair."""
    k_out, k_in = len(projected), len(down)
    pulled = down.mT @ vectors.permute(1, 2, 0)  # down[j]^T vectors_ij: (K_in, n_b, K_out)
    blocks = _blocks(projected, k_in)
    # Matrix-vector products per output block: vecdot made a (K_in, r, n_b) temporary of each.
    return torch.stack([(blocks[i] @ pulled[:, :, i, None])[..., 0] for i in range(k_out)])


def _squared_error(projected: Tensor, factors: Factors, norm_sq: Tensor) -> Tensor:
    """``||W - W_fit||_F^2``, from the normal equations of the down step."""
    up, gate, down = factors
    hessian, rhs = _down_normal_equations(projected, (up.mT @ up).unsqueeze(1), gate)
    return _residual(hessian, rhs, down, norm_sq)


def _residual(hessian: Tensor, rhs: Tensor, down: Tensor, norm_sq: Tensor) -> Tensor:
    """``||W||^2 - 2 <down, rhs> + <down, hessian down>``: the squared error, given the down
    step's normal equations (the other factors fixed)."""
    return norm_sq + (down * (hessian @ down - 2 * rhs)).sum()


def _better(
    factors: Factors, error_sq: Tensor, candidate: Tuple[Factors, Tensor]
) -> Tuple[Factors, Tensor]:
    """The candidate if it lowers the error, else the factors as they are."""
    return candidate if candidate[1] < error_sq else (factors, error_sq)


def _extrapolate(factors: Factors, previous: Factors, step: float) -> Factors:
    """``factors + step * (factors - previous)``: a line-search step along the last iteration's
    direction (tried, and kept only when it lowers the error, it speeds up ALS where it creeps)."""

    def ahead(new: Tensor, old: Tensor) -> Tensor:
        return torch.lerp(old, new, 1 + step)  # one pass: new + step (new - old)

    gate = [
        None if new is None else ahead(new, old) for new, old in zip(factors.gate, previous.gate)
    ]
    return Factors(ahead(factors.up, previous.up), Gate(*gate), ahead(factors.down, previous.down))


def _aligned(rows: Tensor, factors: Factors, norm_sq: Tensor) -> Tuple[Factors, Tensor]:
    """Scalar and diagonal gates: the factors with the bases of their spans re-aligned, and the
    squared error they leave.

    ALS finds the spans of ``up[i]`` and ``down[j]`` within an iteration, but the bases inside
    them must also line up so that every block is ``up[i] G_ij down[j]`` with a gate of the
    variant, and there ALS stalls with some blocks left out (their gates near 0). Solved directly
    instead: in orthonormal bases of the spans the blocks are ``C_ij ~ M_i G_ij N_j``. Taking row
    ``i0`` (the best conditioned) as the reference, ``N_j = M_i0^-1 C_i0j`` absorbs ``G_i0j``; then
    ``C_ij N_j^-1 ~ M_i G_ij G_i0j^-1`` for every ``j`` has the common factor ``M_i``, fitted over
    ``j`` by ``_common_factor``. ``M_i0 = I`` serves scalar gates; diagonal ones need
    ``_diagonalizer``. Gate and down are then fitted to ``up = U M`` as in an iteration.
    """
    up, gate, down = factors
    k_out, k_in = gate.mix.shape[:2]
    up_basis = torch.linalg.qr(up).Q
    down_basis = torch.linalg.qr(down.mT).Q.mT
    cores = _cross(_project(rows, up_basis), down_basis)
    conditioning = torch.linalg.svdvals(cores)[..., -1]  # smallest singular value, (K_out, K_in)
    best_rows = conditioning.min(1).values.argsort(descending=True)
    down_core = cores[best_rows[0]]
    diagonal = gate.mix.dim() == 3
    if diagonal and min(k_out, k_in) > 1:  # else any M_i0 will do: the gates fold into up or down
        ratios = cores[best_rows[1]] @ torch.linalg.pinv(down_core)
        down_core = torch.linalg.pinv(_diagonalizer(ratios)) @ down_core
    estimates = cores @ torch.linalg.pinv(down_core)
    # Weighted by how well each N_j is conditioned: N_j^-1 amplifies noise.
    up = up_basis @ _common_factor(estimates * conditioning[best_rows[0], :, None, None], diagonal)
    down = down_core @ down_basis
    gate, down, error_sq = _update_gate_and_down(_project(rows, up), up, gate, down, norm_sq)
    return Factors(up, gate, down), error_sq


def _diagonalizer(ratios: Tensor) -> Tensor:
    """``M`` from ``ratios[j] ~ M' D_j M^-1`` with diagonal ``D_j`` (Jennrich's algorithm): the
    eigenvectors of ``(sum_j beta_j ratios[j])^-1 sum_j alpha_j ratios[j] = M D M^-1``, with
    random (but fixed) weights so that ``D``'s entries differ. Real up to noise."""
    weights = torch.randn(2, len(ratios), 1, 1, generator=torch.Generator().manual_seed(0))
    alpha, beta = (weights.to(ratios) * ratios).sum(1)
    return torch.linalg.eig(torch.linalg.pinv(beta) @ alpha).eigenvectors.real


def _common_factor(estimates: Tensor, per_column: bool) -> Tensor:
    """``M_i`` from ``estimates[i, j] ~ M_i S_ij`` with scalar ``S_ij`` (or, ``per_column``,
    diagonal): the best rank-one fit over ``j``, of whole matrices (or of each column)."""
    k_out, _, rank, _ = estimates.shape
    if per_column:  # (K_out, column, K_in, row): K_in estimates of each column
        return torch.linalg.svd(estimates.permute(0, 3, 1, 2), full_matrices=False).Vh[..., 0, :].mT
    vectors = torch.linalg.svd(estimates.flatten(2), full_matrices=False).Vh[:, 0]
    return vectors.view(k_out, rank, rank)


def _fit_gate(
    gate: Gate,
    up_gram: Tensor,
    down_gram: Tensor,
    projected: Tensor,
    down: Tensor,
    shrink: float = 0.0,
) -> Gate:
    """Best ``G_ij`` for every block at once: ``min ||W_ij - up[i] G_ij down[j]||_F``, i.e.
    ``min tr(G^T A G B) - 2 <G, C>`` with ``A = up_gram``, ``B = down_gram`` and ``C`` the
    ``_cross``; scalar and diagonal gates need only its diagonal, diagonal_outer that and ``C b``
    (``_cross_times``). ``shrink``: a Tikhonov weight, relative to the mean curvature."""
    if gate.mix.dim() == 4:
        cross = _cross(projected, down)
        return Gate(_fit_full_gate(gate.mix, up_gram, down_gram, cross, shrink))
    cross_diagonal = _cross_diagonal(projected, down)
    if gate.left is not None and gate.right is not None:
        cross_right = _cross_times(projected, down, gate.right)
        mix, left = _fit_diagonal_and_outer(
            gate, up_gram, down_gram, cross_diagonal, cross_right, shrink
        )
        return Gate(mix, left, gate.right)
    if gate.mix.dim() == 2:  # g I: one unknown per block, curvature <A, B>
        # One product of the flattened grams: A * B itself would be K_out K_in r^2 numbers.
        curvature = (up_gram[:, 0].flatten(1) @ down_gram[0].flatten(1).T)[..., None, None]
        target = cross_diagonal.sum(-1)[..., None, None]
        solution = _proximal_solve(curvature, target, gate.mix[..., None, None], shrink=shrink)
        return Gate(solution[..., 0, 0])
    # diag(g): curvature A o B
    curvature = up_gram * down_gram
    solution = _proximal_solve(
        curvature, cross_diagonal[..., None], gate.mix[..., None], overwrite=True, shrink=shrink
    )
    return Gate(solution[..., 0])


def _fit_full_gate(
    mix: Tensor, up_gram: Tensor, down_gram: Tensor, cross: Tensor, shrink: float = 0.0
) -> Tensor:
    """Dense ``G``: normal equations ``A G B = C``. In the eigenbases of ``A`` (per output block)
    and ``B`` (per input block) they are elementwise: ``alpha_k beta_l G'_kl = C'_kl``."""
    alpha, u = torch.linalg.eigh(up_gram)
    beta, v = torch.linalg.eigh(down_gram)
    alpha, beta = alpha.clamp_min(0), beta.clamp_min(0)  # PSD; rounding can dip below zero
    curvature = alpha[..., :, None] * beta[..., None, :]
    mean_curvature = curvature.mean((-2, -1))[..., None, None]
    ridge = _ridge(mean_curvature)
    rotated = u.mT @ (cross + ridge * mix) @ v / (curvature + ridge + shrink * mean_curvature)
    return u @ rotated @ v.mT


def _fit_diagonal_and_outer(
    gate: Gate,
    up_gram: Tensor,
    down_gram: Tensor,
    cross_diagonal: Tensor,
    cross_right: Tensor,
    shrink: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """Best ``(g, a)`` in ``G = diag(g) + a b^T`` for the current ``b``: linear in them jointly, a
    ``2r`` system per block from the gradient of ``tr(G^T A G B) - 2 <G, C>``, with the proximal
    term of ``_proximal_solve`` (``rho``, towards the current ``(g, a)``):

        [ A o B + rho I    diag(u) A   ] [g]   [diag(C)]
        [ A diag(u)        c A + rho I ] [a] = [ C b   ] + rho [g; a]_current,

    ``u = B b``, ``c = b^T u``. ``a`` is eliminated: ``A = V diag(lam) V^T`` per output block
    makes ``L = c A + rho I`` diagonal in ``V``, and ``g`` solves the ``r x r`` Schur complement
    ``S = A o B + rho I - (u u^T) o (A L^-1 A)`` (where the ``2r`` systems' Cholesky moved four
    times the memory, 60% of a 4096 x 4096 fit's time); then ``a = L^-1 (t_a - A (u o g))``. A
    pair whose ``S`` rounding made indefinite keeps its current ``(g, a)``.

    ``b`` gets its turn in the other half of the iteration, where the transposed problem's gate
    is ``G^T = diag(g) + b a^T``. A Tikhonov weight ``shrink`` (relative to the mean curvature)
    adds to ``rho`` on the left-hand side only.
    """
    assert gate.left is not None and gate.right is not None
    rank = gate.mix.shape[-1]
    a_gram, b_gram = up_gram, down_gram  # (K_out, 1, r, r), (1, K_in, r, r)
    u = _gram_times(b_gram[0], gate.right.transpose(0, 1)).transpose(0, 1)  # (K_out, K_in, r)
    c = (gate.right * u).sum(-1)[..., None]  # (K_out, K_in, 1)
    a_diagonal = a_gram.diagonal(dim1=-2, dim2=-1)
    b_diagonal = b_gram.diagonal(dim1=-2, dim2=-1)
    mean_curvature = ((a_diagonal * b_diagonal).sum(-1) + c[..., 0] * a_diagonal.sum(-1)) / (
        2 * rank
    )
    rho = _ridge(mean_curvature)[..., None]  # (K_out, K_in, 1)
    damping = rho + shrink * mean_curvature[..., None]
    lam, basis = torch.linalg.eigh(a_gram[:, 0])  # per output block: (K_out, r), (K_out, r, r)
    basis = basis.contiguous()  # eigh's is column-major: products with it would be too
    lam = lam.clamp_min(0)[:, None]  # PSD; rounding can dip below zero
    scale = c * lam + damping  # L's eigenvalues, (K_out, K_in, r)
    target_g = cross_diagonal + rho * gate.mix
    target_a = cross_right + rho * gate.left
    k_out, k_in = cross_diagonal.shape[:2]

    def in_basis(weights: Tensor, x: Tensor) -> Tensor:
        """``V diag(weights) V^T x`` for every pair, ``x`` and ``weights`` ``(K_out, K_in, r)``:
        products per output block, the pairs as columns (V is not copied per pair)."""
        rotated = (basis.mT @ x.mT) * weights.mT  # (K_out, r, K_in)
        return (basis @ rotated).mT

    # A L^-1 A = V diag(lam^2 / scale) V^T, the pairs' rows stacked against each block's V^T.
    scaled_columns = basis[:, None] * (lam.square() / scale)[..., None, :]
    schur = scaled_columns.view(k_out, k_in * rank, rank) @ basis.mT
    schur = schur.view(k_out, k_in, rank, rank)
    schur = (a_gram * b_gram).addcmul_(schur, u[..., :, None] * u[..., None, :], value=-1)
    schur.diagonal(dim1=-2, dim2=-1).add_(damping)
    factor, info = torch.linalg.cholesky_ex(schur)
    rhs = target_g - u * in_basis(lam / scale, target_a)  # t_g - u o (A L^-1 t_a)
    g = _cholesky_solve(factor, rhs[..., None])[..., 0]
    a = in_basis(1 / scale, target_a) - in_basis(lam / scale, u * g)  # L^-1 A = A L^-1
    ok = (info == 0)[..., None]
    return torch.where(ok, g, gate.mix), torch.where(ok, a, gate.left)


def _proximal_solve(
    hessian: Tensor, rhs: Tensor, current: Tensor, overwrite: bool = False, shrink: float = 0.0
) -> Tensor:
    """``argmin_x <x, H x> - 2 <x, rhs> + ridge ||x - current||^2`` for batches of ``H``, plus
    ``shrink * (mean curvature) * ||x||^2`` where ``shrink`` is not 0; ``overwrite``: ``hessian``
    is a temporary, which may be changed (no copy of it).

    By Cholesky: ``H + ridge I`` is positive definite. (Batched LU, ``torch.linalg.solve``, also
    hangs in MKL's DLASWP on this machine's torch 2.13 at 8 x 256 x 256.) A system that rounding
    made indefinite keeps ``current``, which cannot raise the error either.
    """
    mean_curvature = hessian.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None]
    ridge = _ridge(mean_curvature)
    regularized = hessian if overwrite else hessian.clone()
    regularized.diagonal(dim1=-2, dim2=-1).add_(ridge + shrink * mean_curvature)
    factor, info = torch.linalg.cholesky_ex(regularized)
    solution = _cholesky_solve(factor, rhs + ridge[..., None] * current)
    return torch.where((info == 0)[..., None, None], solution, current)


def _cholesky_solve(factor: Tensor, rhs: Tensor) -> Tensor:
    """``(L L^T)^-1 rhs``. With one column per system, by two triangular solves:
    ``torch.cholesky_solve`` copies the factor and both sides, 6 times their time at
    (16, 16, 135, 135). With many columns (the down step's), it is the faster: 7 against 15 ms
    at (8, 253, 253) by 512."""
    if rhs.shape[-1] > 1:
        return torch.cholesky_solve(rhs, factor)
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def _ridge(curvature: Tensor) -> Tensor:
    """RIDGE times the mean curvature; 1 where there is none (``H = 0``, ``rhs = 0``: keep x)."""
    return torch.where(curvature > 0, RIDGE * curvature, torch.ones_like(curvature))
