"""Random drops: DARE's Bernoulli masks and DELLA's magnitude-ranked keep probabilities, and the methods
built on them alone (``dare_linear``, ``della``, ``della_linear``; ``dare_ties`` is in :mod:`hf_atm.merging.sliced`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_atm.errors import MergeConfigError
from hf_atm.merging.conventions import (
    SLICE_ELEMENTS,
    Generators,
    PerTask,
    check_rescale,
    check_sign_method,
    check_tensors,
    compute_dtype,
    densities,
    generator_list,
    per_task_values,
    weight_list,
)
from hf_atm.merging.election import elect_and_mean_slice

__all__ = [
    "dare_linear",
    "dare_mask",
    "della",
    "della_keep_probabilities",
    "della_linear",
    "della_prune",
    "l1_rescale",
]


def dare_mask(
    shape: torch.Size | Sequence[int],
    density: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bernoulli(`density`) keep-mask (bool) of `shape`: entry kept iff ``U < density`` with ``U ~ Uniform[0, 1)``.

    Drawn on the CPU with `generator` (the global RNG when None) and then moved to `device`, so a seeded
    generator gives the same mask on CPU and GPU.
    """
    u = torch.rand(tuple(shape), generator=generator, device="cpu", dtype=torch.float32)
    mask = u < density
    return mask if device is None else mask.to(device)


def l1_rescale(tau: Tensor, masked: Tensor) -> Tensor:
    """``masked * (||tau||_1 / ||masked||_1)`` in place (mergekit's ``RescaleNorm.l1``); `masked` unchanged when
    either norm is below 1e-7."""
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked.mul_(before / after)


def _dare_drop(tau: Tensor, density: float, generator: torch.Generator | None, dtype: torch.dtype,
               rescale: str | None = "probability") -> Tensor:
    """DARE on one task vector: ``tau * mask`` rescaled by ``1 / density`` (``"probability"``), to the L1 norm of
    `tau` (``"l1"``) or not at all (None), with ``mask = dare_mask(...)`` (fresh tensor)."""
    mask = dare_mask(tau.shape, density, generator, device=tau.device)
    x = tau.to(dtype)
    if rescale == "probability":
        # (tau * mask) / density as peft computes it, so kept entries are exactly tau / density.
        return (x * mask).div_(density)
    masked = x * mask
    return l1_rescale(x, masked) if rescale == "l1" and density < 1.0 else masked


def dare_linear(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    generator: Generators = None,
    rescale: str | None = "probability",
) -> Tensor:
    """DARE + linear sum (Yu et al., "Language Models are Super Mario", ICML 2024): ``sum_i w_i m_i tau_i / density``.

    `density` may be a sequence, one per task (``m_i`` keeps with probability ``density_i`` and task i is
    rescaled by ``1 / density_i``). A sum of independent per-task terms.

    ``m_i = dare_mask(shape, density, g_i)``: each entry kept independently with probability `density` and the
    kept ones rescaled by ``1 / density`` (peft's convention, unbiased: ``E[result] = sum_i w_i tau_i``).
    `generator`: a sequence gives one generator per task (``g_i``, what the dispatcher passes so that the
    mask of task i does not depend on the other tasks); a single generator draws the masks in task order;
    None uses torch's global RNG. Masks are drawn on the CPU and moved to the tensors' device. `rescale`:
    ``"probability"`` (``1 / density``, default), ``"l1"`` (each kept vector scaled back to its task vector's L1
    norm, mergekit's ``rescale: true``) or None (no rescale).
    """
    dtype = check_tensors(task_vectors)
    check_rescale(rescale)
    ds = densities(density, len(task_vectors))
    w = weight_list(weights, len(task_vectors))
    gens = generator_list(generator, len(task_vectors))
    out: Tensor | None = None
    for i, (tau, g) in enumerate(zip(task_vectors, gens)):
        term = _dare_drop(tau, ds[i], g, dtype, rescale)
        if w is not None:
            term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------- DELLA
def _della_options(task_vectors: Sequence[Tensor], density: PerTask, epsilon: PerTask,
                   rescale: str | None) -> tuple[list[float], list[float]]:
    n = len(task_vectors)
    ds = densities(density, n)
    es, listed = per_task_values(epsilon, n, "epsilon")
    for i, (d, e) in enumerate(zip(ds, es)):
        _check_della(d, e, f"epsilon[{i}]" if listed else "epsilon")
    check_rescale(rescale)
    return ds, es


def _check_della(density: float, epsilon: float, name: str = "epsilon") -> None:
    """mergekit 0.1.5's rule: for ``density < 1``, ``density - epsilon > 0`` and ``density + epsilon < 1``."""
    if not epsilon >= 0.0:
        raise MergeConfigError(f"{name} must be >= 0, got {epsilon}")
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise MergeConfigError(
            f"{name}: density +/- epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
        )


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities ``p`` (same shape as `tau`, compute dtype), as mergekit 0.1.5.

    Tensors with fewer than 2 dims are viewed as one row (``(1, numel)``). Along dim 1 (within each row of a
    matrix; along dim 1 for each index of the other dims of a higher-rank tensor) entries are ranked by
    ``|tau|`` ascending, ``r = 1..n`` (equal magnitudes: earlier index, lower rank; mergekit's unstable
    argsort leaves that order unspecified), and ``p = (density - epsilon) + ((r - 1) / (n - 1)) * 2 * epsilon``:
    linear in the rank from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), mean
    ``density`` in every row. A row of one entry (``n = 1``, where mergekit divides 0 by 0) gets
    ``(density - epsilon) + epsilon``. Ranks are exact integers in the compute dtype (mergekit uses the tensor
    dtype on GPU, so ranks above 256 round in bfloat16 there) and every step is one IEEE operation, so the
    probabilities are the same on every device. No validation here (see :func:`della_prune`).
    """
    dtype = compute_dtype([tau])
    x = tau.to(dtype)
    rows = x.reshape(1, 1) if x.dim() == 0 else (x.unsqueeze(0) if x.dim() == 1 else x)
    mag = rows.abs()
    n = mag.shape[1]
    if n == 1:
        rank_norm = torch.full_like(mag, 0.5)
    else:
        order = torch.argsort(mag, dim=1, stable=True)  # ascending
        view = [1] * mag.dim()
        view[1] = n
        positions = torch.arange(1, n + 1, dtype=order.dtype, device=order.device).view(view).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, positions).to(dtype)  # argsort(argsort) + 1
        del order, positions
        # mergekit: ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1) with min 1 and max n, divided by
        # a tensor (not a Python scalar, which CUDA turns into a multiplication by the reciprocal).
        span = torch.tensor(float(n - 1), dtype=dtype, device=ranks.device)
        rank_norm = ranks.sub_(1).div_(span).clamp_(0, 1)
    probs = rank_norm.mul_(2).mul_(epsilon).add_(density - epsilon)
    return probs.view(tau.shape)


def della_prune(
    tau: Tensor,
    density: float = 0.5,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
    rescale: str | None = "probability",
) -> Tensor:
    """DELLA's MagPrune on one task vector (Deep et al., "DELLA-Merging: Reducing Interference in Model
    Merging through Magnitude-Based Sampling", 2024), in the compute dtype (a fresh tensor).

    ``p = della_keep_probabilities(tau, density, epsilon)``; entry j kept iff ``U_j < p_j`` (``p`` rounded to
    float32, the precision of ``U``) with ``U = torch.rand(tau.shape, generator)`` drawn on the CPU as
    :func:`dare_mask` does and moved to `tau`'s device (seeded, device-independent). Then with ``m`` the mask:

    * ``rescale="probability"`` (default, the paper's): ``tau * m / p``, unbiased (``E = tau``);
    * ``rescale="l1"`` (what mergekit 0.1.5 does with its default ``rescale: true``): ``tau * m *
      (||tau||_1 / ||tau * m||_1)``, left unscaled when either norm is below 1e-7;
    * ``rescale=None`` (mergekit's ``rescale: false``): ``tau * m``.

    ``density = 1`` returns `tau` (in the compute dtype) untouched and draws nothing, as mergekit. Validated as
    mergekit does (no clamping): ``density`` in (0, 1], ``epsilon >= 0`` and, for ``density < 1``,
    ``0 < density - epsilon`` and ``density + epsilon < 1``. With ``epsilon = 0`` every ``p_j = density`` and
    the mask is exactly :func:`dare_mask` with the same generator, so ``della_prune`` equals DARE's drop.
    """
    dtype = check_tensors([tau])
    ds, es = _della_options([tau], density, epsilon, rescale)
    return _della_prune(tau, ds[0], es[0], generator, rescale, dtype)


def _della_prune(tau: Tensor, density: float, epsilon: float, generator: torch.Generator | None,
                 rescale: str | None, dtype: torch.dtype) -> Tensor:
    x = tau.to(dtype)
    if density >= 1.0:
        return x.clone() if x is tau else x
    probs = della_keep_probabilities(x, density, epsilon)
    u = torch.rand(tuple(tau.shape), generator=generator, device="cpu", dtype=torch.float32).to(tau.device)
    keep = u < probs.to(torch.float32)
    del u
    masked = x * keep
    if rescale == "probability":
        return masked.div_(probs)
    if rescale == "l1":
        return l1_rescale(x, masked)
    return masked


def della(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    epsilon: PerTask = 0.15,
    majority_sign_method: str = "total",
    generator: Generators = None,
    rescale: str | None = "probability",
    normalize: bool | None = None,
) -> Tensor:
    """DELLA-Merging (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024; mergekit's ``della``): MagPrune, then TIES' election and disjoint mean.

    1. drop: ``d_i = della_prune(tau_i, density_i, epsilon_i, g_i, rescale)`` (keep probabilities linear in the
       row-wise magnitude rank within ``density_i +- epsilon_i``, kept entries divided by their probability);
    2. elect: ``s = sign(sum_i d_i)`` (``"total"``) or ``sign(sum_i sign(d_i))`` (``"frequency"``), ``+1``
       where the vote is 0, on the *unweighted* ``d_i``;
    3. disjoint mean: ``sum_i [sign(d_i) == s] w_i d_i / max(1, #agreeing)`` (peft's TIES weighting, as
       :func:`ties`; mergekit elects on ``w_i d_i`` and divides by the sum of the agreeing weights instead:
       the same for unit weights).

    Defaults: ``epsilon = 0.15`` is mergekit's default; ``density = 0.5`` is this module's DARE default
    (mergekit's default density is 1, which disables the drop). `density` and `epsilon` may be sequences,
    one per task. `generator`: one per task (what the dispatcher should pass) or one shared in task order,
    as :func:`dare_linear`. Not a sum of independent per-task terms; needs the whole tensor (row ranks).
    """
    dtype = check_tensors(task_vectors)
    ds, es = _della_options(task_vectors, density, epsilon, rescale)
    check_sign_method(majority_sign_method)
    w = weight_list(weights, len(task_vectors))
    gens = generator_list(generator, len(task_vectors))
    dropped = [_della_prune(t, ds[i], es[i], gens[i], rescale, dtype).reshape(-1)
               for i, t in enumerate(task_vectors)]
    # steps 2-3 are element-wise: run them in slices to bound the temporaries (same bits as one call)
    out = torch.empty_like(dropped[0])
    for start in range(0, out.numel(), SLICE_ELEMENTS):
        stop = start + SLICE_ELEMENTS
        out[start:stop] = elect_and_mean_slice([d[start:stop] for d in dropped], [None] * len(dropped), w,
                                                majority_sign_method, normalize)
    return out.view(task_vectors[0].shape)


def della_linear(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: PerTask = 0.5,
    epsilon: PerTask = 0.15,
    generator: Generators = None,
    rescale: str | None = "probability",
) -> Tensor:
    """Linear DELLA (Deep et al. 2024; mergekit's ``della_linear``): ``sum_i w_i d_i`` with
    ``d_i = della_prune(tau_i, density_i, epsilon_i, g_i, rescale)`` (see :func:`della`, same defaults and
    the same ``d_i`` for the same generators).

    No normalisation by the weights (mergekit's ``della_linear`` default ``normalize: false`` too). A sum of
    independent per-task terms (``d_i`` depends on ``tau_i`` and ``g_i`` only).
    """
    dtype = check_tensors(task_vectors)
    ds, es = _della_options(task_vectors, density, epsilon, rescale)
    w = weight_list(weights, len(task_vectors))
    gens = generator_list(generator, len(task_vectors))
    out: Tensor | None = None
    for i, (tau, g) in enumerate(zip(task_vectors, gens)):
        term = _della_prune(tau, ds[i], es[i], g, rescale, dtype)
        if w is not None:
            term = term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out
