"""The completion-degree arithmetic of bench/predictor and the CSV log it appends to."""

import pytest

from bench.common import CsvLog, read_csv
from bench.predictor import completion_degree


def _window(kind: str, resources: str, sum_p: float) -> dict[str, str]:
    return {"kind": kind, "resources": resources, "sum_p": str(sum_p)}


def test_every_point_is_averaged_over_its_windows_so_one_lucky_window_does_not_win():
    windows = [
        _window("pick", "50 50", 100.0),
        _window("grid", "50 50", 110.0),
        _window("grid", "25 75", 130.0),  # lucky once ...
        _window("grid", "25 75", 80.0),  # ... not on average (105 < 105.67)
        _window("grid", "75 25", 90.0),
        _window("pick", "50 50", 107.0),
    ]
    result = completion_degree(windows)
    assert result["pick"] == result["best"] == "50 50"
    assert result["completion_degree"] == 1.0
    assert result["rank_in_grid"] == 1
    assert result["grid_points"] == 3
    assert result["windows_per_point"] == 1


def test_completion_is_the_pick_mean_over_the_best_mean():
    windows = [
        _window("pick", "50 50", 90.0),
        _window("grid", "50 50", 94.0),
        _window("grid", "100 50", 120.0),
        _window("grid", "100 50", 80.0),
        _window("grid", "100 100", 115.0),
    ]
    result = completion_degree(windows)
    assert result["best"] == "100 100"
    assert result["completion_degree"] == 0.8  # 92 / 115
    assert result["rank_in_grid"] == 3


def test_picks_of_different_predictors_in_one_setting_are_refused():
    windows = [_window("pick", "50 50", 1.0), _window("pick", "25 75", 1.0), _window("grid", "50 50", 1.0)]
    with pytest.raises(ValueError, match="one pick per setting"):
        completion_degree(windows)


def test_csv_log_appends_to_a_file_with_its_columns_and_refuses_other_columns(tmp_path):
    path = tmp_path / "log.csv"
    CsvLog(path, ["a", "b"]).add({"a": 1, "b": 2})
    CsvLog(path, ["a", "b"], append=True).add({"a": 3, "b": 4})
    assert read_csv(path) == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    with pytest.raises(ValueError, match="cannot append"):
        CsvLog(path, ["a", "c"], append=True)
    CsvLog(path, ["a", "b"])  # a new log starts the file anew
    assert read_csv(path) == []
