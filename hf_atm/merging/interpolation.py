"""Interpolation between the base and the models: SLERP (one model) and Model Stock (the models' mean)."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hf_atm.errors import MergeConfigError
from hf_atm.merging.conventions import check_tensors, compute_dtype, weighted_sum

__all__ = ["model_stock", "model_stock_ratio", "slerp", "slerp_coefficients"]


def model_stock_ratio(task_vectors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)`` (compute dtype), as mergekit 0.1.5.

    ``cos`` is the mean over pairs ``i < j`` of ``clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1)``.
    ``filter_wise=False``: over the flattened tensors, ``t`` is 0-dim. ``filter_wise=True``: per vector along
    the last dim (per row of a matrix; tensors of fewer than 2 dims are one row), ``t`` has shape
    ``(*rows, 1)`` (broadcastable against the tensor; ``(1, 1)`` for a 0-/1-D one). ``t = 0`` where
    ``|1 + (N - 1) cos| < 1e-6`` (mergekit keeps the base there). Needs at least 2 task vectors.
    """
    dtype = check_tensors(task_vectors)
    n = len(task_vectors)
    if n < 2:
        raise MergeConfigError(f"model_stock needs at least 2 task vectors (models besides the base), got {n}")
    if filter_wise:
        xs = [t.to(dtype).reshape(1, -1) if t.dim() < 2 else t.to(dtype) for t in task_vectors]
    else:
        xs = [t.to(dtype).reshape(-1) for t in task_vectors]
    cos_thetas = []
    for i, a in enumerate(xs):
        for b in xs[i + 1:]:
            norm_product = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    return t if filter_wise else t.reshape(())


def model_stock(task_vectors: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024):
    ``t * mean_i(tau_i)`` with ``t = model_stock_ratio(task_vectors, filter_wise)``.

    So ``BASE + result = t * mean_i(M_i) + (1 - t) * BASE``, mergekit 0.1.5's ``model_stock`` (whose
    ``filter_wise`` option, default False, this mirrors). Identical task vectors give ``t = 1`` (the result is
    the task vector); mutually orthogonal ones ``t = 0``. No weights (the method has none). Needs at least 2
    task vectors (mergekit: a base and at least 2 models). Not a sum of independent per-task terms (``t``
    depends on every pair); needs the whole tensor.
    """
    t = model_stock_ratio(task_vectors, filter_wise)
    dtype = compute_dtype(task_vectors)
    mean = weighted_sum(task_vectors, None, dtype).div_(len(task_vectors))
    shape = mean.shape
    if filter_wise and mean.dim() < 2:
        return (t * mean.reshape(1, -1)).reshape(shape)
    return t * mean


#: Chunk (elements) in which mergekit 0.1.5's SLERP accumulates its norms and dot for one output tensor.
_SLERP_CHUNK = 1024 * 1024
_SLERP_DOT_THRESHOLD = 0.9995
_SLERP_EPS = 1e-8


def _check_t(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
        raise MergeConfigError(f"t must be a number in [0, 1], got {t!r}")
    return float(t)


def _slerp_chunks(a: Tensor, b: Tensor, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """``(start, stop, x, y)`` over the flat tensors in chunks of :data:`_SLERP_CHUNK`: `x`, `y` the chunk in
    `dtype`, shape ``(1, n)``, written into two buffers reused for every chunk (fresh chunk-sized temporaries
    from several merge threads fragment the allocator's heap: RSS grows by hundreds of MB on a 1B SLERP)."""
    n = a.numel()
    size = min(n, _SLERP_CHUNK)
    buf_x = torch.empty(1, size, dtype=dtype, device=a.device)
    buf_y = torch.empty(1, size, dtype=dtype, device=a.device)
    fa, fb = a.reshape(1, -1), b.reshape(1, -1)
    for start in range(0, n, _SLERP_CHUNK):
        stop = min(n, start + _SLERP_CHUNK)
        x, y = buf_x[:, : stop - start], buf_y[:, : stop - start]
        x.copy_(fa[:, start:stop])
        y.copy_(fb[:, start:stop])
        yield start, stop, x, y


def slerp_coefficients(base: Tensor, model: Tensor, t: float) -> tuple[float, float]:
    """The coefficients ``(c_base, c_model)`` of :func:`slerp`: ``slerp(base, model, t) = c_base * base +
    c_model * model`` (exact floats of the compute dtype; a streaming caller can apply them slice by slice)."""
    t = _check_t(t)
    dtype = check_tensors([base, model], "tensors")
    tt = torch.tensor(t, dtype=dtype, device=base.device).reshape(1, 1)
    if base.numel() == 0:
        return float(1 - tt), float(tt)
    norm_a_parts, norm_b_parts = [], []
    for _, _, x, y in _slerp_chunks(base, model, dtype):
        norm_a_parts.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norm_b_parts.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norm_a_parts), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norm_b_parts), dim=0)
    norm_a = torch.where(norm_a > _SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _SLERP_EPS, norm_b, 1)
    dot_parts = []
    for _, _, x, y in _slerp_chunks(base, model, dtype):
        dot_parts.append(x.div_(norm_a).mul_(y.div_(norm_b)).sum(dim=1, keepdim=True))
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > _SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return float(coef_a), float(coef_b)


def slerp(base: Tensor, model: Tensor, t: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """Spherical linear interpolation of two *model* tensors (Shoemake 1985; mergekit's ``slerp``), returning
    the interpolated tensor itself (not a delta) in the compute dtype.

    Over the whole flattened tensors ``a = base``, ``b = model``: norms ``|a|``, ``|b|`` (a norm ``<= 1e-8``
    is replaced by 1), ``dot = clamp(<a/|a|, b/|b|>, -1, 1)``; if ``|dot| > 0.9995`` the result is the linear
    ``(1 - t) a + t b``, else with ``theta = acos(dot)``: ``sin((1 - t) theta) / sin(theta) * a +
    sin(t theta) / sin(theta) * b`` (the coefficients apply to the *unnormalised* tensors). ``t = 0`` gives
    `base`, ``t = 1`` gives `model`, bit for bit. `t` must be in [0, 1] (MergeConfigError naming ``t``).

    Bit-identical to mergekit 0.1.5's ``slerp`` for one output tensor: the same float ops, with its norms and
    dot accumulated over chunks of 2**20 elements (mergekit batching B same-shape tensors uses chunks of
    ``2**20 // B``, which can move the norms by an ulp). Needs the base tensor, so it cannot run inside ATM
    rounds on deltas alone; it is not a sum of per-task terms. See :func:`slerp_coefficients`.

    `out_dtype` (default: the compute dtype) is the result's dtype: each chunk is computed in the compute dtype
    and then cast, so ``slerp(a, b, t, out_dtype=d)`` equals ``slerp(a, b, t).to(d)`` bit for bit with no
    whole-tensor float32 copy of the inputs or of the result (the engine passes the output dtype).
    """
    c_a, c_b = slerp_coefficients(base, model, t)
    dtype = compute_dtype([base, model])
    out = torch.empty(base.numel(), dtype=out_dtype or dtype, device=base.device).reshape(1, -1)
    for start, stop, x, y in _slerp_chunks(base, model, dtype):
        out[:, start:stop] = x.mul_(c_a).add_(y.mul_(c_b))
    return out.view(base.shape)
