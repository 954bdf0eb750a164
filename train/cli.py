"""`python -m train`: train the composite LSTM autoencoder with Ray Train.

    python -m train                                   # cpu preset, local Ray, embedded data
    python -m train --preset paper --num-workers 8 --use-gpu --output-dir s3://bucket/runs
    python -m train --name my-run --resume            # continue a stopped run
    ray job submit --working-dir . -- python -m train --preset smoke

Every config field is a flag (`--hidden-size 512`, `--learning-rate 3e-4`, ...); the config
is validated before Ray starts, and a bad value exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lstm_ae.config import (
    DEFAULT_PRESET,
    FIELD_SECTIONS,
    PRESETS,
    ConfigError,
    ExperimentConfig,
    add_config_arguments,
    config_from_arguments,
    config_overrides,
)
from lstm_ae.data import DataError
from lstm_ae.metrics import BASELINE_COPY_LAST_MSE_FRAME, BASELINE_ZEROS_MSE_FRAME, VAL_MSE_FRAME


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m train",
        description="Train the composite LSTM video autoencoder (Srivastava et al. 2015) with Ray Train.",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=DEFAULT_PRESET,
        help=f"starting configuration (default {DEFAULT_PRESET}: 10-13 minutes on 2 CPU cores)",
    )
    add_scaling_arguments(parser)
    parser.add_argument("--output-dir", default="runs", help="local folder or s3:// URI holding run folders")
    parser.add_argument("--name", default=None, help="run name (default lstm-ae-<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run --name under --output-dir")
    parser.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="worker-group restarts from the latest checkpoint (-1: no limit)",
    )
    add_config_arguments(parser)
    return parser


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=int, default=1, help="data-parallel workers (one per GPU)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs reserved per worker (default: all CPUs split over the workers; 2 with --use-gpu)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default RAY_ADDRESS, else local)"
    )


def check_scaling_arguments(arguments: argparse.Namespace) -> None:
    """The flags of add_scaling_arguments that argparse's types alone do not check."""
    if arguments.cpus_per_worker is not None and not arguments.cpus_per_worker > 0:
        raise ConfigError(f"--cpus-per-worker must be positive, got {arguments.cpus_per_worker}")


def resolve_config(arguments: argparse.Namespace, saved: ExperimentConfig | None) -> ExperimentConfig:
    """The preset with flags applied; a resumed run starts from its saved config instead.

    On resume the model's shape is fixed by its checkpoint: a model flag that differs from
    the saved config is an error. Data, optimizer and training flags (say a larger
    --max-steps) apply on top of the saved config.
    """
    if saved is None:
        return config_from_arguments(arguments, arguments.preset)
    overrides = config_overrides(arguments)
    saved_values = saved.flat()
    for name, value in overrides.items():
        if FIELD_SECTIONS[name] == "model" and value != saved_values[name]:
            raise ConfigError(
                f"--{name.replace('_', '-')} {value} differs from the resumed run's {name} "
                f"{saved_values[name]}: a resumed run keeps its model (start a new --name instead)"
            )
    return saved.replace(**overrides)


def check_split(config: ExperimentConfig, num_workers: int) -> None:
    training = config.training
    if num_workers < 1:
        raise ConfigError(f"num_workers must be at least 1, got {num_workers}")
    if training.batch_size % (num_workers * training.grad_accumulation_steps):
        raise ConfigError(
            f"batch_size {training.batch_size} must split evenly over {num_workers} workers x "
            f"{training.grad_accumulation_steps} micro-batches"
        )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    from train.launch import (
        RunFolderError,
        RunSettings,
        Scaling,
        default_run_name,
        run_training,
        saved_config,
    )

    name = arguments.name or default_run_name(arguments.preset)
    settings = RunSettings(
        name=name,
        storage=arguments.output_dir,
        resume=arguments.resume,
        max_failures=arguments.max_failures,
        address=arguments.address,
    )
    try:
        if arguments.resume and arguments.name is None:
            raise ConfigError("--resume needs the --name of the run to continue")
        if arguments.max_failures < -1:
            raise ConfigError(
                f"--max-failures must be 0 or more (-1: retry forever), got {arguments.max_failures}"
            )
        check_scaling_arguments(arguments)
        config = resolve_config(arguments, saved_config(settings) if arguments.resume else None)
        check_split(config, arguments.num_workers)
        scaling = Scaling(arguments.num_workers, arguments.use_gpu, arguments.cpus_per_worker)
    except (ConfigError, ValueError) as error:
        fail(str(error))
    origin = "resumed from its saved config" if arguments.resume else f"preset {arguments.preset}"
    print(f"run {name}: {origin}, {arguments.num_workers} worker(s), output {arguments.output_dir}")
    try:
        summary = run_training(config, scaling, settings)
    except (RunFolderError, DataError, ConfigError) as error:
        fail(str(error))
    except Exception as error:  # Ray's TrainingFailedError and friends: one line, not a traceback
        fail(f"training failed: {root_cause(error)}", status=1)
    print_summary(summary)
    return 0


def root_cause(error: BaseException) -> str:
    """The first line of the innermost worker error Ray wrapped."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = next(iter(failures.values()))
    while getattr(error, "cause", None) is not None:
        error = error.cause
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


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
    print(f"best checkpoint ({result['metric']} {result['best_metric']}): {result['best_checkpoint']}")
