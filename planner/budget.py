"""Parsing FLOP budgets given by users: ``"40%"`` or ``"0.4"`` mean 40% of a full run's FLOPs."""

from __future__ import annotations


def parse_budget(text: str | float) -> float:
    """A budget as a fraction in (0, 1].

    Args:
        text: ``"40%"`` (percent) or ``"0.4"`` / ``0.4`` (fraction).

    Returns:
        The fraction of a full (uncached) run's FLOPs, never-cached parts included.

    Raises:
        ValueError: not a number, or outside (0, 1] (e.g. ``-5%``, ``0``, ``140%``).
    """
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a number: write it as 40% or 0.4") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"budget {text!r} must be in (0, 100%]: it is a fraction of a full run's FLOPs")
    return value


def parse_sweep(text: str) -> list[float]:
    """``"20%..80%"`` (step 10%) or ``"20%..80%:5%"`` → the list of budgets, as fractions.

    Raises:
        ValueError: malformed range, empty range or a bound outside (0, 1].
    """
    body, _, step_text = str(text).partition(":")
    lo_text, sep, hi_text = body.partition("..")
    if not sep:
        raise ValueError(f"sweep {text!r} must look like 20%..80% or 20%..80%:5%")
    lo, hi = parse_budget(lo_text), parse_budget(hi_text)
    step = parse_budget(step_text) if step_text else 0.1
    if hi < lo:
        raise ValueError(f"sweep {text!r}: the upper bound is below the lower bound")
    n = int(round((hi - lo) / step + 1e-9))
    return [round(lo + i * step, 10) for i in range(n + 1)]
