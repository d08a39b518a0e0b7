"""The SVD methods on 2-D tensors: TSV-M (task singular vectors, whitened) and Iso-C (isotropic spectrum)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_atm.merging.conventions import check_tensors, weight_list, weighted_sum

__all__ = ["iso_c", "tsv"]


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
    dtype = check_tensors(task_vectors)
    w = weight_list(weights, len(task_vectors))
    n_tasks = len(task_vectors)
    if task_vectors[0].dim() != 2:
        return weighted_sum(task_vectors, w, dtype).div_(n_tasks)
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
    dtype = check_tensors(task_vectors)
    delta = weighted_sum(task_vectors, weight_list(weights, len(task_vectors)), dtype)
    if delta.dim() != 2:
        return delta.div_(len(task_vectors))
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u * s.mean()) @ vh
