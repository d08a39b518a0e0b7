"""The ServerApp of federated ATM: build the model, run the rounds, write ATMTrainer's outputs.

It runs :class:`~hf_atm.federated.strategy.ATMStrategy` over the Grid and writes into ``output_dir``: ``history.json``, ``accuracy.png`` /
``cosine.png``, a Hub-ready model folder (the MultiTaskModel as transformers saves it: ``config.json`` and
``model.safetensors`` with backbone and heads; tokenizer, ``README.md`` model card, ``atm_config.json``) plus
``federated_config.json``, and the ``checkpoint-round-*`` folders a restarted server resumes from.

``run_status.json`` (written atomically at start, after every recorded round, at the end and on failure) says
how the run stands: ``{"status": "running" | "completed" | "failed" | "interrupted", "time": UTC of the write,
"round": last round recorded, "rounds", "error": ...}``. ``"interrupted"``: a BaseException that is not an
Exception (KeyboardInterrupt, SystemExit) ended the ServerApp. A process killed outright (SIGKILL, the
machine lost) writes nothing more: its file stays ``"running"`` with the ``time`` of its last round, so a
``"running"`` whose ``time`` is older than a round takes means the ServerApp was killed; Flower's own record,
``flwr list --run-id <id> --format json``, is the authority. A failing run also raises out of the ServerApp,
so Flower marks it failed (``flwr list`` shows ``finished:failed``; the ``flwr-serverapp`` process exits
non-zero).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hf_atm.atm.card import RunSummary, atm_model_card, atm_options_record
from hf_atm.atm.history import mean_score
from hf_atm.federated.config import FederatedATMConfig
from hf_atm.federated.data import load_processing_class
from hf_atm.federated.strategy import ATMStrategy, saved_model_option
from hf_atm.files import atomic_write_dir, atomic_write_json

__all__ = ["RUN_STATUS_FILE", "app", "log_to_console", "make_server_app", "run_federated", "save_final_model",
           "write_run_status"]

log = logging.getLogger("hf_atm.federated")

#: how the run stands, in ``output_dir`` (see the module docstring)
RUN_STATUS_FILE = "run_status.json"


def write_run_status(output_dir: str | os.PathLike, status: str, **fields: Any) -> Path:
    """Write ``run_status.json`` into `output_dir` atomically: `status`, the time (UTC, ISO 8601) and `fields`."""
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_json(Path(output_dir) / RUN_STATUS_FILE, record, indent=2)


def log_to_console(level: int = logging.INFO) -> None:
    """Make the ``hf_atm.federated`` log lines visible where Flower shows a ServerApp's output.

    ``flwr-serverapp`` forwards what the process writes to stdout / stderr to ``flwr run --stream`` /
    ``flwr log``, and configures only Flower's own ``flwr`` logger: without a handler, Python would print
    only warnings of ours. So, unless the application configured logging itself (a handler on the root or on
    our logger), a stderr handler at `level` is added, once."""
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s : %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def _card_text(strategy: ATMStrategy) -> str:
    """ATMTrainer's model card, plus a section on the federated run."""
    summary = RunSummary.of_run(strategy.args, strategy.model, tasks=list(strategy.tasks), history=strategy.history,
                                best_round=strategy.best_round, test_metrics=strategy.test_metrics,
                                reference_accuracies=strategy.cfg.reference_accuracies)
    card = atm_model_card(summary)
    cfg = strategy.cfg
    last = strategy.history[-1] if strategy.history else {}
    missing = [(h["round"], h["missing_train"]) for h in strategy.history if h.get("missing_train")]
    down = sum(h["bytes_total"]["down"] for h in strategy.history)
    up = sum(h["bytes_total"]["up"] for h in strategy.history)
    lines = [
        "",
        "## Federated training",
        "",
        f"Trained with [Flower](https://flower.ai) across {len(strategy.tasks)} data silos (one task per node; "
        "no training example left its node). Each round the nodes fine-tuned their task from the global "
        f"backbone and the server merged the task vectors (`{strategy.args.merge_method}`, weighting "
        f"`{cfg.weighting}`, at least {cfg.min_clients} node(s) per round).",
        "",
        f"- secure aggregation (SecAgg+): {'yes, the server saw only the sum of the task vectors' if cfg.secure_aggregation else 'no'}",
        f"- compression: uplink `{cfg.uplink}`, downlink `{cfg.downlink}`",
        f"- traffic over {last.get('round', 0)} round(s): {down / 1e6:.2f} MB down, {up / 1e6:.2f} MB up",
        f"- rounds with missing nodes: {missing if missing else 'none'}",
        "",
    ]
    return card.content.rstrip("\n") + "\n" + "\n".join(lines)


def save_final_model(strategy: ATMStrategy, folder: str | Path | None = None) -> Path:
    """Write the Hub-ready result of `strategy` into `folder` (default ``output_dir``): model files, history,
    plots, model card, ``atm_config.json`` and ``federated_config.json``; written to a temporary folder and
    moved into place (``hf_atm.files.atomic_write_dir``)."""
    from hf_atm.atm.history import plot_history, write_history

    def write(tmp: Path) -> None:
        strategy.model.write_files(tmp, strategy.processing_class)
        write_history(strategy.history, tmp)
        plot_history(strategy.history, tmp)
        (tmp / "README.md").write_text(_card_text(strategy))
        (tmp / "atm_config.json").write_text(json.dumps(atm_options_record(strategy.args), indent=2) + "\n")
        cfg = {k: v for k, v in strategy.cfg.to_dict().items() if not k.startswith("hub_")}
        # no absolute local path in the saved files: the model as :func:`saved_model_option` records it, and
        # the output folder is the folder of this file
        cfg["model"] = saved_model_option(strategy.cfg.model, strategy.cfg.output_dir)
        cfg["output_dir"] = "."
        (tmp / "federated_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        if strategy.test_metrics:
            (tmp / "test_metrics.json").write_text(json.dumps(strategy.test_metrics, indent=2) + "\n")

    return atomic_write_dir(folder or strategy.cfg.output_dir, write)


def run_federated(grid: Grid, config: FederatedATMConfig) -> ATMStrategy:
    """Run federated ATM over `grid` (the ServerApp's main): build the model once the nodes said which tasks
    they hold, run or resume the rounds, save the final model (and push it when asked)."""
    from hf_atm.atm import MultiTaskModel

    def factory(tasks: dict[str, list[str]]) -> Any:
        return MultiTaskModel.from_backbone(config.model, tasks, pooling=config.pooling, seed=config.head_seed)

    def running(entry: dict[str, Any]) -> None:  # staleness shows: a killed run stops rewriting it
        write_run_status(config.output_dir, "running", round=entry["round"], rounds=config.rounds,
                         resume=bool(config.resume))

    # written first, so that a run failing while it loads the backbone never leaves an earlier run's status
    write_run_status(config.output_dir, "running", round=None, rounds=config.rounds, resume=bool(config.resume))
    strategy: ATMStrategy | None = None
    try:
        if not config.model:
            raise ValueError("model: give the backbone to start from (a local folder or a Hub repo id)")
        strategy = ATMStrategy(config, factory, processing_class=load_processing_class(config.model),
                               on_record=running)
        strategy.run(grid)
        save_final_model(strategy)
        if config.push_to_hub:
            import tempfile

            from hf_atm.hub.push import push_folder

            repo_id = config.hub_model_id or Path(config.output_dir).absolute().name
            with tempfile.TemporaryDirectory(prefix="hf_atm_push_") as tmp:
                folder = save_final_model(strategy, Path(tmp) / "model")
                push_folder(folder, repo_id, private=bool(config.hub_private_repo), commit_message="federated ATM")
    except BaseException as e:  # recorded, then raised on: Flower marks the run failed
        status = "failed" if isinstance(e, Exception) else "interrupted"
        last = strategy.history[-1]["round"] if strategy is not None and strategy.history else None
        log.error("federated ATM %s after round %s: %s: %s", status, last, type(e).__name__, e)
        write_run_status(config.output_dir, status, error=f"{type(e).__name__}: {e}", round=last,
                         rounds=config.rounds)
        raise
    # no path in the file: it lives in output_dir, next to the model it reports
    write_run_status(config.output_dir, "completed", round=strategy.history[-1]["round"], rounds=config.rounds)
    return strategy


def make_server_app(config: FederatedATMConfig | None = None) -> ServerApp:
    """A ServerApp running federated ATM. `config` None: read it from ``context.run_config`` (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        log_to_console()
        try:
            cfg = config if config is not None else FederatedATMConfig.from_run_config(context.run_config)
        except Exception as e:  # a bad -c value: say so in run_status.json too, when output-dir can be read
            out = context.run_config.get("output-dir")
            if isinstance(out, str) and out:
                write_run_status(out, "failed", error=f"{type(e).__name__}: {e}", round=None, rounds=None)
            raise
        strategy = run_federated(grid, cfg)
        last = strategy.history[-1]
        log.info("federated ATM finished: round %d, mean accuracy %.4f, output in %s", last["round"],
                 mean_score(last), cfg.output_dir)

    return app


#: the ServerApp for ``flwr run`` (configuration from the run config).
app = make_server_app()
