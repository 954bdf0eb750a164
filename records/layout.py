"""The name of every file and folder the suite writes, defined once.

A run folder (`python -m train`, `<storage>/<name>/`) holds CONFIG_FILE, METRICS_FILE,
RESULT_FILE, the pictures (`lstm_ae.viz.RUN_PICTURES`), LOCK_FILE while a run holds it, Ray
Train's SNAPSHOT_FILE and its `checkpoint_<step>/` folders (each with
`lstm_ae.checkpoint.CHECKPOINT_FILE` and HISTORY_FILE). An experiment folder (`python -m
tune`) holds SEARCH_FILE, a search's Optuna study (STUDY_FILE), the results (RESULTS_CSV, RESULTS_MD or ABLATIONS_CSV, ...), and
Tune's trial folders (`trial_<id>_...`, with PARAMS_FILE, Tune's RESULT_FILE lines and the
trial's CONFIG_FILE); multi-worker trials keep their Ray Train runs in TRAIN_RUNS_FOLDER.
"""

from __future__ import annotations

CONFIG_FILE = "config.json"  # a run's or a trial's config (and, for a run, its scaling and source)
RESULT_FILE = "result.json"  # a run's summary; in a trial folder, Tune's reports (JSON lines)
METRICS_FILE = "metrics.csv"  # a run's reports, one row each
SEARCH_FILE = "search.json"  # what an experiment was started with
STUDY_FILE = "optuna_study.log"  # a search's Optuna study (a JournalStorage file): optuna-dashboard opens it
PARAMS_FILE = "params.json"  # a trial's sampled values (Tune's)
TRIAL_PREFIX = "trial_"  # Tune's trial folders: trial_<trial id>_<index>_<values>_<time>
TRAIN_RUNS_FOLDER = "train_runs"  # the Ray Train runs of multi-worker trials, by trial id
HISTORY_FILE = "history.json"  # a checkpoint's training state (records.checkpoints.TrainingState)
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of kept checkpoints
DAMAGED_PREFIX = "damaged_"  # a damaged checkpoint set aside: damaged_checkpoint_<step>/
LOCK_FILE = "lock.json"  # who holds a run or experiment folder (records.folder_lock)
RESULTS_CSV = "results.csv"  # a search's table, one row per trial
RESULTS_MD = "results.md"
ABLATIONS_CSV = "ablations.csv"  # the ablation grid's table
ABLATIONS_MD = "ablations.md"
