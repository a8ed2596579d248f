"""Calibration statistics with non-finite (or negative) entries are refused, naming tensor, unit and step.

Issue 10 ("no mismatch runs silently"): a diverged calibration run or a damaged file must not turn into
a plan. numpy only; each test builds a small calibration in memory (planner/synthetic.py).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from cachec.planner import CalibrationError, load_calibration
from cachec.planner.calibration import calibration_from_tensors
from cachec.planner.synthetic import calibration_tensors, save_calibration, synthetic_features

S = 6  # steps
K = 2  # eoc lags
REMEDY = "the calibration run diverged or the file is damaged; re-run cachec calibrate"


@pytest.fixture(scope="module")
def valid():
    """(header, tensors) of a valid 4-unit calibration: transformer_blocks.{0,1}.{attn1,ff}, S=6, B=2, D=4."""
    feats = synthetic_features(blocks=2, steps=S, dim=4, samples=4, branches=2, seed=3)
    flops = np.array([3.0, 5.0, 3.0, 5.0])
    sens = np.random.default_rng(0).uniform(0.1, 2.0, (len(feats), S))
    return calibration_tensors(feats, flops, 20.0, None, sens, eoc_lags=K, eoc_prior="element")


def load(header, tensors):
    return calibration_from_tensors(header, tensors.__getitem__, set(tensors), "x")


def poisoned(tensors, key, index, value):
    t = dict(tensors)
    arr = t[key].copy()
    arr[index] = value
    t[key] = arr
    return t


def test_valid_calibration_loads(valid):
    header, tensors = valid
    cal = load(header, tensors)
    assert cal.unit_names == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff",
                              "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
    assert np.isfinite(cal.eoc_lin).all() and np.isfinite(cal.eoc_quad).all()


# key, index, value, the position the message must name
CASES = [
    ("gram/transformer_blocks.1.ff", (0, 1, 4, 2), np.nan, "branch 0, split 1, steps (4, 2)"),
    ("gram/transformer_blocks.0.attn1", (1, 0, 5, 5), np.inf, "branch 1, split 0, steps (5, 5)"),
    ("sensitivity", (2, 3), np.nan, "unit transformer_blocks.1.attn1, step 3"),
    ("sensitivity", (0, 5), np.inf, "unit transformer_blocks.0.attn1, step 5"),
    ("goc_rel_sum", (1, 4), np.nan, "unit transformer_blocks.0.ff, step 4"),
    ("goc_cos_sum", (3, 2), -np.inf, "unit transformer_blocks.1.ff, step 2"),
    ("unit_flops", (2,), np.inf, "unit transformer_blocks.1.attn1"),
    ("unit_latency_s", (3,), np.nan, "unit transformer_blocks.1.ff"),
    ("prior_sum/transformer_blocks.0.ff", (3, 1), np.nan, "step 3, group 1"),
    ("eoc_q/transformer_blocks.1.attn1", (1, 2, 0), np.inf, "split 1, step 2, group 0"),
    ("eoc_m/transformer_blocks.1.ff", (0, 4, 1, 3), np.nan, "split 0, step 4, lag 2, group 3"),
]


@pytest.mark.parametrize("key,index,value,where", CASES, ids=[f"{c[0]}@{c[1]}" for c in CASES])
def test_non_finite_statistic_is_refused_naming_unit_and_step(valid, key, index, value, where):
    header, tensors = valid
    bad = poisoned(tensors, key, index, value)
    shown = "nan" if np.isnan(value) else str(float(value))
    expected = f"calibration tensor {key}: non-finite value ({shown}) at {where}: {REMEDY}"
    with pytest.raises(CalibrationError) as exc:
        load(header, bad)
    assert str(exc.value) == expected
    assert "\n" not in str(exc.value)


def test_first_non_finite_entry_is_named(valid):
    header, tensors = valid
    bad = poisoned(tensors, "sensitivity", (3, 1), np.nan)
    bad = poisoned(bad, "sensitivity", (1, 4), np.inf)  # earlier in C order: unit 1 before unit 3
    with pytest.raises(CalibrationError, match=re.escape("at unit transformer_blocks.0.ff, step 4:")):
        load(header, bad)


@pytest.mark.parametrize("key,index,where", [
    ("sensitivity", (1, 2), "unit transformer_blocks.0.ff, step 2"),
    ("unit_flops", (0,), "unit transformer_blocks.0.attn1"),
])
def test_negative_value_is_refused_naming_unit(valid, key, index, where):
    header, tensors = valid
    bad = poisoned(tensors, key, index, -0.25)
    with pytest.raises(CalibrationError, match=re.escape(
            f"calibration tensor {key}: negative value (-0.25) at {where}: expected values >= 0")):
        load(header, bad)


def test_negative_goc_cos_is_allowed(valid):
    header, tensors = valid
    load(header, poisoned(tensors, "goc_cos_sum", (0, 3), -1.5))  # a cosine sum may be negative


def test_non_finite_statistic_in_a_file_is_refused(valid, tmp_path):
    header, tensors = valid
    path = tmp_path / "diverged.safetensors"
    save_calibration(str(path), header, poisoned(tensors, "gram/transformer_blocks.0.ff", (1, 0, 2, 3), np.nan))
    with pytest.raises(CalibrationError, match=re.escape(
            "calibration tensor gram/transformer_blocks.0.ff: non-finite value (nan) at branch 1, split 0, steps (2, 3)")):
        load_calibration(str(path))


# ---- the format module (calibrate/format.py): one definition, one exception type -----------------------
def test_format_module_is_torch_free_and_owns_the_one_exception_type():
    import subprocess
    import sys

    import cachec.calibrate as calibrate_pkg
    import cachec.calibrate.format as fmt
    import cachec.planner as planner_pkg
    import cachec.planner.calibration as planner_cal

    assert planner_pkg.CalibrationError is calibrate_pkg.CalibrationError is fmt.CalibrationError
    assert planner_cal.validate_header is fmt.validate_header and not hasattr(planner_cal, "HEADER_KEYS")
    assert issubclass(fmt.CalibrationError, ValueError)
    code = "import sys, cachec.calibrate.format, cachec.planner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_header_dataclass_round_trip_and_named_errors(valid):
    from cachec.calibrate.format import HEADER_KEYS, CalibrationHeader

    header, _ = valid
    h = CalibrationHeader.from_dict(header)
    assert h.to_dict() == header and tuple(h.to_dict()) == HEADER_KEYS and h.along_plan is None
    along = h.replace(along_plan={"plan_sha256": "0" * 64})
    assert tuple(along.to_dict()) == HEADER_KEYS + ("along_plan",)
    with pytest.raises(CalibrationError, match=r"missing \['seed'\], extra \['colour'\]"):
        CalibrationHeader.from_dict({**{k: v for k, v in header.items() if k != "seed"}, "colour": 1})
    with pytest.raises(CalibrationError, match="header.steps: expected a positive int"):
        CalibrationHeader.from_dict(dict(header, steps=0))
    with pytest.raises(CalibrationError, match=r"header.units\[1\].numel"):
        h.replace(units=[header["units"][0], dict(header["units"][1], numel=99)])


def test_write_calibration_round_trip_and_refusals(valid, tmp_path):
    from cachec.calibrate.format import read_header, read_tensors, write_calibration
    from cachec.runtime.io import file_sha256

    header, tensors = valid
    path = write_calibration(tmp_path / "c.safetensors", header, tensors)
    assert read_header(path) == header
    stored = read_tensors(path)
    assert set(stored) == set(tensors) and all(np.array_equal(stored[k], tensors[k]) for k in tensors)
    cal = load_calibration(str(path))
    assert cal.sha256 == file_sha256(path)
    with pytest.raises(CalibrationError, match="calibration tensor sensitivity: missing"):
        write_calibration(tmp_path / "x.safetensors", header, {k: v for k, v in tensors.items() if k != "sensitivity"})
    with pytest.raises(CalibrationError, match="unit_flops: expected float64"):
        write_calibration(tmp_path / "x.safetensors", header, dict(tensors, unit_flops=tensors["unit_flops"].astype(np.float32)))
    with pytest.raises(CalibrationError, match="calibration tensor extra: not a tensor of format 2"):
        write_calibration(tmp_path / "x.safetensors", header, dict(tensors, extra=np.zeros(1)))
    with pytest.raises(CalibrationError, match="calibration tensor nope: missing"):
        read_tensors(path, ["nope"])
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "absent.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # nothing left by refused writes
