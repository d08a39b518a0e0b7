"""TIES' sign election and disjoint mean on one slice of task vectors (steps 2-3 of the TIES family).

:func:`elect_and_mean_slice` is the entry point; :func:`elect_reference` is the definition (masks, ``where``),
:func:`elect_fast` the same bits with element-wise float arithmetic only. Element-wise, so slicing a tensor
never changes a bit of the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hf_atm.merging.conventions import all_finite

__all__ = ["elect_and_mean_slice", "elect_fast", "elect_reference"]


def elect_and_mean_slice(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str,
    normalize: bool | None = None,
) -> Tensor:
    """TIES steps 2-3 on one slice (see :func:`elect_reference` for the definition).

    Without masks it runs :func:`elect_fast` (the same bits with element-wise float arithmetic only); masks, or
    a non-finite entry, take the reference.
    """
    if all(k is None for k in keeps):
        out = elect_fast(values, weights, majority_sign_method, normalize)
        if out is not None:
            return out
    return elect_reference(values, keeps, weights, majority_sign_method, normalize)


def elect_fast(values: Sequence[Tensor], weights: list[float] | None, majority_sign_method: str,
                normalize: bool | None = None) -> Tensor | None:
    """:func:`elect_reference` with no masks, bit for bit, or None when the result has a NaN / Inf.

    The reference's ``where`` / ``==`` / bool steps become exact float arithmetic on signs in {-1, 0, +1}:
    the elected sign ``where(votes >= 0, 1, -1)`` is ``copysign(1, votes + 0)`` (+1 for +-0, as ``-0 >= 0``);
    task i agrees where ``a_i = max(sign(t_i) * s, 0)`` is 1 (else 0, of either sign), so ``where(agree, term,
    0)`` is ``term * a_i`` (exact) and the bool counts are the sums of the ``a_i``. Both sides add the same
    nonzero values in the same order; the extra terms are zeros, which leave a nonzero sum unchanged, so the
    sums agree up to the sign of a zero; the reference's never is -0 (it starts at +0 and only exact
    cancellation reaches zero again: +0), so adding +0 at the end makes them equal bit for bit. A zero's sign
    in `values` never matters (zeros never agree; votes only meet ``>= 0``). That holds for finite terms: an
    Inf / NaN term makes ``term * 0`` NaN here, so a non-finite result is handed back to the reference.
    """
    if normalize is not None and weights is not None:
        weighted = [v * weights[i] for i, v in enumerate(values)]  # mergekit: the vote on w_i t_i
    else:
        weighted = list(values)  # read only: no copy
    signs = [t.sign() for t in weighted]
    src = weighted if majority_sign_method == "total" else signs
    votes = src[0] + src[1] if len(src) > 1 else src[0].clone()
    for term in src[2:]:
        votes.add_(term)
    # where(votes >= 0, 1, -1): -0 made +0 (adding +0 changes nothing else), then its sign put on 1
    elected = torch.ones((), dtype=votes.dtype, device=votes.device).copysign(votes.add_(0.0))
    del votes
    total: Tensor | None = None
    count: Tensor | None = None
    for i, (v, sign) in enumerate(zip(weighted, signs)):
        agree = sign.mul_(elected).clamp_(min=0)  # signs[i]'s buffer, not needed after
        term = v * weights[i] if normalize is None and weights is not None else v
        if total is None:
            total = term * agree
        else:
            total.addcmul_(term, agree)
        if normalize is None:
            count = agree if count is None else count.add_(agree)
        elif normalize:
            w = 1.0 if weights is None else weights[i]
            count = agree.mul_(w) if count is None else count.add_(agree, alpha=w)
    assert total is not None
    total.add_(0.0)  # the reference's sum starts at +0: a -0 here (no agreeing term yet) is +0 there
    if normalize is None:
        assert count is not None
        out = total.div_(count.clamp_(min=1))
    elif normalize:
        assert count is not None
        # where(divisor == 0, 1, divisor): + (1 - sign(|divisor|)) adds 1 to a zero, +0 to anything else
        out = total.div_(count.add_(count.abs().sign_().neg_().add_(1.0)))
    else:
        out = total
    return out if all_finite(out) else None


def elect_reference(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str,
    normalize: bool | None = None,
) -> Tensor:
    """TIES steps 2-3 on one slice, accumulated task by task (element-wise, so slicing never changes a bit).

    ``t_i = values_i`` where ``keeps_i`` (all of it when None), else 0. ``total``: s = sign(sum_i t_i);
    ``frequency``: s = sign(sum_i sign(t_i)); s = +1 where that vote is 0. Task i agrees where
    ``sign(t_i) == s`` (zeros never agree). Result ``sum_i [agree_i] w_i t_i / max(1, #agree)`` (peft).

    `normalize` True / False selects mergekit's convention instead: the vote runs on the weighted ``w_i t_i``, and
    the result is ``sum_i [agree_i] w_i t_i`` divided by ``sum_i [agree_i] w_i`` (True; 1 where that is 0) or
    by nothing (False). With unit weights, True equals peft's.
    """
    if normalize is not None:
        return _elect_weighted_slice(values, keeps, weights, majority_sign_method, normalize)
    zero = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    signs = []
    votes: Tensor | None = None
    for v, keep in zip(values, keeps):
        sign = v.sign() if keep is None else torch.where(keep, v.sign(), zero)
        signs.append(sign)
        if majority_sign_method == "total":
            term = v if keep is None else torch.where(keep, v, zero)
        else:
            term = sign
        votes = term.clone() if votes is None else votes.add_(term)
    assert votes is not None
    elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    del votes
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for i, (v, sign) in enumerate(zip(values, signs)):
        agree = sign == elected
        term = v if weights is None else v * weights[i]
        total.add_(torch.where(agree, term, zero))
        count.add_(agree)
    return total.div_(count.clamp_(min=1))


def _elect_weighted_slice(
    values: Sequence[Tensor], keeps: Sequence[Tensor | None], weights: list[float] | None, majority_sign_method: str,
    normalize: bool,
) -> Tensor:
    """mergekit's consensus (``generalized_task_arithmetic.get_mask``) on one slice: see :func:`elect_and_mean_slice`."""
    zero = torch.zeros((), dtype=values[0].dtype, device=values[0].device)
    weighted = []
    votes: Tensor | None = None
    for i, (v, keep) in enumerate(zip(values, keeps)):
        t = v if keep is None else torch.where(keep, v, zero)
        t = t * weights[i] if weights is not None else t.clone()
        weighted.append(t)
        term = t if majority_sign_method == "total" else t.sign()
        votes = term.clone() if votes is None else votes.add_(term)
    assert votes is not None
    elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    del votes
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected) if normalize else None
    for i, t in enumerate(weighted):
        agree = t.sign() == elected
        total.add_(torch.where(agree, t, zero))
        if divisor is not None:
            divisor.add_(agree, alpha=1.0 if weights is None else weights[i])
    if divisor is None:
        return total
    return total.div_(torch.where(divisor == 0, 1.0, divisor))
