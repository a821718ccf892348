"""Walk-forward min-variance: compiled-problem loop vs rebuilding per window vs hand-written OSQP.

Problem per window: min w'Σw s.t. Σw = 1, 0 <= w_i <= max_weight, Σ = annualized sample
covariance (ddof=1, x 8760) of the last 720 hourly returns; T = 5000 bars, rebalance every 24
bars (179 solves); N = 20 (max_weight 0.5) and N = 100 (max_weight 0.1).

Methods (wall time of all 179 solves, setup/compilation included, best of --repeat runs):

- project CLARABEL / OSQP: ``perpfolio.optimize.optimize_walk_forward`` (one compiled DPP
  problem, square-root factor, rescaling, verification, fallback chain, polars output);
- rebuild: a new ``cp.Problem(quad_form)`` per window solved by CLARABEL (the popular-library
  pattern); also on hourly-scale Σ (no rescaling) to show the silent accuracy loss;
- hand OSQP: ``osqp.OSQP`` set up once, ``update(Px=...)`` per window, warm-started;
- PyPortfolioOpt: ``EfficientFrontier(None, Σ, weight_bounds=(0, max_weight)).min_volatility()``
  per window (given the same Σ);
- skfolio: ``MeanRisk(min_weights=0, max_weights=max_weight)`` (minimize variance) fitted per
  window on the window's returns scaled by sqrt(8760), so its empirical prior covariance (ddof 1)
  is the same annualized Σ.
The last two run only when installed (``pip install -e ".[bench]"``, which ``make bench`` does).

Accuracy: every solve's objective w'Σw against a reference (CLARABEL, tolerances 1e-12, rebuilt
per window), relative; and the max violation of budget/bounds. Run:

    .venv/bin/python benchmarks/bench_optimizer.py [--repeat 3]
    .venv/bin/python benchmarks/bench_optimizer.py --with-estimation   # N = 100 from the returns
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta

import cvxpy as cp
import numpy as np
import osqp
import polars as pl
from scipy import sparse

from perpfolio.estimators import Moments, annualize, rolling_moments
from perpfolio.optimize import AsofInputs, optimize_walk_forward, parse_strategies

T, WINDOW, STEP, BARS_PER_YEAR = 5000, 720, 24, 8760
REFERENCE = {
    "solver": "CLARABEL", "tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 500
}


def hourly_returns(n: int, seed: int = 0) -> np.ndarray:
    """T x n hourly simple returns: one market factor (~50%/yr), betas 0.7-1.5, idiosyncratic
    vol 40-90%/yr, Student-t(4) shocks, and a stressed stretch with doubled volatility."""
    rng = np.random.default_rng(seed)
    unit_t = lambda size: rng.standard_t(4, size=size) / np.sqrt(2.0)  # noqa: E731
    per_bar = 1 / np.sqrt(BARS_PER_YEAR)
    regime = np.where((np.arange(T) > 2500) & (np.arange(T) < 3200), 2.0, 1.0)[:, None]
    market = 0.5 * per_bar * unit_t((T, 1))
    idio = rng.uniform(0.4, 0.9, n) * per_bar * unit_t((T, n))
    return regime * (market * rng.uniform(0.7, 1.5, n) + idio) + 2e-5


def window_covariances(r: np.ndarray) -> list[np.ndarray]:
    ends = range(WINDOW - 1, T, STEP)
    return [np.cov(r[e - WINDOW + 1 : e + 1].T) * BARS_PER_YEAR for e in ends]


def rebuild(covs: list[np.ndarray], max_weight: float, **options) -> list[np.ndarray]:
    out = []
    for cov in covs:
        w = cp.Variable(cov.shape[0])
        cons = [cp.sum(w) == 1, w >= 0, w <= max_weight]
        cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(cov))), cons).solve(**options)
        out.append(w.value)
    return out


def hand_osqp(covs: list[np.ndarray], max_weight: float, eps: float = 1e-9) -> list[np.ndarray]:
    """min ½ w'(2Σ)w s.t. [1'; I] w in [1; 0] .. [1; max_weight]; P's upper triangle updated."""
    n = covs[0].shape[0]
    pattern = sparse.triu(sparse.csc_matrix(np.ones((n, n))), format="csc")
    rows, cols = pattern.indices, np.repeat(np.arange(n), np.diff(pattern.indptr))
    A = sparse.vstack([sparse.csc_matrix(np.ones((1, n))), sparse.eye(n)], format="csc")
    lower = np.r_[1.0, np.zeros(n)]
    upper = np.r_[1.0, np.full(n, max_weight)]
    P = sparse.csc_matrix((2 * covs[0][rows, cols], rows, pattern.indptr), shape=(n, n))
    solver = osqp.OSQP()
    solver.setup(P, np.zeros(n), A, lower, upper, eps_abs=eps, eps_rel=eps, polish=True,
                 warm_starting=True, verbose=False, max_iter=100_000)
    out = []
    for k, cov in enumerate(covs):
        if k:
            solver.update(Px=2 * cov[rows, cols])
        result = solver.solve()
        if result.info.status != "solved":
            raise RuntimeError(f"OSQP window {k}: {result.info.status}")
        out.append(result.x.copy())
    return out


def project(covs: list[np.ndarray], max_weight: float, solver: str, moments: Moments | None = None) -> list[np.ndarray]:
    """The project's walk-forward on the given covariances, or on every quantity of ``moments``."""
    n = covs[0].shape[0]
    spec = parse_strategies([{
        "name": "mv", "objective": "min_variance", "solver": solver,
        "constraints": {"budget": 1.0, "min_weight": 0.0, "max_weight": max_weight},
    }])
    zeros, t0 = np.zeros(n), datetime(2025, 1, 1, tzinfo=UTC)
    if moments is None:
        inputs = [AsofInputs(t0 + timedelta(days=k), zeros, c, zeros, c, zeros, "ok") for k, c in enumerate(covs)]
    else:
        inputs = [AsofInputs(t0 + timedelta(days=k), moments.mean[k], moments.cov[k], moments.downside[k],
                             moments.semicov[k], zeros, str(moments.status[k])) for k in range(len(moments.status))]
    df = optimize_walk_forward(spec, [f"A{i}USDT" for i in range(n)], inputs)
    if not (df["status"] == "optimal").all():
        raise RuntimeError(f"project {solver}: statuses {df['status'].unique().to_list()}")
    return list(df["weight"].to_numpy().reshape(len(covs), n))


def pyportfolioopt(covs: list[np.ndarray], max_weight: float) -> list[np.ndarray]:
    from pypfopt import EfficientFrontier

    out = []
    for cov in covs:
        ef = EfficientFrontier(None, cov, weight_bounds=(0, max_weight))
        ef.min_volatility()
        out.append(np.array([ef.weights[i] for i in range(cov.shape[0])]))
    return out


def skfolio_mean_risk(windows: list[np.ndarray], max_weight: float) -> list[np.ndarray]:
    from skfolio.optimization import MeanRisk

    out = []
    for x in windows:
        model = MeanRisk(min_weights=0.0, max_weights=max_weight)
        out.append(np.asarray(model.fit(x * np.sqrt(BARS_PER_YEAR)).weights_))
    return out


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def timed(fn, repeat: int) -> tuple[float, object]:
    """(best wall time of `repeat` calls of fn, its last result)."""
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def with_estimation(n: int, max_weight: float, repeat: int) -> list[str]:
    """The engine as a user pays for it at N = ``n``: estimation from the returns, then the solves.

    floor: ``np.cov`` of every window + the hand-written warm-started OSQP loop at eps 1e-5; project:
    ``rolling_moments`` (mean, covariance, downside and semicovariance of every window, batched, with
    statuses) + the direct OSQP path of ``optimize_walk_forward`` (verification, fallbacks, the
    weights frame)."""
    returns = hourly_returns(n)
    ends = np.arange(WINDOW - 1, T, STEP)
    floor, _ = timed(lambda: hand_osqp(window_covariances(returns), max_weight, eps=1e-5), repeat)
    estimate, moments = timed(lambda: annualize(rolling_moments(returns, ends, window=WINDOW), BARS_PER_YEAR), repeat)
    solve, _ = timed(lambda: project(list(moments.cov), max_weight, "OSQP", moments), repeat)
    both, ws = timed(lambda: project(list(moments.cov), max_weight, "OSQP",
                                     annualize(rolling_moments(returns, ends, window=WINDOW), BARS_PER_YEAR)), repeat)
    ref = rebuild(list(moments.cov), max_weight, **REFERENCE)
    err = max(abs(w @ c @ w - r @ c @ r) / (r @ c @ r) for w, r, c in zip(ws, ref, moments.cov))
    return [
        f"| {n} | floor: np.cov per window + hand OSQP (eps 1e-5) | {floor:.3f} | 1.00x |",
        f"| {n} | project: rolling_moments (mean, cov, downside, semicov) | {estimate:.3f} | {estimate / floor:.2f}x |",
        f"| {n} | project: direct OSQP walk-forward on them | {solve:.3f} | {solve / floor:.2f}x |",
        f"| {n} | **project: both, end to end** (max rel. obj. err {err:.0e}) | {both:.3f} | {both / floor:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--with-estimation", action="store_true",
                        help="only the N = 100 engine with its estimation against the np.cov + OSQP floor")
    args = parser.parse_args()
    if args.with_estimation:
        print("| N | method | total s | vs floor |\n|---|---|---:|---:|")
        print("\n".join(with_estimation(100, 0.1, args.repeat)))
        return
    lines = [
        "| N | max w | method | solves | total s | ms/solve | vs rebuild | max rel. obj. err "
        "| max violation | ok (<1e-6) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, max_weight in ((20, 0.5), (100, 0.1)):
        returns = hourly_returns(n)
        covs = window_covariances(returns)
        windows = [returns[e - WINDOW + 1 : e + 1] for e in range(WINDOW - 1, T, STEP)]
        ref = rebuild(covs, max_weight, **REFERENCE)
        ref_obj = np.array([w @ c @ w for w, c in zip(ref, covs)])
        methods = {
            "project (compiled DPP, CLARABEL)": lambda: project(covs, max_weight, "CLARABEL"),
            "project (direct OSQP, warm start)": lambda: project(covs, max_weight, "OSQP"),
            "rebuild cp.Problem per window (CLARABEL)": lambda: rebuild(covs, max_weight, solver="CLARABEL"),
            "rebuild per window, hourly-scale Σ, no rescaling": lambda: rebuild(
                [c / BARS_PER_YEAR for c in covs], max_weight, solver="CLARABEL"),
            "hand-written OSQP, warm start": lambda: hand_osqp(covs, max_weight),
        }
        if installed("pypfopt"):
            methods["PyPortfolioOpt EfficientFrontier per window"] = lambda: pyportfolioopt(covs, max_weight)
        if installed("skfolio"):
            methods["skfolio MeanRisk per window"] = lambda: skfolio_mean_risk(windows, max_weight)
        results = {name: timed(fn, args.repeat) for name, fn in methods.items()}
        base = results["rebuild cp.Problem per window (CLARABEL)"][0]
        for name, (seconds, ws) in results.items():
            obj = np.array([w @ c @ w for w, c in zip(ws, covs)])
            err = float(np.max(np.abs(obj - ref_obj) / ref_obj))
            viol = max(
                max(abs(w.sum() - 1), -w.min(), w.max() - max_weight, 0.0) for w in ws
            )
            lines.append(
                f"| {n} | {max_weight} | {name} | {len(covs)} | {seconds:.3f} | "
                f"{seconds / len(covs) * 1e3:.2f} | {base / seconds:.1f}x | {err:.1e} | {viol:.1e} | "
                f"{'yes' if err <= 1e-6 and viol <= 1e-6 else 'NO'} |"
            )
    print(f"numpy {np.__version__}, cvxpy {cp.__version__}, osqp {osqp.__version__}, polars {pl.__version__}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
