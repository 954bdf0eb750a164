"""`python -m train`: train the composite LSTM autoencoder with Ray Train.

    python -m train                                   # cpu preset, local Ray, embedded data
    python -m train --preset paper --num-workers 8 --use-gpu --output-dir s3://bucket/runs
    python -m train --name my-run --resume            # continue a stopped run
    python -m train --mlflow-tracking-uri file:mlruns  # also log the run to MLflow
    python -m train --from runs/my-search --num-workers 4 --use-gpu   # train a search's best trial
    ray job submit --working-dir . -- python -m train --preset smoke

Every config field is a flag (`--hidden-size 512`, `--learning-rate 3e-4`, ...); the config
is validated before Ray starts, and a bad value exits with status 2 and one line naming it.

`--from PATH` starts from the config of a run folder, a search trial, a search's or ablation
grid's best trial (`--trial ID` another) or a config file instead of a preset (`records/sources.py`);
the flags given override it, and `--init-from-checkpoint` starts from its best checkpoint's
weights (a new run: the optimizer and schedule start anew).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from dataclasses import replace

from lstm_ae.config import (
    DEFAULT_PRESET,
    PRESETS,
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    config_overrides,
)
from lstm_ae.data import DataError
from lstm_ae.metrics import (
    BASELINE_COPY_LAST_INK_SSIM,
    BASELINE_COPY_LAST_MSE_FRAME,
    BASELINE_COPY_LAST_SSIM,
    BASELINE_ZEROS_INK_SSIM,
    BASELINE_ZEROS_MSE_FRAME,
    BASELINE_ZEROS_SSIM,
    VAL_INK_SSIM,
    VAL_MSE_FRAME,
    VAL_SSIM,
)
from records.checkpoints import STORAGE_FULL
from records.run_folder import RESUMABLE_FIELDS, RunFolderError, SavedRun, check_resumed_flags, saved_run
from records.sources import Source, SourceError, check_initial_weights, read_source, source_label
from train.commandline import (
    OneLineParser,
    add_scaling_arguments,
    add_settings_arguments,
    check_scaling_arguments,
    check_split,
    fail,
    root_cause,
    run_until_interrupted,
    settings_values,
)
from train.driver import (
    RunSettings,
    Scaling,
    default_run_name,
    lock_run_folder,
    run_continue_line,
    run_training,
)
from train.tracking import add_mlflow_arguments, mlflow_settings

MLFLOW_EXPERIMENT = "lstm-ae"  # the MLflow experiment of train runs, unless --mlflow-experiment


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m train",
        description="Train the composite LSTM video autoencoder (Srivastava et al. 2015) with Ray Train.",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help=f"starting configuration (default {DEFAULT_PRESET}: 8 minutes of training, about 10 on 2 CPU cores)",
    )
    parser.add_argument(
        "--from",
        dest="from_path",
        metavar="PATH",
        default=None,
        help="start from this config instead of a preset: a run folder, a search trial's folder, a search "
        "or ablation folder (its best trial) or a config file (JSON or YAML); local or a URI such as s3://",
    )
    parser.add_argument(
        "--trial", default=None, metavar="ID", help="with --from a search: this trial, not the best"
    )
    parser.add_argument(
        "--init-from-checkpoint",
        action="store_true",
        help="with --from: start from the weights of its best checkpoint (a new run: optimizer and schedule anew)",
    )
    add_scaling_arguments(parser, Scaling)
    parser.add_argument("--output-dir", default="runs", help="local folder or s3:// URI holding run folders")
    parser.add_argument(
        "--name",
        default=None,
        help="run name (default lstm-ae-<preset>-<time>, or lstm-ae-from-<trial or folder>-<time>)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run --name under --output-dir")
    add_settings_arguments(parser, RunSettings)
    add_mlflow_arguments(parser, MLFLOW_EXPERIMENT)
    add_config_arguments(parser)
    return parser


def read_from(arguments: argparse.Namespace) -> Source | None:
    """The source of --from (SourceError if it gives no config; ConfigError for flags that
    only mean something with --from, or that --from rules out)."""
    if arguments.from_path is None:
        for flag, given in (
            ("--trial", arguments.trial),
            ("--init-from-checkpoint", arguments.init_from_checkpoint),
        ):
            if given:
                raise ConfigError(f"{flag} needs --from (the search or run to start from)")
        return None
    if arguments.resume:
        raise ConfigError(
            "--from starts a new run; --resume continues one from its own config (give one of them)"
        )
    if arguments.preset is not None:
        raise ConfigError(
            f"--preset {arguments.preset} and --from both choose the starting config (give one)"
        )
    source = read_source(arguments.from_path, arguments.trial)
    if arguments.init_from_checkpoint and source.checkpoint is None:
        raise SourceError(f"--init-from-checkpoint: {source.describe()} kept no checkpoint to start from")
    return source


def resolve_config(
    arguments: argparse.Namespace, saved: SavedRun | None, source: Source | None = None
) -> ExperimentConfig:
    """The preset (or the config of --from) with flags applied; a resumed run starts from its
    saved config instead.

    A resumed run must reproduce what an uninterrupted run computes, so every flag that
    would change it is refused, naming the field: the model, the data, the optimizer, the
    seed, the batch and its split, the precision and --num-workers (each worker's data
    stream). Flags that only change when it validates, logs or checkpoints may change, and
    --max-steps may grow (the learning-rate schedule continues from where it was).
    """
    if source is not None:
        return source.config.replace(**config_overrides(arguments))
    if saved is None:
        return config_from_arguments(arguments, arguments.preset or DEFAULT_PRESET)
    overrides = config_overrides(arguments)
    check_resumed_flags(overrides, saved.config.values_by_field(), "run", RESUMABLE_FIELDS)
    if overrides.get("max_steps", saved.config.training.max_steps) < saved.config.training.max_steps:
        raise ConfigError(
            f"--max-steps {overrides['max_steps']} is below the resumed run's max_steps "
            f"{saved.config.training.max_steps}: a resumed run may only train longer"
        )
    if overrides.get("max_minutes", saved.config.training.max_minutes) < saved.config.training.max_minutes:
        raise ConfigError(
            f"--max-minutes {overrides['max_minutes']} is below the resumed run's max_minutes "
            f"{saved.config.training.max_minutes}: a resumed run may only train longer"
        )
    if arguments.num_workers != saved.num_workers:
        raise ConfigError(
            f"--num-workers {arguments.num_workers} differs from the resumed run's num_workers "
            f"{saved.num_workers}: each worker draws its own data stream (start a new --name instead)"
        )
    return saved.config.replace(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    name = arguments.name or default_run_name(
        f"from-{source_label(arguments.from_path, arguments.trial)}"
        if arguments.from_path
        else arguments.preset or DEFAULT_PRESET
    )
    settings = RunSettings(
        name=name,
        storage=arguments.output_dir,
        resume=arguments.resume,
        max_failures=arguments.max_failures,
        address=arguments.address,
    )
    return run_until_interrupted(
        lambda held, interrupted: run_command(arguments, settings, held, interrupted),
        f"run {name}",
        lambda: run_continue_line(settings),
    )


def run_command(
    arguments: argparse.Namespace, settings: RunSettings, held: contextlib.ExitStack, interrupted
) -> int:
    """Check everything, lock the run folder (held until `held` closes), then train.
    `interrupted()`: whether Ctrl-C came (then an error is the interrupt's, not reported)."""
    name = settings.name
    try:
        if arguments.resume and arguments.name is None:
            raise ConfigError("--resume needs the --name of the run to continue")
        if arguments.max_failures < -1:
            raise ConfigError(
                f"--max-failures must be 0 or more (-1: retry forever), got {arguments.max_failures}"
            )
        check_scaling_arguments(arguments)
        settings = replace(settings, mlflow=mlflow_settings(arguments, MLFLOW_EXPERIMENT))
        saved = None
        source = read_from(arguments)
        if not arguments.resume:  # a new run's flags are checked before its folder exists
            config = resolve_config(arguments, None, source)
            check_split(config, arguments.num_workers)
        if source is not None:
            weights = (
                check_initial_weights(source.checkpoint, config) if arguments.init_from_checkpoint else None
            )
            record = {**source.record, "overrides": config_overrides(arguments), "initial_weights": weights}
            settings = replace(settings, source=record, initial_weights=weights)
        held.enter_context(lock_run_folder(settings))  # before reading or writing the folder
        if arguments.resume:
            saved = saved_run(settings.storage, settings.name)
            config = resolve_config(arguments, saved)
            check_split(config, arguments.num_workers)
        scaling = Scaling(**settings_values(arguments, Scaling))
    except (ConfigError, RunFolderError, ValueError) as error:
        fail(str(error))
    if saved is not None and saved.is_complete(config):
        print(
            f"run {name} is already complete ({saved.result['status']} after {saved.result['steps']} steps); "
            "nothing to do (raise --max-steps to train longer)"
        )
        return 0
    preset_name = arguments.preset or DEFAULT_PRESET
    origin = "resumed from its saved config" if arguments.resume else f"preset {preset_name}"
    if source is not None:
        overrides = " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in config_overrides(arguments).items()
        )
        weights = f"weights from {settings.initial_weights}" if settings.initial_weights else "fresh weights"
        origin = f"config of {source.describe()}, {f'overridden by {overrides}' if overrides else 'as it was'}, {weights}"
    print(
        f"run {name}: {origin}, {arguments.num_workers} worker(s), output {arguments.output_dir}", flush=True
    )
    try:
        summary = run_training(config, scaling, settings)
    except (RunFolderError, DataError, ConfigError) as error:
        fail(str(error))
    except Exception as error:  # Ray's TrainingFailedError and friends: one line, not a traceback
        if interrupted():
            raise
        cause = root_cause(error)
        if STORAGE_FULL in cause:  # a worker's StorageFullError, as Ray passes it on
            fail(
                f"{cause}. Make room there (or move the run folder to a larger disk); "
                f"{run_continue_line(settings)}",
                status=1,
            )
        fail(f"training failed: {cause}", status=1)
    print_summary(summary)
    return 0


def print_summary(summary) -> None:
    result = summary.result
    metrics = result["final_metrics"]
    print(f"\nrun folder: {summary.path}")
    print(
        f"status: {result['status']} after {result['steps']} steps, {result['sequences_seen']} sequences, {result['wall_seconds']:.0f} s"
    )
    if VAL_MSE_FRAME in metrics:
        print(
            f"prediction MSE per frame {metrics[VAL_MSE_FRAME]:.1f} "
            f"(all-zeros {metrics[BASELINE_ZEROS_MSE_FRAME]:.1f}, copy-last-frame {metrics[BASELINE_COPY_LAST_MSE_FRAME]:.1f})"
        )
    if BASELINE_ZEROS_SSIM in metrics:  # an empty prediction scores high: compare with it
        print(
            f"prediction SSIM {metrics[VAL_SSIM]:.3f} "
            f"(all-zeros {metrics[BASELINE_ZEROS_SSIM]:.3f}, copy-last-frame {metrics[BASELINE_COPY_LAST_SSIM]:.3f})"
        )
    if BASELINE_ZEROS_INK_SSIM in metrics:  # SSIM where there is ink: a blank prediction scores about 0
        print(
            f"prediction ink SSIM {metrics[VAL_INK_SSIM]:.3f} "
            f"(all-zeros {metrics[BASELINE_ZEROS_INK_SSIM]:.3f}, copy-last-frame {metrics[BASELINE_COPY_LAST_INK_SSIM]:.3f})"
        )
    print(f"best checkpoint ({result['metric']} {result['best_metric']}): {result['best_checkpoint']}")
