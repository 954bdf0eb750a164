"""`python -m train.probe CHECKPOINT`: how much digit identity does the encoder state hold?

    python -m train.probe runs/my-run               # its best checkpoint
    python -m train.probe runs/my-run/checkpoint_00001200 --sequences 4000

Freezes the encoder, fits a linear classifier on `encode(past)` features of generated
sequences whose digits are known, and scores it on sequences of held-out digits (see
lstm_ae/linear_probe.py). Prints the accuracy beside an untrained encoder of the same shape and
chance, and with --shuffle-labels runs the control that must stay at chance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lstm_ae.checkpoint import CheckpointError, load_model
from lstm_ae.data import DataError
from lstm_ae.linear_probe import probe, probe_with_baseline
from train.commandline import OneLineParser, add_device_argument, check_device, fail, resolve_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m train.probe", description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder or file, or a run folder")
    parser.add_argument(
        "--sequences", type=int, default=2000, help="training sequences (half as many held out)"
    )
    parser.add_argument("--shuffle-labels", action="store_true", help="the control: labels shuffled")
    parser.add_argument(
        "--cache-dir", default=None, help="where the digit data are cached (default: the run's)"
    )
    add_device_argument(parser)
    arguments = parser.parse_args(argv)
    if arguments.sequences < 10:
        fail(f"--sequences must be at least 10, got {arguments.sequences}")
    check_device(arguments.device)
    try:
        model, config, _ = load_model(resolve_checkpoint(arguments.checkpoint), arguments.device)
        if arguments.cache_dir:
            config = config.replace(cache_dir=arguments.cache_dir)
        if arguments.shuffle_labels:
            result = probe(model, config, arguments.sequences, shuffle_labels=True)
            scores = {"probe_accuracy_shuffled_labels": result.accuracy, "probe_chance": result.chance}
        else:
            scores = probe_with_baseline(model, config, arguments.sequences)
    except (CheckpointError, DataError) as error:
        fail(str(error))
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
