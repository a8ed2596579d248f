"""Human-readable views of a plan: text summary, per-step compute fraction and a units × steps heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: heatmap codes: 0 computed, 1 plain reuse, 2 fitted linear compensation, 3 EOC prior correction, 4 idle (a
#: nested unit whose parent is skipped: it does not run; docs/plan-format.md "Nested units")
ACTION_CODES = {"computed": 0, "reuse": 1, "linear": 2, "eoc": 3, "idle": 4}


def action_matrix(plan) -> np.ndarray:
    """int8 (U, S) matrix of :data:`ACTION_CODES` for a loaded :class:`cachec.runtime.plan.Plan`."""
    m = np.zeros((len(plan.units), plan.steps), dtype=np.int8)
    for i, u in enumerate(plan.units):
        for s in range(plan.steps):
            if u.idle(s):
                m[i, s] = ACTION_CODES["idle"]
        for s, comp in u.compensation.items():
            if comp.eoc_alpha:
                m[i, s] = ACTION_CODES["eoc"]
            elif list(comp.coeffs) == [1.0]:
                m[i, s] = ACTION_CODES["reuse"]
            else:
                m[i, s] = ACTION_CODES["linear"]
    return m


def step_compute_fraction(plan) -> np.ndarray:
    """float64 (S,): FLOPs spent at each step ÷ FLOPs of a full step (fixed parts included)."""
    full, fixed = plan.budget.full_step_flops, plan.budget.fixed_step_flops
    spent = np.full(plan.steps, fixed, dtype=np.float64)
    for u in plan.units:
        spent += np.array([u.flops if a == "C" else 0.0 for a in u.actions])
    return spent / full


def summary(plan) -> str:
    """Multi-line text: identity, sampler, budget, counts of each action, per-step compute fraction."""
    m = action_matrix(plan)
    counts = {k: int((m == v).sum()) for k, v in ACTION_CODES.items()}
    frac = step_compute_fraction(plan)
    lines = [
        f"plan        {plan.source or '(in memory)'}",
        f"model       {plan.model.cls} {plan.model.fingerprint[:19]}…",
        f"sampler     {plan.sampler.scheduler}, {plan.steps} steps, guidance {plan.sampler.guidance.mode} "
        f"{plan.sampler.guidance.scale} ({plan.sampler.guidance.branches} branches), resolution {plan.sampler.resolution}",
        f"method      {plan.budget.method} {plan.budget.options or ''}  history: {plan.history}",
        f"budget      target {100 * plan.budget.target:.1f}%  realised {100 * plan.budget.realised:.2f}% of full-run FLOPs",
        f"predicted   {plan.predicted_error if plan.predicted_error is not None else 'n/a'} (sensitivity-weighted squared error)",
        f"units       {len(plan.units)}; unit-steps computed {counts['computed']}, reuse {counts['reuse']}, "
        f"fitted linear {counts['linear']}, EOC-corrected {counts['eoc']}"
        + (f", idle (nested under a skipped parent) {counts['idle']}" if counts["idle"] else ""),
        "per-step compute fraction (step: %):",
        "  " + "  ".join(f"{s}:{100 * f:.0f}" for s, f in enumerate(frac)),
    ]
    return "\n".join(lines)


def heatmap_png(plan, path: str | Path) -> Path:
    """Write a units × steps heatmap coloured by action (computed / reuse / fitted / EOC / idle) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    m = action_matrix(plan)
    colours = ["#2b6cb0", "#e2e8f0", "#f6ad55", "#9f7aea", "#ffffff"]
    fig_h = max(3.0, 0.18 * len(plan.units) + 1.5)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * plan.steps + 3), fig_h))
    ax.imshow(m, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours), vmin=0, vmax=4)
    ax.set_yticks(range(len(plan.units)))
    ax.set_yticklabels([u.name for u in plan.units], fontsize=6)
    ax.set_xlabel("step (0 = noisiest)")
    ax.set_title(f"{plan.budget.method}: {100 * plan.budget.realised:.1f}% of full FLOPs")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in zip(ACTION_CODES, colours)],
              loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=5, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
