"""Efficient frontier per asof: 20 target returns, compiled and warm-started vs rebuilt per point.

Workload (the same inputs for every engine): T = 5000 hourly bars, window 720, one asof every 24
bars (179 asofs); mu and Σ = annualized window mean and sample covariance (ddof 1, x 8760);
long-only, budget 1, max weight 0.5; N = 3 and N = 20. At each asof, 20 points from the
min-variance portfolio to the max-return portfolio (see ``perpfolio.optimize.frontier``).

Engines (wall time over all 179 asofs, setup included, best of --repeat runs):

- project OSQP: ``frontier_walk`` as portfolio.frontier runs it: one ``EfficientFrontier`` (two
  problems on the direct OSQP path) for every asof, warm-started, verified, polars output;
- project CLARABEL: the same through cvxpy's compiled DPP problems (solver option "CLARABEL");
- per-asof construction: a new ``EfficientFrontier`` per asof (compile per asof; CLARABEL is what
  the report computed before portfolio.frontier existed);
- rebuild per point: a fresh ``cp.Problem(quad_form)`` per point, CLARABEL (the popular pattern);
- PyPortfolioOpt: ``EfficientFrontier(mu, Σ, weight_bounds=(0, 0.5))`` per point,
  ``min_volatility()`` then ``efficient_return(target)`` (only when installed: ``make bench``).

The rebuilt and PyPortfolioOpt engines get the project's targets, so every engine solves the same
problems. Accuracy: each point's variance against a fresh CLARABEL solve at 1e-12 at the same
target (relative), and the largest violation of budget, bounds and target. Run:

    .venv/bin/python benchmarks/bench_frontier.py [--repeat 3]
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import cvxpy as cp
import numpy as np
import osqp

from bench_optimizer import BARS_PER_YEAR, REFERENCE, STEP, T, WINDOW, hourly_returns, installed, timed
from perpfolio.optimize import Constraints, EfficientFrontier, frontier_walk

POINTS, MAX_WEIGHT = 20, 0.5


def window_moments(n: int) -> tuple[np.ndarray, np.ndarray]:
    r = hourly_returns(n)
    ends = range(WINDOW - 1, T, STEP)
    mu = np.array([r[e - WINDOW + 1: e + 1].mean(axis=0) * BARS_PER_YEAR for e in ends])
    cov = np.array([np.cov(r[e - WINDOW + 1: e + 1].T) * BARS_PER_YEAR for e in ends])
    return mu, cov


def project(mu, cov, solver: str) -> np.ndarray:
    """K x P x N weights from frontier_walk (the asset's call)."""
    k, n = mu.shape
    t0 = datetime(2025, 1, 1, 23, tzinfo=UTC)
    frame, _ = frontier_walk([t0 + timedelta(days=i) for i in range(k)], mu, cov, [f"A{i}" for i in range(n)],
                             n_points=POINTS, constraints=Constraints(max_weight=MAX_WEIGHT), solver=solver)
    if (frame["status"] != "optimal").any():
        raise RuntimeError(f"project {solver}: statuses {frame['status'].unique().to_list()}")
    return frame.sort("as_of", "point", maintain_order=True)["weight"].to_numpy().reshape(k, POINTS, n)


def per_asof(mu, cov, solver: str) -> np.ndarray:
    n = mu.shape[1]
    return np.array([[p.weights for p in EfficientFrontier(n, max_weight=MAX_WEIGHT, solver=solver).sweep(m, c, POINTS)]
                     for m, c in zip(mu, cov)])


def quad_form_point(mu, cov, target: float | None, **options) -> np.ndarray:
    w = cp.Variable(len(mu))
    cons = [cp.sum(w) == 1, w >= 0, w <= MAX_WEIGHT] + ([] if target is None else [mu @ w >= target])
    cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(cov))), cons).solve(**options)
    return w.value


def rebuild(mu, cov, targets, **options) -> np.ndarray:
    return np.array([[quad_form_point(m, c, None if j == 0 else t, **options) for j, t in enumerate(ts)]
                     for m, c, ts in zip(mu, cov, targets)])


def pyportfolioopt(mu, cov, targets) -> np.ndarray:
    """K x P x N weights; NaN where PyPortfolioOpt raised (its default solver hit its limits)."""
    from pypfopt import EfficientFrontier as PyPortfolioOptFrontier
    from pypfopt.exceptions import OptimizationError

    out = []
    for m, c, ts in zip(mu, cov, targets):
        points = []
        for j, t in enumerate(ts):
            ef = PyPortfolioOptFrontier(m, c, weight_bounds=(0, MAX_WEIGHT))  # a new instance per point, as its plotting does
            try:
                if j == 0:
                    ef.min_volatility()
                else:
                    try:
                        ef.efficient_return(float(t))
                    except ValueError:  # above its own (less accurate) max-return solve: the top point
                        ef.efficient_return(float(ef._max_return_value))
                points.append(np.array([ef.weights[i] for i in range(len(m))]))
            except OptimizationError:
                points.append(np.full(len(m), np.nan))
        out.append(points)
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lines = ["| N | method | asofs | points | total s | ms/asof | vs rebuild | failed points | max rel. var err "
             "| max violation | ok (<1e-6) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in (3, 20):
        mu, cov = window_moments(n)
        base_w = project(mu, cov, "OSQP")
        targets = np.einsum("kpn,kn->kp", base_w, mu)  # point 0 is min variance: no target
        references: dict[bytes, np.ndarray] = {}

        def reference_var(at: np.ndarray) -> np.ndarray:
            """Variance of the high-accuracy solve at targets ``at`` (cached)."""
            if at.tobytes() not in references:
                ref = rebuild(mu, cov, at, **REFERENCE)
                references[at.tobytes()] = np.einsum("kpi,kij,kpj->kp", ref, cov, ref)
            return references[at.tobytes()]
        methods = {
            "project OSQP (compiled once, warm start)": lambda: project(mu, cov, "OSQP"),
            "project CLARABEL (compiled DPP once)": lambda: project(mu, cov, "CLARABEL"),
            "per-asof construction, OSQP": lambda: per_asof(mu, cov, "OSQP"),
            "per-asof construction, CLARABEL (the report before)": lambda: per_asof(mu, cov, "CLARABEL"),
            "rebuild cp.Problem per point (CLARABEL)": lambda: rebuild(mu, cov, targets, solver="CLARABEL"),
        }
        if installed("pypfopt"):
            methods["PyPortfolioOpt EfficientFrontier per point"] = lambda: pyportfolioopt(mu, cov, targets)
        results = {name: timed(fn, args.repeat) for name, fn in methods.items()}
        base = results["rebuild cp.Problem per point (CLARABEL)"][0]
        k = mu.shape[0]
        for name, (seconds, w) in results.items():
            failed = int(np.isnan(w).any(axis=2).sum())  # accuracy below is over the solved points
            var = np.einsum("kpi,kij,kpj->kp", w, cov, w)
            reached = np.einsum("kpn,kn->kp", w, mu)
            # the sweeps set their own targets from their own min-variance point (solvers differ in
            # the last digits of its return); the rebuilt engines were given the OSQP sweep's targets
            own = targets if not name.startswith(("project", "per-asof")) else np.linspace(
                reached[:, 0], targets[:, -1], POINTS, axis=1)
            ref_var = reference_var(own)
            err = float(np.nanmax(np.abs(var - ref_var) / ref_var))
            viol = float(max(np.nanmax(np.abs(w.sum(axis=2) - 1)), -np.nanmin(w), np.nanmax(w) - MAX_WEIGHT,
                             np.nanmax((own - reached)[:, 1:]), 0.0))
            ok = failed == 0 and err <= 1e-6 and viol <= 1e-6
            lines.append(f"| {n} | {name} | {k} | {POINTS} | {seconds:.3f} | {seconds / k * 1e3:.2f} | "
                         f"{base / seconds:.1f}x | {failed} | {err:.1e} | {viol:.1e} | {'yes' if ok else 'NO'} |")
    print(f"numpy {np.__version__}, cvxpy {cp.__version__}, osqp {osqp.__version__}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
