"""GARCH(1,1) predicted vol of `signals.signals`: the batched fit (perpfolio.garch) against one
`arch` fit per window, on the same rolling windows, in one process.

    .venv/bin/python benchmarks/bench_garch.py                 # 3, 30 and 100 symbols x 180 daily asofs
    .venv/bin/python benchmarks/bench_garch.py --symbols 3 --asofs 30

Windows: 720 hourly bars ending at daily asofs (24 bars apart) of a simulated GARCH(1,1) path with
t(5) innovations per symbol, as `garch_predicted_vol` sees them. arch is timed on a random sample of
windows (at most --arch-sample) and extrapolated per window; both fit the same specification
(zero mean, normal QMLE, arch's backcast and bounds). Reported beside the times: the relative
difference of the two forecasts on the sampled windows (median and largest) and the batched fits
that did not converge. tests/test_garch.py checks the likelihoods.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from perpfolio.signals import garch_predicted_vol

WINDOW, HORIZON, PPY = 720, 24, 8760.0


def returns(rng: np.random.Generator, n_bars: int, n_symbols: int) -> np.ndarray:
    out = np.empty((n_bars, n_symbols))
    for i in range(n_symbols):
        alpha, beta = rng.uniform(0.03, 0.15), rng.uniform(0.75, 0.95)
        beta = min(beta, 0.985 - alpha)
        s2 = 1.0
        for t in range(n_bars):
            out[t, i] = np.sqrt(s2) * rng.standard_t(5) / np.sqrt(5 / 3) * 0.006
            s2 = (1 - alpha - beta) + alpha * (out[t, i] / 0.006) ** 2 + beta * s2
    return out


def arch_forecast(y: np.ndarray) -> float:
    """The annualized vol forecast of one arch fit of the window, as perpfolio made it before the batched fit."""
    from arch import arch_model

    scale = 1.0 / np.std(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = arch_model(y * scale, mean="Zero", vol="GARCH", p=1, q=1, dist="normal", rescale=False).fit(
            disp="off", show_warning=False, options={"maxiter": 100})
        var = res.forecast(horizon=HORIZON, reindex=False).variance.to_numpy()[-1]
    return float(np.sqrt(np.mean(var) / scale**2 * PPY))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--symbols", default="3,30,100")
    ap.add_argument("--asofs", type=int, default=180)
    ap.add_argument("--arch-sample", type=int, default=150)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| symbols | windows | batched (s) | arch, one fit per window (s) | speed-up | forecast diff (median, max) |")
    print("|---:|---:|---:|---:|---:|---|")
    for n in map(int, args.symbols.split(",")):
        r = returns(rng, WINDOW + 24 * args.asofs, n)
        ends = WINDOW - 1 + 24 * np.arange(args.asofs + 1)
        began = time.perf_counter()
        vol, stats = garch_predicted_vol(r, ends, window=WINDOW, horizon=HORIZON, periods_per_year=PPY)
        batched = time.perf_counter() - began
        cells = [(k, i) for k in range(ends.size) for i in range(n)]
        sample = [cells[j] for j in rng.choice(len(cells), min(args.arch_sample, len(cells)), replace=False)]
        began = time.perf_counter()
        diffs = [arch_forecast(r[ends[k] - WINDOW + 1 : ends[k] + 1, i]) / vol[k, i] - 1 for k, i in sample]
        per_fit = (time.perf_counter() - began) / len(sample)
        arch_total = per_fit * len(cells)
        diffs = np.abs(diffs)
        print(f"| {n} | {len(cells):,} | {batched:.2f} | {arch_total:.1f} (extrapolated from {len(sample)} fits) | "
              f"{arch_total / batched:.1f}x | {np.nanmedian(diffs):.1e}, {np.nanmax(diffs):.1e} "
              f"({stats['garch_failures']} failed) |", flush=True)


if __name__ == "__main__":
    main()
