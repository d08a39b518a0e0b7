"""Pure tensor merge functions, one per method.

Every function takes a sequence of task vectors ``tau_i = M_i - BASE`` of one tensor (same shape, floating)
and returns ``combine(tau_1..tau_n)``: NOT scaled by the spec's ``scale`` (lambda) and NOT added to the base.
The one exception is :func:`average`, which takes the model tensors themselves (it is also correct on
deltas: the weighted mean of deltas plus the base is the weighted mean of the models).

Conventions shared by all functions:

* ``weights``: ``None`` means unit weights (every ``w_i = 1``); otherwise one finite float per input.
* Compute dtype: float64 when any input is float64, float32 otherwise (float16 / bfloat16 inputs are
  upcast). The result is in the compute dtype; the dispatcher in :mod:`hf_atm.merging.spec` casts back.
* The inputs are never modified in place.
* ``density`` is the kept fraction; trimming keeps ``k = int(density * numel)`` entries (as
  ``peft.utils.merge_utils.magnitude_based_pruning`` does), and ``density >= 1`` means no trimming.
* SVD-based methods (:func:`tsv`, :func:`iso_c`) apply only to 2-D tensors and use
  ``torch.linalg.svd(full_matrices=False)``; other ranks fall back as each docstring states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_atm.errors import CheckpointError, MergeConfigError

__all__ = [
    "average",
    "breadcrumbs",
    "breadcrumbs_mask",
    "compute_dtype",
    "dare_linear",
    "dare_mask",
    "dare_ties",
    "iso_c",
    "magnitude_trim",
    "task_arithmetic",
    "ties",
    "tsv",
]

Generators = torch.Generator | Sequence[torch.Generator] | None


# ----------------------------------------------------------------------------------------------- helpers
def compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 when any tensor is float64, float32 otherwise (the precision merges are computed in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(tensors: Sequence[Tensor], what: str = "task vectors") -> torch.dtype:
    """Validate a non-empty sequence of same-shape floating tensors; return the compute dtype."""
    if len(tensors) == 0:
        raise MergeConfigError(f"merge needs at least one tensor, got no {what}")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise CheckpointError(
                f"{what}[{i}] has non-floating dtype {t.dtype}; only floating tensors merge"
            )
        if t.shape != shape:
            raise CheckpointError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return compute_dtype(tensors)


def _weights(weights: Sequence[float] | None, n: int) -> list[float] | None:
    """None (unit weights) or a list of n floats; a wrong count is a MergeConfigError naming `weights`."""
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeConfigError(f"weights has {len(w)} entries but {n} tensors were given")
    return w


def _weighted_sum(tensors: Sequence[Tensor], weights: list[float] | None, dtype: torch.dtype) -> Tensor:
    """sum_i w_i t_i in `dtype`, accumulated in one fresh buffer (no stacking, inputs untouched)."""
    out = tensors[0].to(dtype=dtype, copy=True)
    if weights is not None and weights[0] != 1.0:
        out.mul_(weights[0])
    for i in range(1, len(tensors)):
        t = tensors[i]
        w = 1.0 if weights is None else weights[i]
        if t.dtype == dtype:
            out.add_(t, alpha=w)
        else:
            out.add_(t.to(dtype), alpha=w)
    return out


def _stack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([t.to(dtype) for t in tensors], dim=0)


def _weight_column(weights: list[float] | None, n: int, like: Tensor) -> Tensor:
    """Weights as a (n, 1, 1, ...) tensor broadcasting against a stack shaped like `like`."""
    w = torch.ones(n) if weights is None else torch.tensor(weights)
    return w.to(dtype=like.dtype, device=like.device).view((n,) + (1,) * (like.dim() - 1))


def _check_density(density: float, name: str = "density") -> None:
    if not 0.0 < density <= 1.0:
        raise MergeConfigError(f"{name} must be in (0, 1], got {density}")


def _elect_and_disjoint_mean(
    stacked: Tensor, weights: list[float] | None, majority_sign_method: str
) -> Tensor:
    """TIES steps 2-3 exactly as peft: elect the sign on the *unweighted* stack, then the weighted disjoint mean.

    sign election: ``total``: s = sign(sum_i tau_i); ``frequency``: s = sign(sum_i sign(tau_i));
    s = +1 where that sum is 0. An entry of task i "agrees" when sign(tau_i) == s (zero entries never agree).
    result = sum_i [agree_i] * w_i * tau_i / max(1, count_i [agree_i])  (0 where no task agrees: no 0/0).
    """
    sign = stacked.sign()
    if majority_sign_method == "total":
        votes = stacked.sum(dim=0)
    elif majority_sign_method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise MergeConfigError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = sign == elected
    if weights is not None:
        stacked = stacked * _weight_column(weights, stacked.shape[0], stacked)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(
        dim=0
    )
    count = agree.sum(dim=0).clamp_(min=1).to(stacked.dtype)
    return total.div_(count)


# ------------------------------------------------------------------------------------------ trimming / masks
def magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density * numel)`` largest-magnitude entries of `tau`, zero the rest (TIES "trim").

    Same selection as ``peft.utils.merge_utils.magnitude_based_pruning`` (``torch.topk`` on ``|tau|``, so ties
    at the threshold resolve identically); ``density >= 1`` returns `tau` unchanged (a view, not a copy).
    """
    if density >= 1.0:
        return tau
    flat = tau.reshape(-1)
    k = int(density * flat.numel())
    out = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k=k, largest=True).indices
        out[idx] = flat[idx]
    return out.view(tau.shape)


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


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Bool mask of the Breadcrumbs "middle band" of `tau` by magnitude.

    With ``N = numel``, ``k_top = int(gamma * N)`` and ``k_keep = min(int(density * N), N - k_top)``: the
    ``k_top`` largest-magnitude entries are dropped, and of the rest the ``k_keep`` largest are kept (so the
    ``N - k_top - k_keep`` smallest are dropped). Exactly ``k_keep`` entries are True.
    """
    flat = tau.reshape(-1)
    n = flat.numel()
    k_top = int(gamma * n)
    k_keep = min(int(density * n), n - k_top)
    k_bottom = n - k_top - k_keep
    mag = flat.abs()
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    if k_top > 0:
        top = torch.topk(mag, k=k_top, largest=True).indices
        mask[top] = False
        # Exclude the dropped top entries from the bottom search so the two sets never overlap
        # (equal magnitudes could otherwise be picked twice and keep fewer than k_keep).
        mag = mag.clone()
        mag[top] = float("inf")
    if k_bottom > 0:
        bottom = torch.topk(mag, k=k_bottom, largest=False).indices
        mask[bottom] = False
    return mask.view(tau.shape)


def _generator_list(generator: Generators, n: int) -> list[torch.Generator | None]:
    """One generator per task: a sequence is used as given; a single generator (or None) is shared in order."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    gens = list(generator)
    if len(gens) != n:
        raise MergeConfigError(f"dare needs one generator per task vector: got {len(gens)} for {n} tensors")
    return gens


def _dare_drop(tau: Tensor, density: float, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """DARE on one task vector: ``tau * mask / density`` with ``mask = dare_mask(...)`` (fresh tensor)."""
    mask = dare_mask(tau.shape, density, generator, device=tau.device)
    # (tau * mask) / density as peft computes it, so kept entries are exactly tau / density.
    return (tau.to(dtype) * mask).div_(density)


# ------------------------------------------------------------------------------------------------ methods
def average(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean ``sum_i w_i M_i / sum_i w_i`` of the *model* tensors (unit weights: the plain mean).

    The only function here that takes models rather than deltas (on deltas it gives the mean delta).
    The weight sum must be non-zero. Model soups / "uniform soup" (Wortsman et al. 2022).
    """
    dtype = _check(tensors, "tensors")
    w = _weights(weights, len(tensors))
    total = float(len(tensors)) if w is None else sum(w)
    if total == 0.0:
        raise MergeConfigError("weights sum to 0: the weighted average is undefined")
    return _weighted_sum(tensors, w, dtype).div_(total)


def task_arithmetic(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Task arithmetic: ``sum_i w_i tau_i`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    Equals ``peft.utils.merge_utils.task_arithmetic(taus, torch.tensor(weights))``.
    """
    dtype = _check(task_vectors)
    return _weighted_sum(task_vectors, _weights(weights, len(task_vectors)), dtype)


def ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    majority_sign_method: str = "total",
) -> Tensor:
    """TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

    1. trim: ``t_i = magnitude_trim(tau_i, density)`` (top ``int(density * numel)`` entries by ``|tau_i|``);
    2. elect: ``s = sign(sum_i t_i)`` (``"total"``) or ``s = sign(sum_i sign(t_i))`` (``"frequency"``), with
       ``s = +1`` where the vote is 0; the vote uses the *unweighted* trimmed vectors;
    3. disjoint mean: ``sum_i [sign(t_i) == s] w_i t_i / max(1, #{i : sign(t_i) == s})``.

    Weights enter only in step 3: each agreeing trimmed entry is multiplied by its weight and the sum is
    divided by the *count* of agreeing tasks (not by the sum of their weights). This is exactly
    ``peft.utils.merge_utils.ties(taus, torch.tensor(weights), density, majority_sign_method)``, for unit and
    non-unit weights alike. Entries where no task agrees (e.g. all zero) are 0. ``density = 1`` skips the trim,
    leaving the sign election and disjoint mean.
    """
    dtype = _check(task_vectors)
    _check_density(density)
    w = _weights(weights, len(task_vectors))
    stacked = torch.stack([magnitude_trim(t.to(dtype), density) for t in task_vectors], dim=0)
    return _elect_and_disjoint_mean(stacked, w, majority_sign_method)


def dare_linear(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    generator: Generators = None,
) -> Tensor:
    """DARE + linear sum (Yu et al., "Language Models are Super Mario", ICML 2024): ``sum_i w_i m_i tau_i / density``.

    ``m_i = dare_mask(shape, density, g_i)``: each entry kept independently with probability `density` and the
    kept ones rescaled by ``1 / density`` (peft's convention, unbiased: ``E[result] = sum_i w_i tau_i``).
    `generator`: a sequence gives one generator per task (``g_i``, what the dispatcher passes so that the
    mask of task i does not depend on the other tasks); a single generator draws the masks in task order;
    None uses torch's global RNG. Masks are drawn on the CPU and moved to the tensors' device.
    """
    dtype = _check(task_vectors)
    _check_density(density)
    w = _weights(weights, len(task_vectors))
    gens = _generator_list(generator, len(task_vectors))
    out: Tensor | None = None
    for i, (tau, g) in enumerate(zip(task_vectors, gens)):
        term = _dare_drop(tau, density, g, dtype)
        if w is not None:
            term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def dare_ties(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    generator: Generators = None,
) -> Tensor:
    """DARE + TIES (Yu et al. 2024; as ``peft.utils.merge_utils.dare_ties``).

    ``d_i = m_i tau_i / density`` (the DARE drop/rescale of :func:`dare_linear`, same masks for the same
    generators), then TIES steps 2-3 on the ``d_i``: sign election on the unweighted ``d_i`` and the weighted
    disjoint mean ``sum_i [sign(d_i) == s] w_i d_i / max(1, #agreeing)`` (see :func:`ties`).
    """
    dtype = _check(task_vectors)
    _check_density(density)
    w = _weights(weights, len(task_vectors))
    gens = _generator_list(generator, len(task_vectors))
    stacked = torch.stack([_dare_drop(t, density, g, dtype) for t, g in zip(task_vectors, gens)], dim=0)
    return _elect_and_disjoint_mean(stacked, w, majority_sign_method)


def breadcrumbs(
    task_vectors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.9,
    gamma: float = 0.01,
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks", ECCV 2024): ``sum_i w_i (tau_i * breadcrumbs_mask(tau_i, density, gamma))``.

    Per task vector (over the whole tensor) the ``k_top = int(gamma * numel)`` largest-magnitude entries
    (outliers) are dropped, then the next ``int(density * numel)`` largest are kept and the smallest rest
    dropped. Requires ``gamma + density <= 1`` (validated by the spec; here the kept count is capped).
    """
    dtype = _check(task_vectors)
    _check_density(density)
    if not 0.0 <= gamma < 1.0:
        raise MergeConfigError(f"gamma must be in [0, 1), got {gamma}")
    w = _weights(weights, len(task_vectors))
    out: Tensor | None = None
    for i, tau in enumerate(task_vectors):
        t = tau.to(dtype)
        term = t * breadcrumbs_mask(t, density, gamma)
        if w is not None:
            term.mul_(w[i])
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def tsv(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """TSV-M, Task Singular Vectors merge (Gargiulo et al., "Task Singular Vectors: Reducing Task
    Interference in Model Merging", CVPR 2025).

    For a 2-D tensor (m x n) and T tasks, with ``A_i = w_i tau_i``:

    1. ``A_i = U_i S_i V_i^T`` (reduced SVD); keep the top ``k = max(1, int(min(m, n) / T))`` triplets;
    2. ``U_cat = [U_1[:, :k] .. U_T[:, :k]]`` (m x Tk), ``S_cat`` = the kept singular values in the same
       order, ``V_cat = [V_1[:, :k] .. V_T[:, :k]]`` (n x Tk);
    3. whiten: ``svd(U_cat) = P Sigma Q^T`` -> ``U_perp = P Q^T``, likewise ``V_perp`` from ``V_cat``
       (the closest matrices with orthonormal columns, Procrustes);
    4. result ``U_perp diag(S_cat) V_perp^T``.

    With T = 1, k = min(m, n) and the task's own delta comes back. Tensors that are not 2-D (biases,
    LayerNorm, scalars) fall back to the *mean* ``(1/T) sum_i w_i tau_i``, as the authors' code does for
    non-matrix parameters (it averages them).
    """
    dtype = _check(task_vectors)
    w = _weights(weights, len(task_vectors))
    n_tasks = len(task_vectors)
    if task_vectors[0].dim() != 2:
        return _weighted_sum(task_vectors, w, dtype).div_(n_tasks)
    m, n = task_vectors[0].shape
    k = max(1, int(min(m, n) / n_tasks))
    us, ss, vs = [], [], []
    for i, tau in enumerate(task_vectors):
        a = tau.to(dtype)
        if w is not None:
            a = a * w[i]
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :])
    u_cat = torch.cat(us, dim=1)  # m x Tk
    s_cat = torch.cat(ss)
    vh_cat = torch.cat(vs, dim=0)  # Tk x n, i.e. V_cat^T
    p, _, qh = torch.linalg.svd(u_cat, full_matrices=False)
    u_perp = p @ qh
    p, _, qh = torch.linalg.svd(vh_cat, full_matrices=False)
    vh_perp = p @ qh  # (V_perp)^T: whitening V_cat^T gives the transpose of whitening V_cat
    return (u_perp * s_cat) @ vh_perp


def iso_c(task_vectors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025).

    2-D tensors: ``D = sum_i w_i tau_i = U S V^T`` (reduced SVD) and the result ``U (mean(S) I) V^T``: the
    spectrum flattened to its mean singular value (so the Frobenius norm changes, the subspaces do not).
    Other ranks (biases, LayerNorm, scalars): the *mean* ``(1/T) sum_i w_i tau_i``, which is what the authors'
    code does (it computes ``sum(tvs) / len(tvs)`` for every key and multiplies by ``len(tvs)`` only for the
    2-D ones). In the paper the result is then scaled by alpha: that is the spec's ``scale``, applied by the
    dispatcher, not here.
    """
    dtype = _check(task_vectors)
    delta = _weighted_sum(task_vectors, _weights(weights, len(task_vectors)), dtype)
    if delta.dim() != 2:
        return delta.div_(len(task_vectors))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u * s.mean()) @ vh
