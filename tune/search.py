"""The search: Optuna's TPE sampler proposes configs, ASHA stops poor trials early.

A search of two metrics (`tune/objectives.py`) runs TPE's multi-objective form and no ASHA.

ASHA's clock is the training step each report carries (`step`), not Tune's
`training_iteration`, which restarts when a multi-worker trial is retried while its
TorchTrainer resumes at step k. With a time budget (`--max-minutes`) trials are compared at
equal training time instead: the clock is `training_seconds` (the steps' wall-clock time,
carried across restarts, validation not counted), with rungs at budget / reduction_factor**2, budget /
reduction_factor and the budget. ASHA's decisions are written to the experiment folder
(`stopped_by_scheduler/<trial id>`, through the same filesystem as the experiment, so they
survive s3:// storage): Tune itself marks a stopped trial like a finished one.

Optuna learns from what the results table ranks (`RankedOptunaSearch`): each trial's best report
of the first metric (and, for two objectives, the second metric at that report), also for a trial
ASHA stopped or one that errored after reporting. The study is kept in the experiment folder
(STUDY_FILE, an Optuna journal that `optuna-dashboard` opens) and `--resume` continues it. Where
more than one trial runs at once, TPE runs with the constant liar (`sampler_options`).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from lstm_ae.config import ExperimentConfig
from lstm_ae.metrics import best_of, is_finite_number
from records.layout import STUDY_FILE
from records.storage import copy_file, path_exists, storage_filesystem
from train.ray_internals import optuna_trial_of
from tune.experiment import SearchSettings, experiment_path, run_experiment
from tune.objectives import is_multi, to_record
from tune.space import SearchSpace

STOPPED_BY_SCHEDULER_FOLDER = "stopped_by_scheduler"
MAX_T_MARGIN = 1.1
TUNE_TRIAL_ATTRIBUTE = "tune_trial_id"  # an Optuna trial's user attribute: the Tune trial it ran as
TUNE_STATUS_ATTRIBUTE = "tune_status"  # "errored" on a trial that errored after reporting


def comparison_field(base: ExperimentConfig) -> str:
    """The reported field trials of `base` are compared on: seconds of training with a time
    budget, else the step."""
    return "training_seconds" if base.training.max_minutes else "step"


def asha_clock(base: ExperimentConfig, grace_period: int, reduction_factor: int) -> dict[str, Any]:
    """ASHA's time_attr, max_t and grace_period for trials of `base` (module docstring)."""
    training = base.training
    if comparison_field(base) == "training_seconds":
        budget = 60.0 * training.max_minutes
        # max_t above the budget: a trial ends at its own planned step, never stopped there by ASHA.
        return {
            "time_attr": "training_seconds",
            "max_t": budget * MAX_T_MARGIN,
            "grace_period": budget / reduction_factor**2,
        }
    return {
        "time_attr": "step",
        "max_t": training.max_steps,
        "grace_period": min(grace_period * training.eval_every, training.max_steps),
    }


class RecordingASHA(ASHAScheduler):
    """ASHA that records each trial it stops in the experiment folder."""

    def __init__(self, storage: str, name: str, **kwargs):
        super().__init__(**kwargs)
        self.storage, self.name = storage, name

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            filesystem, root = storage_filesystem(self.storage)
            folder = f"{root}/{self.name}/{STOPPED_BY_SCHEDULER_FOLDER}"
            filesystem.create_dir(folder, recursive=True)
            with filesystem.open_output_stream(f"{folder}/{trial.trial_id}") as stream:
                stream.write(f"stopped at {self._time_attr} {result.get(self._time_attr)}\n".encode())
        return decision


def stopped_by_scheduler(settings: SearchSettings) -> set[str]:
    """The ids of the trials ASHA stopped, from the experiment folder."""
    import pyarrow.fs

    filesystem, path = experiment_path(settings)
    folder = f"{path}/{STOPPED_BY_SCHEDULER_FOLDER}"
    if not path_exists(filesystem, folder):
        return set()
    return {info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder))}


# ------------------------------------------------------------------------------ the Optuna study


def sampler_options(seed: int, concurrent_trials: int) -> dict[str, Any]:
    """TPESampler's options: seeded by --search-seed, with the constant liar where more than one
    trial runs at once (a running trial counts as a poor result, so trials started together do not
    all sample the same promising region; Optuna advises it for parallel trials and made it the
    default only in Optuna 5)."""
    return {"seed": seed, "constant_liar": concurrent_trials > 1}


def study_files(settings: SearchSettings) -> tuple[str, str | None]:
    """(the study file the driver writes, its place in the experiment folder where that folder is
    remote, else None).

    Optuna's journal appends to a local file under a file lock, which s3:// cannot hold: a remote
    search writes its study in a local folder named after the experiment's URI and copies it up.
    That folder does not depend on the user's home, so Ray's saved searcher (which holds the path)
    finds it again when the search resumes on another machine (`run_search` fetches it first)."""
    if "://" not in settings.storage or settings.storage.startswith("file://"):
        _, path = experiment_path(settings)
        return f"{path}/{STUDY_FILE}", None
    uri = f"{settings.storage.rstrip('/')}/{settings.name}"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / "lstm-ae-studies" / f"{settings.name}-{digest}" / STUDY_FILE
    return str(local), f"{uri}/{STUDY_FILE}"


def journal_storage(study_file: str):
    """Optuna's journal storage in `study_file` (made where missing)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(study_file).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(study_file))


def load_study(settings: SearchSettings):
    """The search's Optuna study from the driver's study file, or None where there is none."""
    import optuna

    study_file, _ = study_files(settings)
    if not Path(study_file).is_file():
        return None
    return optuna.load_study(study_name=settings.name, storage=journal_storage(study_file))


class RankedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch telling the study what the results table ranks each trial by.

    Ray 2.60's OptunaSearch completes an Optuna trial with the trial's last report. The table
    (`tune.results.trial_rows`) ranks a trial by its report with the best first metric, whether
    the trial finished, ASHA stopped it or it errored after reporting. This searcher keeps that
    report for every trial (from each result, and from the last one Tune hands over at completion:
    Tune never passes the report ASHA stops a trial on to on_trial_result) and completes the Optuna
    trial with its values: the first metric's best and, for two objectives, the second metric at
    that report. A trial that errored after reporting is completed with them too (and marked
    errored); one that never reported fails (errored) or is pruned (stopped).

    The study is an Optuna journal in `study_file`, copied to `study_copy` (a URI) after each trial
    completes where the experiment folder is remote.
    """

    def __init__(
        self,
        study_file: str,
        study_copy: str | None,
        study_name: str,
        seed: int,
        concurrent_trials: int,
        metric: str | list[str] | None = None,
        mode: str | list[str] | None = None,
        points_to_evaluate: list[dict[str, Any]] | None = None,
    ):
        import optuna

        self.sampler_options = sampler_options(seed, concurrent_trials)
        super().__init__(
            metric=metric,
            mode=mode,
            points_to_evaluate=points_to_evaluate,
            sampler=optuna.samplers.TPESampler(**self.sampler_options),
            study_name=study_name,
            storage=journal_storage(study_file),
        )
        self.study_file, self.study_copy, self.study_name = study_file, study_copy, study_name
        self.ranking_reports: dict[str, dict[str, Any]] = {}  # by Tune trial id: the objectives' values

    def objectives(self) -> list[tuple[str, str]]:
        """[(metric, mode), ...]: the first ranks a trial's reports."""
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        modes = self.mode if isinstance(self.mode, list) else [self.mode]
        return list(zip(metrics, modes))

    def keep_if_better(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep `result`'s objectives as the trial's ranking report if its first metric is better
        than the kept one's (the earlier report wins a tie, as in the table)."""
        objectives = self.objectives()
        first, mode = objectives[0]
        if not is_finite_number(result.get(first)):
            return
        report = {metric: result.get(metric) for metric, _ in objectives}
        kept = self.ranking_reports.get(trial_id)
        self.ranking_reports[trial_id] = best_of(
            [*([kept] if kept else []), report], lambda r: r[first], mode
        )

    def ranking_values(self, trial_id: str) -> list[Any] | None:
        """The values the study is told for a trial, in objective order; None before a report."""
        kept = self.ranking_reports.get(trial_id)
        return None if kept is None else [kept[metric] for metric, _ in self.objectives()]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Tune's metric, mode and space, then the study is made: it is given the metrics' names
        (optuna-dashboard and Optuna's plots show them instead of "Objective Value 0")."""
        import warnings

        import optuna

        if not super().set_search_properties(metric, mode, config, **spec):
            return False
        study = optuna.load_study(study_name=self.study_name, storage=journal_storage(self.study_file))
        with warnings.catch_warnings():  # Optuna marks metric names experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([name for name, _ in self.objectives()])
        return True

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        optuna_trial = optuna_trial_of(self, trial_id)
        if isinstance(config, dict) and optuna_trial is not None:  # the dashboard shows Tune's trial id
            optuna_trial.set_user_attr(TUNE_TRIAL_ATTRIBUTE, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.keep_if_better(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result:
            self.keep_if_better(trial_id, result)
        kept = self.ranking_reports.get(trial_id)
        optuna_trial = optuna_trial_of(self, trial_id)
        if error and kept is not None and optuna_trial is not None:
            optuna_trial.set_user_attr(TUNE_STATUS_ATTRIBUTE, "errored")
        # Ray's OptunaSearch reads the objectives from the result it is given: give it the kept report.
        super().on_trial_complete(trial_id, result=dict(kept) if kept else None, error=error)
        self.copy_study_up()

    def copy_study_up(self) -> None:
        """Copy the study file to the remote experiment folder; a failed copy is retried after the
        next trial (and at the end of the search) rather than failing this trial."""
        if self.study_copy is None:
            return
        try:
            copy_file(self.study_file, self.study_copy)
        except OSError as error:
            print(f"the Optuna study could not be copied to {self.study_copy} (tried again later): {error}")


def build_searcher(
    settings: SearchSettings, concurrent_trials: int, points_to_evaluate: list[dict[str, Any]] | None = None
) -> RankedOptunaSearch:
    """The searcher of a new search: its study in the experiment's study file, named after the
    experiment; two objectives set their metrics here (one metric comes from Tune's config)."""
    study_file, study_copy = study_files(settings)
    objectives = {}
    if is_multi(settings.objectives):
        metrics, modes = (list(values) for values in zip(*settings.objectives))
        objectives = {"metric": metrics, "mode": modes}
    return RankedOptunaSearch(
        study_file=study_file,
        study_copy=study_copy,
        study_name=settings.name,
        seed=settings.seed,
        concurrent_trials=concurrent_trials,
        points_to_evaluate=points_to_evaluate,
        **objectives,
    )


def run_search(
    base: ExperimentConfig,
    space: SearchSpace,
    settings: SearchSettings,
    callbacks=(),
    points_to_evaluate: list[dict[str, Any]] | None = None,
):
    """Run (or resume) the Optuna + ASHA search; returns (ResultGrid, experiment path, plan).

    ASHA's rungs are in steps (the first at `grace_period` validations, the last at
    max_steps) or, with max_minutes, in seconds (`asha_clock`).
    """
    space.check(base)
    study_file, study_copy = study_files(settings)
    if settings.resume and study_copy is not None:  # Ray's restored searcher reads the local file
        filesystem, path = storage_filesystem(study_copy)
        if path_exists(filesystem, path):
            copy_file(study_copy, study_file)

    def search_setup(ray_tune, plan):
        Path(study_file).unlink(missing_ok=True)  # a new experiment starts a new study
        searcher = build_searcher(settings, plan.max_concurrent, points_to_evaluate)
        if is_multi(settings.objectives):  # the front: Optuna's multi-objective TPE, no early stopping
            return space.to_ray(), {
                "search_alg": searcher,
                "metric": None,
                "mode": None,
                "num_samples": settings.num_samples,
            }
        scheduler = RecordingASHA(
            settings.storage,
            settings.name,
            reduction_factor=settings.reduction_factor,
            **asha_clock(base, settings.grace_period, settings.reduction_factor),
        )
        return space.to_ray(), {
            "search_alg": searcher,
            "scheduler": scheduler,
            "num_samples": settings.num_samples,
        }

    record = {"space": [asdict(dimension) for dimension in space.dimensions]}
    if settings.objectives:
        if settings.objectives[0][0] != base.training.metric:
            raise ValueError("the first objective must be the base config's metric")
        record["objectives"] = to_record(settings.objectives)
    outcome = run_experiment(base, settings, search_setup, record, callbacks)
    if study_copy is not None and Path(study_file).is_file():  # the last copy, whatever failed before
        copy_file(study_file, study_copy)
    return outcome
