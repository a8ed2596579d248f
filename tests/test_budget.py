import pytest

from cachec.planner.budget import parse_budget, parse_sweep


def test_percent_and_fraction_mean_the_same():
    assert parse_budget("40%") == pytest.approx(0.4)
    assert parse_budget("0.4") == 0.4
    assert parse_budget(" 100% ") == 1.0


@pytest.mark.parametrize("bad", ["-5%", "0", "140%", "abc", "1.5"])
def test_bad_budgets_are_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_sweep():
    assert parse_sweep("20%..80%") == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert parse_sweep("25%..35%:5%") == pytest.approx([0.25, 0.3, 0.35])
    with pytest.raises(ValueError):
        parse_sweep("80%..20%")
