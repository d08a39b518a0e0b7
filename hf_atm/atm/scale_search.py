"""``ATMConfig(merge_scale="auto")``: each ATM round's merge scale lambda chosen by a line search on a slice of
the round split.

The round's collector merges the task vectors at the reference scale ``s_ref`` (the method's default scale,
:func:`hf_atm.atm.rounds.default_merge_scale`, which is what ``ATMConfig.resolved_merge_scale`` gives for
"auto"), returning ``delta``. Candidate ``lambda`` puts the backbone at
``theta_round_start + (lambda / s_ref) * delta`` (:class:`ScaledDelta` through
:func:`hf_atm.atm.rounds.apply_delta_`, one tensor at a time, so no full-size copy beyond the round-start
snapshot the round already holds). Each candidate is scored by the mean over tasks of the model's own loss
(the trainer's ``compute_loss``: cross entropy, label-smoothed as in training, or MSE) on the first
``merge_scale_search_examples`` examples of each task's round split (``validation``; ``validation_select`` in
PH mode); the lowest mean loss wins, ties go to the smaller scale, a NaN loss never wins. Cost per round:
``candidates x tasks x examples`` forward passes (in eval batches), on top of the round.

Several processes: each rank scores its own evaluation tasks (``exchange.my_eval_tasks()``), the per-task loss
sums are summed over ranks, rank 0 picks the candidate and broadcasts its index, so every rank applies the
same scale. An FSDP-sharded backbone is refused (its forward is a collective this search does not drive).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from hf_atm.atm.rounds import apply_delta_, merge_threads

__all__ = [
    "DEFAULT_MULTIPLES",
    "ScaleSearch",
    "ScaledDelta",
    "candidate_scales",
    "line_search_",
    "pick_candidate",
    "search_merge_scale_",
    "slice_losses",
]

#: the default candidates of ``merge_scale="auto"``: these multiples of the method's default scale.
DEFAULT_MULTIPLES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)

_REFUSED_SHARDED = ("merge_scale='auto' does not run with an FSDP-sharded backbone: the forward passes of the "
                    "search are collectives it does not drive; set merge_scale to a number")


def candidate_scales(reference: float, given: Sequence[float] | None = None) -> list[float]:
    """The scales a search tries, ascending and distinct: `given` (absolute scales), else
    :data:`DEFAULT_MULTIPLES` times `reference` (the method's default scale)."""
    values = [float(v) for v in given] if given is not None else [m * float(reference) for m in DEFAULT_MULTIPLES]
    return sorted(set(values))


class ScaledDelta(Mapping):
    """``{name: factor * delta[name]}`` computed lazily, a new tensor (in the delta's dtype and device) per read;
    ``factor == 1`` gives `delta`'s own tensors, so that candidate's weights are bit-identical to applying
    `delta` itself (a fixed-scale run at the reference scale)."""

    def __init__(self, delta: Mapping[str, torch.Tensor], factor: float) -> None:
        self.delta = delta
        self.factor = float(factor)

    def __getitem__(self, name: str) -> torch.Tensor:
        d = self.delta[name]
        return d if self.factor == 1.0 else d * self.factor

    def __iter__(self) -> Iterator[str]:
        return iter(self.delta)

    def __len__(self) -> int:
        return len(self.delta)


def pick_candidate(losses: Sequence[float]) -> int:
    """Index of the lowest of `losses` (one per candidate, candidates in ascending scale order): the first
    (smallest scale) on ties; NaN never wins; 0 (the smallest scale) when every loss is NaN."""
    best = 0
    for i, loss in enumerate(losses):
        if not math.isnan(loss) and (math.isnan(losses[best]) or loss < losses[best]):
            best = i
    return best


@dataclass
class ScaleSearch:
    """One round's search.

    Attributes:
        scale: the chosen merge scale (absolute).
        losses: ``{str(scale): mean over tasks of the slice loss}`` of every candidate, ascending scales.
        seconds: time of the search on this process (applying candidates and their forward passes).
    """

    scale: float
    losses: dict[str, float]
    seconds: float

    def record(self, seconds: float | None = None) -> dict[str, Any]:
        """The history fields of the search: ``merge_scale``, ``scale_search`` and ``scale_search_seconds``
        (`seconds` when given, e.g. the maximum over processes, else :attr:`seconds`)."""
        return {"merge_scale": self.scale, "scale_search": dict(self.losses),
                "scale_search_seconds": self.seconds if seconds is None else float(seconds)}


@torch.no_grad()
def slice_losses(
    model: Any,
    tasks: Sequence[str],
    slices: Mapping[str, Any],
    batches: Callable[[Any], Iterable[dict[str, Any]]],
    loss_fn: Callable[[Any, dict[str, Any]], torch.Tensor],
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """``(len(tasks), 2)`` float64 CPU tensor: per task of `tasks`, the summed loss over the examples of
    ``slices[task]`` and their count (zeros for tasks not in `slices`, another process's). Each batch of
    ``batches(dataset)`` is moved by `prepare`, given ``task`` and scored by ``loss_fn(model, inputs)`` (a
    per-batch mean, weighted here by the batch's rows), under `autocast`, with `model` in eval mode (its mode
    restored after)."""
    out = torch.zeros(len(tasks), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for j, task in enumerate(tasks):
            if task not in slices:
                continue
            for batch in batches(slices[task]):
                inputs = {**prepare(batch), "task": task}
                rows = int(inputs["labels"].shape[0])
                with autocast():
                    loss = loss_fn(model, inputs)
                out[j, 0] += float(loss.detach().double()) * rows
                out[j, 1] += rows
    finally:
        model.train(was_training)
    return out


def line_search_(
    tensors: Mapping[str, torch.Tensor],
    theta: Mapping[str, torch.Tensor] | None,
    delta: Mapping[str, torch.Tensor],
    *,
    reference: float,
    scales: Sequence[float],
    objective: Callable[[], torch.Tensor],
    exchange: Any,
    device: torch.device | str,
) -> ScaleSearch:
    """Try every scale of `scales` (ascending) and leave `tensors` at the winner, in place:
    ``theta + (scale / reference) * delta``, rounded once to each tensor's dtype (:func:`apply_delta_`;
    names absent from `delta` reset to `theta`). `theta` None (LoRA rounds: `tensors` still hold the round's
    start) snapshots just the tensors `delta` changes (the adapters' targets) and restores them from it.
    ``objective()`` gives the :func:`slice_losses` tensor of the current weights on this process; the sums
    are added over processes (`exchange`, a :class:`~hf_atm.atm.exchange.TaskExchange`), each task's mean is
    averaged over tasks, rank 0 picks (:func:`pick_candidate`) and broadcasts the index. A collective: call it
    on every rank. `device` sets :func:`merge_threads` for applying the candidates."""
    if exchange.sharded:
        raise ValueError(_REFUSED_SHARDED)
    t0 = time.perf_counter()
    if theta is None:
        tensors = {n: tensors[n] for n in delta}
        theta = {n: t.detach().clone() for n, t in tensors.items()}
    factors = [float(s) / float(reference) for s in scales]
    sums = []
    for f in factors:
        with merge_threads(torch.device(device)):
            apply_delta_(tensors, theta, ScaledDelta(delta, f))
        sums.append(objective())  # forward passes outside merge_threads: the thread count of evaluation
    total = exchange.all_reduce_sum(torch.stack(sums))  # (candidates, tasks, [loss sum, examples])
    per_task = total[..., 0] / total[..., 1]  # NaN for a task without examples: its candidate never wins
    losses = [float(x) for x in per_task.mean(dim=1)]
    index = torch.tensor([pick_candidate(losses) if exchange.rank == 0 else 0], dtype=torch.int64)
    exchange.broadcast_(index, src=0)
    i = int(index.item())
    with merge_threads(torch.device(device)):
        apply_delta_(tensors, theta, ScaledDelta(delta, factors[i]))
    return ScaleSearch(scale=float(scales[i]), losses={str(float(s)): v for s, v in zip(scales, losses)},
                       seconds=time.perf_counter() - t0)


def search_merge_scale_(
    trainer: Any,
    tensors: Mapping[str, torch.Tensor],
    theta: Mapping[str, torch.Tensor] | None,
    delta: Mapping[str, torch.Tensor],
    *,
    batches: Callable[[Any], Iterable[dict[str, Any]]],
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
) -> ScaleSearch:
    """:func:`line_search_` for one round of an :class:`~hf_atm.atm.trainer.ATMTrainer` (its public face:
    ``args``, ``model``, ``task_names``, ``task_data``, ``round_split``, ``exchange``, ``merge_spec_`` (built at
    the reference scale), ``compute_loss``, ``autocast_smart_context_manager``); `batches` makes the
    evaluation batches of a dataset and `prepare` moves a batch to the device (the trainer's own)."""
    args, n = trainer.args, len(trainer.task_names)
    k = int(args.merge_scale_search_examples)
    slices = {}
    for task in trainer.exchange.my_eval_tasks():
        ds = trainer.task_data[task][trainer.round_split]
        slices[task] = ds.select(range(min(k, len(ds))))
    objective = partial(slice_losses, trainer.model, trainer.task_names, slices, batches, trainer.compute_loss,
                        prepare, trainer.autocast_smart_context_manager)
    return line_search_(tensors, theta, delta, reference=trainer.merge_spec_.scale,
                        scales=args.merge_scale_search(n), objective=objective, exchange=trainer.exchange,
                        device=args.device)
