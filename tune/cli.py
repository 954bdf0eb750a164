"""`python -m tune`: search hidden size, layers, learning rate and the loss weight with Optuna + ASHA.

    python -m tune --preset smoke --num-samples 4            # a quick local search
    python -m tune --preset paper --num-samples 64 --num-workers-per-trial 1 --use-gpu \\
        --output-dir s3://bucket/searches --time-budget 36000
    python -m tune --space my_space.yaml                    # another search space
    python -m tune --name my-search --resume                # continue an interrupted search
    python -m tune --mlflow-tracking-uri file:mlruns        # also one MLflow run per trial
    python -m tune --metric val_mse_frame --metric val_ink_ssim # two objectives: the Pareto front

Config flags (`--max-steps`, `--batch-size`, ...) set the base config every trial starts
from; the search space overrides its fields. At the end the experiment folder holds
results.csv / results.md (one row per trial, best first) and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lstm_ae.config import (
    DEFAULT_PRESET,
    PRESETS,
    ConfigError,
    add_config_arguments,
    config_from_arguments,
    config_overrides,
)
from lstm_ae.data import DataError
from lstm_ae.pareto import rule_text
from lstm_ae.tables import to_markdown
from records.folder_lock import FolderLockedError, locked
from records.layout import ABLATIONS_CSV, ABLATIONS_MD, SEARCH_FILE
from records.run_folder import RunFolderError, check_resumed_flags, continue_line, folder_flags
from records.storage import path_exists, storage_path
from train.commandline import (
    OneLineParser,
    add_address_argument,
    add_settings_arguments,
    check_scaling_arguments,
    check_split,
    fail,
    root_cause,
    run_until_interrupted,
    settings_values,
)
from train.tracking import add_mlflow_arguments, mlflow_settings
from tune.ablations import VARIANTS, final_metrics, run_ablations, write_ablations
from tune.experiment import (
    SearchSettings,
    experiment_path,
    saved_experiment,
)
from tune.mlflow_trials import trial_mlflow_callback
from tune.objectives import Objectives, from_record, is_multi, objectives_from_flags
from tune.objectives import describe as describe_objectives
from tune.results import front_columns, train_best_line, trial_rows, write_results
from tune.space import SpaceError, default_space, load_space


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m tune",
        description="Hyperparameter search over the composite LSTM autoencoder (Ray Tune, Optuna TPE, ASHA).",
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default=DEFAULT_PRESET, help="base configuration")
    parser.add_argument(
        "--experiment",
        choices=("search", "ablations"),
        default="search",
        help="'search' (Optuna + ASHA over the space) or 'ablations' (the paper's variants x seeds, a grid)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (ablations)")
    add_settings_arguments(parser, SearchSettings)
    parser.add_argument("--space", type=Path, default=None, help="search space YAML (see tune/space.py)")
    parser.add_argument(
        "--base-first",
        action="store_true",
        help="run the base config's own values of the searched fields as the first trial "
        "(the table then shows what the search improves on)",
    )
    parser.add_argument("--output-dir", default="runs", help="local folder or s3:// URI holding experiments")
    parser.add_argument(
        "--name", default=None, help="experiment name (default lstm-ae-<experiment>-<preset>-<time>)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the experiment --name")
    add_address_argument(parser)
    add_mlflow_arguments(parser, "the experiment's --name")
    parser.add_argument(
        "--mode",
        action="append",
        choices=("min", "max"),
        default=None,
        help="with --metric: minimise or maximise it, once per --metric in the same order "
        "(default: errors minimised; SSIM, PSNR and probe accuracy maximised)",
    )
    add_config_arguments(parser, repeatable=("metric",))
    return parser


def take_objectives(arguments: argparse.Namespace) -> Objectives:
    """The search's objectives from repeated --metric/--mode; leaves `arguments.metric` the first
    metric (the config field) or None. Two metrics search the Pareto front (tune/objectives.py)."""
    objectives = objectives_from_flags(arguments.metric, arguments.mode)
    arguments.metric = objectives[0][0] if objectives else None
    if is_multi(objectives) and arguments.experiment != "search":
        raise ConfigError("two --metric flags apply to searches; the ablation grid ranks one metric")
    return objectives if is_multi(objectives) else ()


def check_positive(arguments: argparse.Namespace) -> None:
    for name, option in (("num_samples", "--num-samples"), ("num_workers_per_trial", "--num-workers-per-trial"),
                         ("grace_period", "--grace-period"), ("reduction_factor", "--reduction-factor"),
                         ("seeds", "--seeds")):  # fmt: skip
        value = getattr(arguments, name)
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    if arguments.max_concurrent is not None and arguments.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {arguments.max_concurrent}")
    if arguments.max_failures < -1:
        raise ConfigError(f"--max-failures must be 0 or more (-1: no limit), got {arguments.max_failures}")
    if arguments.time_budget is not None and arguments.time_budget <= 0:
        raise ConfigError(f"--time-budget must be positive, got {arguments.time_budget}")
    if arguments.experiment == "ablations" and arguments.space is not None:
        raise ConfigError(
            "--space applies to searches; the ablation grid's variants are fixed (tune/ablations.py)"
        )


def resumed_experiment(arguments: argparse.Namespace, record: dict) -> tuple:
    """(base, space, seeds) of the experiment being resumed, from its search.json.

    A resumed experiment keeps what it was started with (`records.run_folder.check_resumed_flags`,
    the rule `train --resume` follows too): config flags and a --space equal to the saved ones
    are accepted, others refused rather than silently mixed in, and so is a different
    --experiment.
    """
    check_resumed_flags(config_overrides(arguments), record["base"].values_by_field(), "experiment")
    kind = "search" if "space" in record else "ablations"
    if arguments.experiment != kind:
        raise ConfigError(f"experiment {arguments.name!r} is {kind}: resume it with --experiment {kind}")
    if arguments.space is not None and load_space(arguments.space) != record.get("space"):
        raise ConfigError(
            f"--resume keeps the experiment's saved search space; --space {arguments.space} differs from it: drop it"
        )
    seeds = record.get("seeds", arguments.seeds)
    return record["base"], record.get("space"), seeds


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    name = (
        arguments.name
        or f"lstm-ae-{arguments.experiment}-{arguments.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return run_until_interrupted(
        lambda held, interrupted: run_command(arguments, name, held, interrupted),
        f"{arguments.experiment} {name}",
        lambda: experiment_continue_line(arguments, name),
    )


def experiment_continue_line(arguments: argparse.Namespace, name: str) -> str:
    """How to go on with an interrupted experiment: restore it once Tune saved its state."""
    filesystem, path = experiment_path(SearchSettings(name=name, storage=arguments.output_dir))
    flags = folder_flags(name, arguments.output_dir)
    if arguments.experiment != "search":
        flags += f" --experiment {arguments.experiment}"
    started = path_exists(filesystem, f"{path}/{SEARCH_FILE}")
    return continue_line("tune", flags, started, "it had not started yet")


def run_command(arguments: argparse.Namespace, name: str, held: contextlib.ExitStack, interrupted) -> int:
    """Check everything, lock the experiment folder (held until `held` closes), then run."""
    record = None
    try:
        objectives = take_objectives(arguments)
        if arguments.resume and arguments.name is None:
            raise ConfigError("--resume needs the --name of the experiment to continue")
        check_positive(arguments)
        check_scaling_arguments(arguments)
        mlflow = mlflow_settings(arguments, name)
        if not arguments.resume:  # a new experiment's flags are checked before its folder exists
            base, space = new_experiment(arguments)
        filesystem, path = experiment_path(SearchSettings(name=name, storage=arguments.output_dir))
        held.enter_context(locked(filesystem, path, "experiment folder"))
        if arguments.resume:
            record = saved_experiment(SearchSettings(name=name, storage=arguments.output_dir))
            if record is not None:
                base, space, arguments.seeds = resumed_experiment(arguments, record)
                objectives = from_record(record)
            else:
                base, space = new_experiment(arguments)  # the driver says there is nothing to resume
        first = [space.base_point(base)] if arguments.base_first and space is not None else None
    except (ConfigError, SpaceError, RunFolderError, FolderLockedError) as error:
        fail(str(error))
    settings = SearchSettings(
        name=name,
        storage=arguments.output_dir,
        resume=arguments.resume,
        address=arguments.address,
        **settings_values(arguments, SearchSettings),
        objectives=objectives,
    )
    if arguments.experiment == "ablations":
        print(
            f"ablations {name}: {len(VARIANTS)} variants x {arguments.seeds} seeds of preset {arguments.preset}"
        )
        print("\n".join(f"  {variant.label}" for variant in VARIANTS.values()), flush=True)
    else:
        print(
            f"experiment {name}: {arguments.num_samples} trials of preset {arguments.preset}, metric {base.training.metric}"
        )
        if objectives:
            print(describe_objectives(objectives))
        print(f"search space:\n{space.describe()}", flush=True)
    # One MLflow run per trial (a resumed experiment keeps the callbacks it was started with).
    callbacks = [trial_mlflow_callback(mlflow, base, name, settings.storage)] if mlflow else []
    try:
        if arguments.experiment == "ablations":
            summary = ablations_and_tabulate(base, arguments.seeds, settings, callbacks, interrupted)
        else:
            summary = search_and_tabulate(base, space, settings, callbacks, first, interrupted)
    except (RunFolderError, DataError, ConfigError, SpaceError, FolderLockedError) as error:
        fail(str(error))
    except Exception as error:  # Ray errors: one line, not a traceback
        if interrupted():
            raise
        fail(f"search failed: {root_cause(error)}", status=1)
    print(summary)
    return 0


def new_experiment(arguments: argparse.Namespace) -> tuple:
    """(base, space) of a new experiment from the flags, checked."""
    base = config_from_arguments(arguments, arguments.preset)
    space = load_space(arguments.space) if arguments.space else default_space(arguments.preset)
    check_split(base, arguments.num_workers_per_trial)
    if space is not None:
        space.check(base, arguments.num_workers_per_trial)
    return base, space


class Interrupted(KeyboardInterrupt):
    """Tune stopped the experiment on Ctrl-C and returned as if it had ended."""


def search_and_tabulate(
    base, space, settings, callbacks=(), points_to_evaluate=None, interrupted=lambda: False
) -> str:
    """Run the search, write the results table and plots; returns a printable summary.
    `interrupted()` true after Tune returns: the search was stopped by Ctrl-C (Interrupted)."""
    from tune.search import comparison_field, load_study, run_search, stopped_by_scheduler

    results, path, _ = run_search(base, space, settings, callbacks, points_to_evaluate)
    if interrupted():
        raise Interrupted
    metric, objectives = base.training.metric, settings.objectives
    stopped = stopped_by_scheduler(settings)
    clock = comparison_field(base)  # ASHA's clock
    rows, histories = trial_rows(results, space, metric, base.training.max_steps, stopped, clock, objectives)
    folder = local_results_folder(settings)
    written = write_results(folder, rows, histories, space, metric, clock, objectives, load_study(settings))
    publish(folder, written, settings)
    timed = ["training_seconds"] if clock == "training_seconds" else []
    scores = [f"best_{metric}"]
    marks = ["best"]
    if is_multi(objectives):
        marks, scores = ["best", "front"], list(front_columns(objectives))
    shown = [*marks, "trial", "status", *space.names, *scores, "steps", *timed, "wall_seconds"]
    legend = (
        f"front: the Pareto front of {' and '.join(scores)}; best: {rule_text([m for m, _ in objectives])}\n"
        if is_multi(objectives)
        else ""
    )
    return (
        f"\n{to_markdown(rows, shown)}\n{legend}"
        f"results: {folder / 'results.md'} (and {', '.join(written[2:])})" + winner_line(rows, settings)
    )


def ablations_and_tabulate(base, seeds: int, settings, callbacks=(), interrupted=lambda: False) -> str:
    """Run the ablation grid and write its table and plot; returns a printable summary."""
    results, _, _ = run_ablations(base, seeds, settings, callbacks)
    if interrupted():
        raise Interrupted
    folder = local_results_folder(settings)
    markdown = write_ablations(folder, final_metrics(results, base.training.max_steps), seeds)
    publish(folder, [ABLATIONS_CSV, ABLATIONS_MD, "ablations.png"], settings)
    return f"\n{markdown}\nresults: {folder / 'ablations.md'} (and ablations.csv, ablations.png)"


def local_results_folder(settings) -> Path:
    if "://" in settings.storage:
        return Path("runs") / settings.name
    return Path(storage_path(settings.storage)) / settings.name


def winner_line(rows: list[dict], settings) -> str:
    """The line that trains the table's best trial again (`records.sources.train_command`), if any."""
    best = next((row for row in rows if row.get("best")), None)
    experiment = f"{storage_path(settings.storage)}/{settings.name}"
    return "\n" + train_best_line(best, experiment) if best else ""


def publish(folder: Path, names: list[str], settings) -> None:
    """Copy the results next to the experiment when it lives in remote storage."""
    if "://" not in settings.storage:
        return
    filesystem, path = experiment_path(settings)
    for name in names:
        with filesystem.open_output_stream(f"{path}/{name}") as stream:
            stream.write((folder / name).read_bytes())


if __name__ == "__main__":
    sys.exit(main())
