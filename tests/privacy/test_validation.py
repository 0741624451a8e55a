"""What one upload's report (scores, timings) may hold before it reaches a table, MTAL or a
checkpoint: finite numbers in range, a bounded number of short keys."""

from __future__ import annotations

import math

import pytest

from fedsilo.privacy.validation import (
    MAX_REPORT_ENTRIES,
    InvalidTensors,
    UploadLimits,
)

LIMITS = UploadLimits()
HONEST = {"metric": 0.75, "val_metric": 0.5, "test_n": 120.0, "fusion_shared": -0.4}


def test_an_honest_report_passes() -> None:
    LIMITS.check_report(HONEST, {"train_s": 12.5, "test_s": 0.0}, "upload of a")
    LIMITS.check_report({}, {}, "upload of a")  # nothing scored: nothing said


@pytest.mark.parametrize(("metrics", "timings", "fragment"), [
    ({"metric": math.inf}, {}, "metrics metric = inf is not a number in [0, 1]"),
    ({"metric": math.nan}, {}, "metrics metric = nan"),
    ({"metric": 1.5}, {}, "metrics metric = 1.5"),
    ({"val_metric": -0.1}, {}, "metrics val_metric = -0.1"),
    ({"test_n": 1e300}, {}, "metrics test_n = 1e+300"),
    ({"test_n": 2.5}, {}, "test_n = 2.5 is not a whole number"),
    ({"metric": True}, {}, "metrics metric = True"),
    ({"loss": 1e13}, {}, "metrics loss = 10000000000000.0"),
    ({}, {"train_s": -1.0}, "timings train_s = -1.0"),
    ({}, {"train_s": math.inf}, "timings train_s = inf"),
    ({"x" * 65: 0.5}, {}, "is not a name of 1..64 characters"),
    ({"": 0.5}, {}, "is not a name"),
    ({f"k{i}": 0.0 for i in range(MAX_REPORT_ENTRIES + 1)}, {},
     f"{MAX_REPORT_ENTRIES + 1} metrics entries"),
])
def test_a_report_out_of_range_is_refused_saying_which_value(
    metrics: dict, timings: dict, fragment: str
) -> None:
    with pytest.raises(InvalidTensors) as err:
        LIMITS.check_report(metrics, timings, "upload of a for round 0")
    assert err.value.reason == "report"
    assert "upload of a for round 0" in str(err.value) and fragment in str(err.value)
