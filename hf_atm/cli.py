"""The ``hf-atm`` console script: one argparse subcommand per task (``hf-atm merge ...``).

Errors in the user's input (:class:`hf_atm.errors.HfAtmError`) print ``error: <message>`` on stderr and
exit with status 2, as argparse's own usage errors do. New subcommands register a ``add_<name>_parser``
function in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hf_atm.errors import HfAtmError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

def add_merge_parser(sub: Any) -> None:
    """``hf-atm merge``: every option defaults to 'not given' so that, with --config, only flags override."""
    from hf_atm.merging.registry import METHODS, methods_help

    p = sub.add_parser(
        "merge",
        help="merge checkpoints tensor by tensor (streaming, sharded safetensors out)",
        description=(
            "Merge models into a base, tensor by tensor: tau_i = M_i - BASE, result = BASE + "
            "scale * combine(tau_1..tau_n) (average: the weighted mean of the models). Options may come "
            "from a YAML file (--config: OUT_DIR/merge_config.yaml of an earlier merge, or a mergekit YAML); "
            "flags given with it override its values. Per-model values, layer gradients and name filters are "
            "given in the YAML."
        ),
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="YAML", help="read the options from this YAML file")
    p.add_argument("--base", metavar="BASE", help="base model: local folder or Hub repo id[@revision] (default for "
                   "LoRA adapters: the base their adapter_config.json names)")
    p.add_argument("--models", metavar="M", nargs="+", help="models to merge: local folders or Hub repo ids")
    p.add_argument("--method", metavar="METHOD", help=f"merge method: {', '.join(METHODS)} (see below)")
    p.add_argument("--output", metavar="OUT_DIR", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--weights", metavar="W", nargs="+", type=float, help="one weight per model (default 1)")
    p.add_argument("--scale", metavar="LAMBDA", type=float, help="scale of the combined task vectors (default 1)")
    p.add_argument("--density", metavar="D", type=float,
                   help="kept fraction in (0, 1] (ties 0.2, dare_* 0.5, della* 0.5, breadcrumbs* 0.9 by default)")
    p.add_argument("--gamma", metavar="G", type=float, help="dropped top fraction (breadcrumbs*, default 0.01)")
    p.add_argument("--epsilon", metavar="E", type=float,
                   help="DELLA: keep probabilities span density +- epsilon (default 0.15)")
    p.add_argument("--t", metavar="T", type=float, help="SLERP: 0 = the base, 1 = the model (default 0.5)")
    p.add_argument("--seed", metavar="S", type=int, help="seed of DARE's / DELLA's masks (default 0)")
    p.add_argument("--majority-sign", dest="majority_sign_method", choices=["total", "frequency"],
                   help="TIES sign election (default total)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                   help="divide by the sum of the (agreeing) weights, as mergekit's normalize (default off)")
    p.add_argument("--tokenizer-source", metavar="SOURCE",
                   help="base, union or one of --models: the output's tokenizer; embedding and LM-head rows are "
                        "aligned by token (default: the vocabularies must match; the base's tokenizer)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="cast floating tensors of the output (default: keep the base's dtype per tensor)")
    p.add_argument("--max-shard-size", metavar="SIZE", help="largest output shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR once the merge is done")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pytorch_model.bin pickles (torch.load weights_only=True); off by default "
                        "because unpickling can run code")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--threads", metavar="N", type=int,
                   help="worker threads of the merge (default: every core); the result does not depend on it")
    p.add_argument("--device", metavar="DEVICE",
                   help="cpu (default), cuda / cuda:N (each tensor merged on the GPU, bounded GPU memory) or auto "
                        "(cuda when available)")
    p.add_argument("--output-format", choices=["full", "lora"],
                   help="full: a merged model (default); lora: merge LoRA adapters into one LoRA adapter of --rank")
    p.add_argument("--rank", metavar="R", type=int, help="rank of the merged adapter (--output-format lora)")
    from hf_atm.hub.push import add_push_arguments

    add_push_arguments(p)
    p.set_defaults(func=run_merge_command, _parser=p)


def merge_config_from_args(args: argparse.Namespace) -> Any:
    """The MergeConfig of a ``merge`` command line: the YAML of --config, overridden by the flags given.

    When a flag changes the method, the YAML's method options that the new method does not take are dropped.
    """
    from hf_atm.hub.push import PUSH_ARG_DESTS
    from hf_atm.merging.config import MergeConfig, load_yaml_options
    from hf_atm.merging.spec import MergeSpec

    not_config = {"func", "_parser", "command", "config", *PUSH_ARG_DESTS}
    given = {k: v for k, v in vars(args).items() if k not in not_config}
    options: dict[str, Any] = load_yaml_options(args.config) if "config" in vars(args) else {}
    if "method" in given and given["method"] != options.get("method", given["method"]):
        try:
            applicable = set(MergeSpec(method=given["method"]).to_dict()) | {"weights", "seed"}
        except HfAtmError:
            applicable = set()
        spec_keys = {"scale", "density", "gamma", "epsilon", "t", "seed", "majority_sign_method", "normalize"}
        options = {k: v for k, v in options.items() if k not in spec_keys or k in applicable}
    options.update(given)
    if "config" not in vars(args):
        missing = [f"--{k}" for k in ("models", "method", "output") if k not in options]
        if missing:
            raise _UsageError(f"the following arguments are required without --config: {', '.join(missing)}")
    return MergeConfig.from_dict(options)


class _UsageError(Exception):
    """A command-line usage problem found after parsing (reported like argparse's own errors)."""


def run_merge_command(args: argparse.Namespace) -> int:
    """Run ``hf-atm merge`` and print a one-line summary."""
    # A merge runs thousands of short element-wise torch ops; OpenMP workers that spin between ops burn CPU and,
    # on a shared or busy machine, stall every op's barrier (measured: a 4-model BERT-base task_arithmetic merge
    # took 11 s with spinning workers vs 2.7 s without, at load 7 on 2 cores). Only effective before torch
    # loads, which the imports below do when run from the console script; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from hf_atm.lora.merge import run_merge

    fmt, rank = getattr(args, "output_format", None), getattr(args, "rank", None)
    if fmt == "lora" and rank is None and "config" not in vars(args):
        raise _UsageError("--output-format lora needs --rank R")
    if fmt == "full" and rank is not None:
        raise _UsageError("--rank applies only with --output-format lora")
    config = merge_config_from_args(args)
    if config.output_format == "lora":
        from hf_atm.lora.export import merge_adapters_to_lora

        base = config.base
        if base is None:
            from hf_atm.hub.resolve import resolve_model
            from hf_atm.lora.merge import infer_adapter_base

            paths = [resolve_model(m, allow_pickle=config.allow_pickle) for m in config.models]
            base = infer_adapter_base(config.models, paths)
        out = merge_adapters_to_lora(base, config.models, config.spec, config.output, config.rank,
                                     overwrite=config.overwrite, progress=config.progress,
                                     allow_pickle=config.allow_pickle)
        print(f"merged {len(config.models)} adapters into the rank-{config.rank} LoRA adapter {out}")
    else:
        result = run_merge(config)
        out = result.output
        print(
            f"merged {result.num_tensors} tensors into {result.output} "
            f"({result.num_shards} shard{'s' if result.num_shards != 1 else ''}, "
            f"{result.total_bytes / 1e6:.1f} MB) in {result.seconds:.2f} s"
        )
    _push_if_asked(args, out)
    return 0


def _push_if_asked(args: argparse.Namespace, out: os.PathLike | str) -> None:
    """Upload `out` when --push-to-hub was given (merge, export) and print where it went."""
    from hf_atm.hub.push import push_from_args

    url = push_from_args(args, out)
    if url:
        print(f"pushed {out} to {args.push_to_hub}: {url}")


def add_push_parser(sub: Any) -> None:
    """``hf-atm push FOLDER --repo-id REPO_ID``: upload a finished folder."""
    from hf_atm.hub.push import register_push_command

    register_push_command(sub)


def add_export_parser(sub: Any) -> None:
    """``hf-atm export RUN_DIR --task T --output OUT``: one task of a saved multi-task model as a standard model."""
    # No import of hf_atm.atm here: building the parser must not load the trainer stack (--format is checked
    # against hf_atm.atm.export.EXPORT_FORMATS when the command runs).
    from hf_atm.hub.push import add_push_arguments

    p = sub.add_parser(
        "export",
        help="write one task of a saved multi-task model as a standard transformers model folder",
        description=(
            "Write task T of the multi-task model saved in RUN_DIR (a local folder or a Hub repo id[@revision]) "
            "as a model folder that transformers loads, with the task's labels, the tokenizer / processor "
            "saved in RUN_DIR and a model card: a native ViTForImageClassification / "
            "BertForSequenceClassification when it computes the task exactly, a CLIPModel (tuned vision "
            "tower, original text tower) for a CLIP task whose head is still its zero-shot head, else the "
            "package's own class (load it after `from hf_atm import MultiTaskModel`)."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="saved MultiTaskModel: local folder or Hub repo id[@revision]")
    p.add_argument("--task", required=True, metavar="T", help="the task to export")
    p.add_argument("--output", required=True, metavar="OUT", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once the export is written")
    p.add_argument("--format", metavar="FORMAT", default="auto",
                   help="auto: native or CLIPModel when faithful, else the package's class (default; e.g. a CLIP "
                        "task whose head is linear-probe, prototype or trained); native: refuse unless a plain "
                        "transformers class reproduces the task; hf_atm: always the package's class")
    p.add_argument("--clip-source", metavar="CLIP",
                   help="CLIP tasks: the original CLIP (folder or Hub id) whose text tower goes into the export "
                        "(default: the one the model's config names)")
    add_push_arguments(p)
    p.set_defaults(func=run_export_command, _parser=p)


def run_export_command(args: argparse.Namespace) -> int:
    """Run ``hf-atm export``: load RUN_DIR, export the task, print a one-line summary, push when asked."""
    from hf_atm.atm.export import (
        EXPORT_FORMATS,
        check_output,
        check_task,
        export_task,
        load_processing_class,
    )
    from hf_atm.atm.model import MultiTaskModel, saved_tasks
    from hf_atm.hub.card import architectures_of
    from hf_atm.hub.resolve import resolve_model

    if args.format not in EXPORT_FORMATS:
        raise _UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
    folder = resolve_model(args.run_dir)
    # The task and the output are checked from config.json, before any weights load.
    check_task(saved_tasks(folder), args.task)
    check_output(args.output, args.overwrite)
    model = MultiTaskModel.from_pretrained(folder)
    out = export_task(model, args.task, args.output, processing_class=load_processing_class(folder),
                      overwrite=args.overwrite, format=args.format, clip_source=args.clip_source)
    # the class written (a CLIP task under --format auto may have fallen back to the package's class)
    written = architectures_of(out) or ["?"]
    print(f"exported task {args.task!r} of {args.run_dir} to {out} ({written[0]})")
    _push_if_asked(args, out)
    return 0


SUBCOMMANDS: list[Callable[[Any], None]] = [add_merge_parser, add_push_parser, add_export_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-atm`` parser with every registered subcommand."""
    from hf_atm.version import __version__

    parser = argparse.ArgumentParser(prog="hf-atm", description="Model merging and ATM for the Hugging Face ecosystem.")
    parser.add_argument("--version", action="version", version=f"hf-atm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse `argv` (default ``sys.argv[1:]``), run the subcommand, return the exit status.

    0 on success; 2 for usage errors and for HfAtmError (printed as ``error: <message>`` on stderr); 128 + the
    signal's number (130, 143) when SIGINT, or SIGTERM during a merge's writing, interrupts it.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except _UsageError as e:
        sub = getattr(args, "_parser", parser)
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        return 2
    except HfAtmError as e:
        # One line: some messages quote multi-line text from other libraries (huggingface_hub...).
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SIGINT, or hf_atm.merging.output.Interrupted (SIGINT / SIGTERM)
        signum = getattr(e, "signum", signal.SIGINT)
        sub = getattr(args, "_parser", parser)
        print(f"error: {sub.prog} was interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
