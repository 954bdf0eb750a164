"""The search's Optuna study without a cluster: the searcher is driven as Tune's controller drives
it (suggest, results, completion), with fake trials whose reports the results table also ranks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from tune.experiment import SearchSettings
from tune.results import front_columns, trial_rows
from tune.search import (
    TUNE_STATUS_ATTRIBUTE,
    TUNE_TRIAL_ATTRIBUTE,
    build_searcher,
    load_study,
    sampler_options,
    study_files,
)
from tune.space import parse_space

SPACE = parse_space({"learning_rate": {"loguniform": [1e-4, 1e-2]}, "hidden_size": {"choice": [16, 32]}})
OBJECTIVES = (("val_mse_frame", "min"), ("val_ssim", "max"))

# Each fake trial: the reports Tune hands to on_trial_result, then how it ends: "finished" (its last
# report was handed over too), "asha" (Tune passes the report ASHA stops on only at completion),
# or "errored". Reports are (val_mse_frame, val_ssim).
TRIALS = {
    "late_rise": ([(300.0, 0.50), (250.0, 0.40), (280.0, 0.60)], "finished"),  # last is not best
    "asha_rung": ([(320.0, 0.30)], ("asha", (270.0, 0.35))),  # the stop report is its best
    "asha_worse": ([(310.0, 0.20), (290.0, 0.25)], ("asha", (300.0, 0.70))),
    "errored_late": ([(330.0, 0.10), (200.0, 0.45), (260.0, 0.50)], "errored"),
    "nan_first": ([(math.nan, 0.10), (240.0, 0.48)], "finished"),
    "equal_best": ([(260.0, 0.52), (260.0, 0.30)], "finished"),  # a tie keeps the earlier report
    "never_reported": ([], "errored"),
}


def report(step: int, values: tuple[float, float]) -> dict:
    return {"val_mse_frame": values[0], "val_ssim": values[1], "step": 2 * step, "training_iteration": step}


def drive(searcher, objectives=()) -> tuple[list, dict[str, dict]]:
    """Run every fake trial through `searcher` as Tune's controller would; returns the fake Tune
    results the table reads, and each trial's sampled config."""
    if objectives:
        searcher.set_search_properties(None, None, SPACE.to_ray())
    else:
        searcher.set_search_properties("val_mse_frame", "min", SPACE.to_ray())
    results, configs = [], {}
    for trial_id, (reports, ending) in TRIALS.items():
        configs[trial_id] = searcher.suggest(trial_id)
        logged = [report(step, values) for step, values in enumerate(reports, start=1)]
        for result in logged:
            searcher.on_trial_result(trial_id, result)
        if ending == "finished":
            searcher.on_trial_complete(trial_id, result=logged[-1])
        elif ending == "errored":
            searcher.on_trial_complete(trial_id, error=True)
        else:
            stop = report(len(logged) + 1, ending[1])
            logged.append(stop)
            searcher.on_trial_complete(trial_id, result=stop)
        results.append(
            SimpleNamespace(
                metrics_dataframe=pd.DataFrame(logged) if logged else None,
                metrics={"trial_id": trial_id, "time_total_s": 1.0},
                config=configs[trial_id],
                path=f"/nowhere/trial_{trial_id}",
                error=RuntimeError("lost node") if ending == "errored" else None,
                best_checkpoints=[],
            )
        )
    return results, configs


def study_by_trial(settings: SearchSettings) -> dict:
    study = load_study(settings)
    return {trial.user_attrs[TUNE_TRIAL_ATTRIBUTE]: trial for trial in study.trials}


def test_one_metric_the_study_holds_each_trials_best_report_as_the_table_ranks_it(tmp_path):
    settings = SearchSettings(name="one", storage=str(tmp_path))
    results, _ = drive(build_searcher(settings, concurrent_trials=1))
    rows, _ = trial_rows(results, SPACE, "val_mse_frame", 100, {"asha_rung", "asha_worse"})
    told = study_by_trial(settings)
    assert (tmp_path / "one" / "optuna_study.log").is_file()
    assert set(told) == set(TRIALS)
    for row in rows:
        trial = told[row["trial"]]
        if row["best_val_mse_frame"] is None:
            assert trial.state.name == "FAIL" and trial.value is None
        else:
            assert trial.state.name == "COMPLETE"
            assert trial.value == row["best_val_mse_frame"], row["trial"]
    assert told["late_rise"].value == 250.0 and told["asha_rung"].value == 270.0
    assert told["errored_late"].user_attrs[TUNE_STATUS_ATTRIBUTE] == "errored"
    assert told["late_rise"].intermediate_values == {1: 300.0, 2: 250.0, 3: 280.0}


def test_two_objectives_the_study_holds_the_second_metric_at_the_best_first_report(tmp_path):
    settings = SearchSettings(name="two", storage=str(tmp_path), objectives=OBJECTIVES)
    results, _ = drive(build_searcher(settings, concurrent_trials=1), OBJECTIVES)
    rows, _ = trial_rows(results, SPACE, "val_mse_frame", 100, set(), objectives=OBJECTIVES)
    told = study_by_trial(settings)
    assert [direction.name for direction in load_study(settings).directions] == ["MINIMIZE", "MAXIMIZE"]
    assert load_study(settings).metric_names == ["val_mse_frame", "val_ssim"]
    first, second = front_columns(OBJECTIVES)
    for row in rows:
        trial = told[row["trial"]]
        if row[first] is None:
            assert trial.state.name == "FAIL"
        else:
            assert trial.values == [row[first], row[second]], row["trial"]
    assert told["late_rise"].values == [250.0, 0.40]  # not the last (0.60) nor the best SSIM
    assert told["asha_worse"].values == [290.0, 0.25]
    assert told["equal_best"].values == [260.0, 0.52]


def test_a_restored_searcher_continues_the_stored_study(tmp_path):
    settings = SearchSettings(name="resumed", storage=str(tmp_path))
    searcher = build_searcher(settings, concurrent_trials=1)
    drive(searcher)
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # what Tune keeps with the experiment
    restored = build_searcher(SearchSettings(name="other", storage=str(tmp_path)), concurrent_trials=1)
    restored.restore(str(tmp_path / "searcher-state.pkl"))
    restored.suggest("after_resume")
    restored.on_trial_result("after_resume", report(1, (150.0, 0.6)))
    restored.on_trial_complete("after_resume", result=report(2, (180.0, 0.6)))
    told = study_by_trial(settings)
    assert len(told) == len(TRIALS) + 1 and told["after_resume"].value == 150.0
    assert told["late_rise"].value == 250.0


def test_concurrent_trials_sample_with_the_constant_liar_and_the_seed_repeats_the_search(tmp_path):
    assert sampler_options(7, 1) == {"seed": 7, "constant_liar": False}
    assert sampler_options(7, 4) == {"seed": 7, "constant_liar": True}

    def proposals(name: str, seed: int) -> list[dict]:
        """14 trials, two in flight at a time (past TPE's 10 random start-up trials)."""
        settings = SearchSettings(name=name, storage=str(tmp_path), seed=seed)
        searcher = build_searcher(settings, concurrent_trials=2)
        assert searcher.sampler_options["constant_liar"] is True
        searcher.set_search_properties("val_mse_frame", "min", SPACE.to_ray())
        configs = []
        for index in range(0, 14, 2):
            pair = [f"{name}_{index}", f"{name}_{index + 1}"]
            configs += [searcher.suggest(trial_id) for trial_id in pair]
            for trial_id, config in zip(pair, configs[-2:]):
                mse = 100.0 + 1e4 * abs(math.log10(config["learning_rate"]) + 3) + config["hidden_size"]
                searcher.on_trial_complete(trial_id, result=report(1, (mse, 0.5)))
        return configs

    first, again, other = proposals("a", 3), proposals("b", 3), proposals("c", 4)
    assert first == again and first != other


def test_a_remote_experiment_keeps_its_study_in_a_local_file_named_after_its_uri():
    local, remote = study_files(SearchSettings(name="s", storage="s3://bucket/searches/"))
    assert remote == "s3://bucket/searches/s/optuna_study.log"
    assert local.endswith("/optuna_study.log") and "/s-" in local
    other, _ = study_files(SearchSettings(name="s", storage="s3://bucket/elsewhere"))
    assert other != local
    assert study_files(SearchSettings(name="s", storage="runs"))[1] is None


@pytest.mark.parametrize("concurrent", [1, 3])
def test_the_searcher_of_two_objectives_takes_its_metrics_and_modes(tmp_path, concurrent):
    settings = SearchSettings(name="front", storage=str(tmp_path), objectives=OBJECTIVES)
    searcher = build_searcher(settings, concurrent_trials=concurrent)
    assert searcher.objectives() == list(OBJECTIVES)
    assert searcher.sampler_options["constant_liar"] is (concurrent > 1)


def test_a_remote_experiment_copies_its_study_up_after_each_trial(tmp_path, monkeypatch):
    import pyarrow.fs

    import records.storage

    local_storage = records.storage.storage_filesystem
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())

    def stand_in(storage: str):  # s3://bucket/... lands in tmp_path/bucket
        if storage.startswith("s3://bucket/"):
            return bucket, storage.removeprefix("s3://bucket/")
        return local_storage(storage)

    monkeypatch.setattr(records.storage, "storage_filesystem", stand_in)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "driver"))
    settings = SearchSettings(name="remote", storage="s3://bucket/searches")
    searcher = build_searcher(settings, concurrent_trials=1)
    assert searcher.study_file.startswith(str(tmp_path / "driver"))
    drive(searcher)
    copied = tmp_path / "bucket" / "searches" / "remote" / "optuna_study.log"
    assert copied.read_bytes() == open(searcher.study_file, "rb").read()


@pytest.mark.slow
@pytest.mark.parametrize("objectives", [(), OBJECTIVES])
def test_optunas_plots_are_drawn_from_the_stored_study(tmp_path, objectives):
    from tune.results import hypervolume_reference, plot_study

    settings = SearchSettings(name="plots", storage=str(tmp_path), objectives=objectives)
    drive(build_searcher(settings, concurrent_trials=1), objectives)
    written = plot_study(tmp_path, load_study(settings), objectives, "val_mse_frame")
    expected = ["optuna_importances.png", "optuna_parallel_coordinate.png"]
    if objectives:
        expected += ["optuna_pareto_front.png", "optuna_hypervolume.png"]
    assert written == expected
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)
    from tune.report import EXPERIMENT_PICTURES  # the HTML page shows each of them

    assert set(written) <= {name for name, _ in EXPERIMENT_PICTURES["tune experiment"]}
    assert hypervolume_reference([[250.0, 0.4], [200.0, 0.5]], ("min", "max")) == [255.0, pytest.approx(0.39)]
