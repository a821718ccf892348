"""Benchmark: rolling estimators over every daily window of 100 symbols x 2 years of hourly bars.

    .venv/bin/python benchmarks/bench_estimators.py [--symbols 100] [--days 730] [--window 720] [--sklearn-windows 60]

Times (best of ``--repeat``):
- floor: ``np.cov`` called per window (the plain numpy loop) — the reference for "sample";
- each estimator of ``perpfolio.estimators.rolling_estimates`` alone, all windows batched;
- the target set sample + Ledoit-Wolf + semicovariance in ONE call (shared centred Gram matrix);
- scikit-learn's ``LedoitWolf`` / ``OAS`` fitted per window (timed on ``--sklearn-windows``
  windows and extrapolated linearly to all of them);
- GARCH(1,1) predicted volatility (``arch``), 3 symbols x the last 180 windows (ms column: per window).
Returns: Student-t, one-factor, seeded; only the shapes matter for timing.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from sklearn.covariance import OAS, LedoitWolf

from perpfolio.estimators import ESTIMATORS, rolling_estimates, rolling_moments
from perpfolio.signals import garch_predicted_vol


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--symbols", type=int, default=100)
    ap.add_argument("--days", type=int, default=730)
    ap.add_argument("--window", type=int, default=720)
    ap.add_argument("--step", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sklearn-windows", type=int, default=60)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t, n = args.days * 24, args.symbols
    market = rng.standard_t(4, size=(t, 1)) * 0.006
    returns = market * rng.uniform(0.6, 1.2, size=(1, n)) + rng.standard_t(4, size=(t, n)) * 0.005
    ends = np.arange(args.window - 1 + args.step - 1, t, args.step)
    k = ends.size
    print(f"{n} symbols x {t} hourly bars, window {args.window}, step {args.step}: {k} windows; load average {os.getloadavg()[0]:.1f}")
    rows = []

    def per_window(fn) -> None:
        for e in ends:
            fn(returns[e - args.window + 1 : e + 1])

    rows.append(("floor: np.cov per window (loop)", best(lambda: per_window(lambda w: np.cov(w, rowvar=False)), args.repeat)))
    rows.append(("rolling_moments (sample mean/cov + semicov)", best(lambda: rolling_moments(returns, ends, window=args.window), args.repeat)))
    target = ("sample", "ledoit_wolf")
    rows.append(("TARGET sample + ledoit_wolf + semicov, one call", best(lambda: rolling_estimates(returns, ends, window=args.window, estimators=target), args.repeat)))
    for name in ESTIMATORS:
        rows.append((f"rolling_estimates[{name}] (incl. semicov)", best(lambda name=name: rolling_estimates(returns, ends, window=args.window, estimators=(name,)), args.repeat)))
    rows.append(("all estimators, one call", best(lambda: rolling_estimates(returns, ends, window=args.window), 1)))
    sub = ends[: args.sklearn_windows]
    for label, cls in (("sklearn LedoitWolf per window", LedoitWolf), ("sklearn OAS per window", OAS)):
        t0 = time.perf_counter()
        for e in sub:
            cls().fit(returns[e - args.window + 1 : e + 1])
        rows.append((f"{label} (extrapolated from {sub.size})", (time.perf_counter() - t0) * k / sub.size))
    # GARCH(1,1) predicted vol: one arch fit per symbol and window (the default run's shape: 3 symbols, 180 days)
    g_ends = ends[-180:]
    t0 = time.perf_counter()
    _, stats = garch_predicted_vol(returns[:, :3], g_ends, window=args.window, horizon=24, periods_per_year=8760.0)
    rows.append((f"GARCH(1,1) arch fits, 3 symbols x {g_ends.size} windows ({stats['garch_failures']} failed)", time.perf_counter() - t0))
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  seconds  ms/window")
    for label, sec in rows:
        print(f"{label:<{width}}  {sec:7.3f}  {1000 * sec / k:9.3f}")


if __name__ == "__main__":
    main()
