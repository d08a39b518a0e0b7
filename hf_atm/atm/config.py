"""ATMConfig: ``transformers.TrainingArguments`` plus the options of ATM (Alternating Tuning and Merging).

TrainingArguments' own options (learning rate, weight decay, batch size, gradient accumulation,
max_grad_norm, seed, lr_scheduler_type, warmup, optim, logging, report_to, bf16) apply to each per-task
fine-tuning inside a round. ``num_train_epochs`` / ``max_steps`` are not used: the budget is
``rounds x epochs_per_round`` (or ``rounds x steps_per_round`` optimizer steps) per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_atm.errors import MergeConfigError
from hf_atm.merging.registry import METHODS, get_method
from hf_atm.merging.spec import MergeSpec

__all__ = ["ATM_MERGE_METHODS", "ATM_MODES", "ATMConfig"]

#: the merge methods that work on task vectors alone, so inside ATM rounds (all but slerp).
ATM_MERGE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if get_method(m).in_atm)

ATM_MODES = ("pa", "ph")


@dataclass
class ATMConfig(TrainingArguments):
    """Training arguments of an ATM run (see the module docstring and ``docs`` of each field)."""

    atm_mode: str = field(
        default="pa",
        metadata={
            "help": "'pa': from a pre-trained model, rounds fine-tune on each task's train split. 'ph': "
            "post-hoc refinement of an already merged model, rounds fine-tune on the tuning part of each "
            "task's validation split and the best round is chosen on its held-out selection part.",
            "choices": list(ATM_MODES),
        },
    )
    rounds: int = field(default=10, metadata={"help": "Number of ATM rounds (tune every task, then merge)."})
    epochs_per_round: float = field(
        default=1.0, metadata={"help": "Epochs over each task's data per round (fractions allowed)."}
    )
    steps_per_round: int = field(
        default=-1,
        metadata={"help": "If > 0: optimizer steps per task per round, overriding epochs_per_round."},
    )
    merge_method: str = field(
        default="task_arithmetic",
        metadata={"help": "Merge applied to the round's task vectors.", "choices": list(ATM_MERGE_METHODS)},
    )
    merge_scale: float | None = field(
        default=None,
        metadata={
            "help": "lambda multiplying the merged task vector. Default: 1/n for task_arithmetic (the mean of "
            "the task vectors, as the ATM authors ran it), 1.0 for every other method."
        },
    )
    merge_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per task, in sorted task-name order (default: all 1)."}
    )
    merge_density: float | None = field(
        default=None,
        metadata={"help": "Kept fraction in (0, 1] for ties / dare_linear / dare_ties / breadcrumbs."},
    )
    merge_gamma: float | None = field(
        default=None, metadata={"help": "Dropped top fraction in [0, 1) for breadcrumbs."}
    )
    merge_seed: int = field(default=0, metadata={"help": "Seed of DARE's random masks (with tensor and round)."})
    reset_optimizer_each_round: bool = field(
        default=True,
        metadata={
            "help": "Fresh optimizer and LR schedule for every task in every round (as in the paper). If "
            "False, each task keeps one optimizer and one schedule over all rounds (more memory)."
        },
    )
    freeze_heads: bool = field(default=False, metadata={"help": "Do not train the task heads."})
    ph_select_fraction: float = field(
        default=0.2,
        metadata={
            "help": "PH mode: fraction of each task's validation split held out (deterministically, by "
            "seed) to select the best round; the rest is what the rounds train on."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "0: full fine-tuning. > 0: every round tunes a fresh LoRA adapter of this rank per task "
            "(peft) and merges its delta B@A*scaling into the backbone."
        },
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names for LoRA (default: peft's defaults for the architecture)."},
    )
    compute_cosine: bool = field(
        default=True,
        metadata={
            "help": "Record the pairwise cosine similarity of each round's task vectors. It needs every "
            "task vector at once (all_gather across processes); set False to merge sum-decomposable "
            "methods with a single all-reduce and keep only one accumulator in memory."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.atm_mode not in ATM_MODES:
            raise ValueError(f"atm_mode must be one of {', '.join(ATM_MODES)}, got {self.atm_mode!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if self.steps_per_round <= 0 and not self.epochs_per_round > 0:
            raise ValueError(
                f"epochs_per_round must be > 0 (or steps_per_round > 0), got {self.epochs_per_round!r}"
            )
        if not 0.0 < self.ph_select_fraction < 1.0:
            raise ValueError(f"ph_select_fraction must be in (0, 1), got {self.ph_select_fraction!r}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.fp16:
            raise ValueError(
                "fp16: ATM's per-task loop runs without a gradient scaler; use bf16 (or full precision)"
            )
        if self.merge_scale is not None and self.merge_method == "average" and self.merge_scale != 1.0:
            raise MergeConfigError("merge_scale: method 'average' takes no scale; leave it unset")
        if self.merge_method not in ATM_MERGE_METHODS:
            raise MergeConfigError(
                f"merge_method: {self.merge_method!r} cannot merge task vectors inside ATM rounds; "
                f"known: {', '.join(ATM_MERGE_METHODS)}"
            )
        # the task count is known only at train time: validate for the fewest tasks the method takes
        n = len(self.merge_weights) if self.merge_weights is not None else get_method(self.merge_method).min_models
        self.merge_spec(n)  # validates density / gamma / weights / scale, naming the option

    def resolved_merge_scale(self, num_tasks: int) -> float:
        """``merge_scale``, or its default: 1/n for task_arithmetic, 1.0 otherwise."""
        if self.merge_scale is not None:
            return float(self.merge_scale)
        return 1.0 / num_tasks if self.merge_method == "task_arithmetic" else 1.0

    def merge_spec(self, num_tasks: int) -> MergeSpec:
        """The validated MergeSpec of the in-loop merge for `num_tasks` tasks (MergeConfigError naming the
        ``merge_*`` option at fault)."""
        spec = MergeSpec(
            method=self.merge_method,
            weights=tuple(float(w) for w in self.merge_weights) if self.merge_weights is not None else None,
            scale=self.resolved_merge_scale(num_tasks),
            density=self.merge_density,
            gamma=self.merge_gamma,
            seed=int(self.merge_seed),
        )
        try:
            spec.validate(num_tasks)
        except MergeConfigError as e:
            raise MergeConfigError(_rename_options(str(e))) from e
        return spec


_OPTION = re.compile(r"(?<![\w'])(weights|scale|density|gamma|seed|method)(?![\w'])")


def _rename_options(msg: str) -> str:
    """MergeSpec's message with its option names turned into ATMConfig's ``merge_*`` names (in the part of
    the message before the offending value, so quoted values stay as the user wrote them)."""
    cut = min((i for i in (msg.find(" got "), msg.find(": ")) if i >= 0), default=len(msg))
    return _OPTION.sub(r"merge_\1", msg[:cut]) + msg[cut:]
