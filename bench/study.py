"""The shared set-up of the one-off planner studies (``bench_peer_shapes``, ``bench_predictor_sets``,
``bench_mask_pricing``, ``bench_mask_search``): their conditions and seeds, their calibration and their sampler.

The evaluation set is the benchmark's sweep set (docs/benchmarks.md): 20 images, classes 0-9 cycled twice on
class models, the 20 held-out prompts of :func:`cachec.evaluation.held_out_set` on prompt models; seeds
1000000+, disjoint from the calibration's seeds 0+.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from cachec.calibrate.run import calibrate
from cachec.evaluation import held_out_set

#: first evaluation seed (the benchmark's)
EVAL_SEED0 = 1_000_000
#: PSNR of identical images counts as this many dB in means and paired differences
PSNR_CAP = 80.0


def study_conditions(driver, n_cal: int, n_eval: int = 20) -> tuple[list, list, list[int]]:
    """``(calibration conditions, evaluation conditions, evaluation seeds)``: classes 0-9 cycled (``n_cal`` and
    ``n_eval`` of them) on class models; the first ``n_cal`` calibration prompts and ``n_eval`` held-out prompts
    on prompt models."""
    if driver.condition_kind == "class":
        cal = [i % 10 for i in range(n_cal)]
        ev = [i % 10 for i in range(n_eval)]
    else:
        cal = list(driver.prompt_sets["calibration"][:n_cal])
        ev = held_out_set(driver, n_eval)[0]
    return cal, ev, [EVAL_SEED0 + i for i in range(len(ev))]


def sampler(driver, steps: int | None = None, guidance: float | None = None, batch: int = 10
            ) -> Callable[[list, list[int]], torch.Tensor]:
    """``generate(conditions, seeds)``: the model's images (N, C, H, W) in [0, 1], ``batch`` per call
    (``steps``/``guidance`` None: the model's defaults)."""

    def generate(conds, seeds):
        return torch.cat([driver.generate(conds[i:i + batch], seeds[i:i + batch], steps=steps, guidance=guidance)
                          for i in range(0, len(conds), batch)])

    return generate


def plan_images(driver, generate: Callable[[list, list[int]], torch.Tensor], plan, sidecar: dict, path: Path,
                conds: list, seeds: list[int]) -> torch.Tensor:
    """The images (N, C, H, W) in [0, 1] of ``plan`` (a planner's :class:`cachec.runtime.plan.Plan` and its EOC
    ``sidecar``, written to ``path`` first) applied to ``driver`` while ``generate`` samples ``conds``/``seeds``."""
    from cachec.runtime import apply, write_plan

    with apply(driver, write_plan(plan, path, sidecar or None)):
        return generate(conds, seeds)


def study_calibration(driver, conds: list, steps: int, guidance: float, output: Path,
                      attention_maps: bool = False) -> Path:
    """The studies' uncached calibration: one sample per condition, seeds 0+, batches of 10, factored
    sensitivity on 4 samples (the benchmark's settings, :mod:`bench.compare_sweeps`), with attention-map units
    when asked; returns its path."""
    return Path(calibrate(driver, conds, output=output, samples_per_condition=1, steps=steps, guidance=guidance,
                          seed=0, batch_size=10, sensitivity="factored", sensitivity_samples=4, progress=False,
                          restart=True, attention_maps=attention_maps))


def add_study_args(ap: argparse.ArgumentParser, model: str = "digits-mmdit", cal: int = 30) -> None:
    """The options every study takes: ``--model``, ``--steps``, ``--cal`` (calibration conditions), ``--threads``."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cal", type=int, default=cal, help="calibration conditions")
    ap.add_argument("--threads", type=int, default=1)


@dataclass
class Study:
    """A loaded model with the study's conditions, seeds and sampler (:func:`open_study`)."""

    driver: object
    steps: int
    guidance: float
    cal_conds: list
    ev_conds: list
    ev_seeds: list[int]
    generate: Callable[[list, list[int]], torch.Tensor]


def open_study(args: argparse.Namespace) -> Study:
    """Set torch's threads, load ``args.model`` (:func:`cachec.loading.load_model`) and return its
    :class:`Study` (default guidance, :func:`study_conditions` with ``args.cal``, :func:`sampler`)."""
    from cachec.loading import load_model

    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    g = float(driver.default_guidance)
    cal, ev, seeds = study_conditions(driver, args.cal)
    return Study(driver, args.steps, g, cal, ev, seeds, sampler(driver, args.steps, g))
