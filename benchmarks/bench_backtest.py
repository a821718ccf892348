"""Benchmark the backtest and the stress test at the target size.

4 strategies x 100 symbols x 17520 hourly bars (2 years), daily rebalancing (730 asofs, lag 1),
random returns/funding/weights. Compares perpfolio.backtest.simulate (vectorized within holding
segments) with two per-bar loops (numpy over symbols; plain Python); times hourly rebalancing, a
stop-loss and position sizing (vol target on a predicted covariance per asof, then with the drawdown
cash buffer, which fills each segment's equity path inside the execution loop); then runs the stress test at every rebalance (730 asofs x 4 strategies x the 5 scenarios of
config/scenarios.toml x cross and isolated margin at 3x, betas and vols over the 30-day window ending
at each asof) and the liquidation prices of every book.

Run: .venv/bin/python benchmarks/bench_backtest.py
"""

from __future__ import annotations

import time

import numpy as np

from pathlib import Path

from perpfolio.backtest import performance_metrics, rebalance_plan, simulate
from perpfolio.optimize.sizing import SizingRule
from perpfolio.stress import bar_vols, liquidation_levels, load_scenarios, rolling_betas, stress_test
from perpfolio.tiers import load_snapshot, resolve_tiers

SCENARIOS, _ = load_scenarios(Path(__file__).parents[1] / "config" / "scenarios.toml",
                              symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT"], reference="BTCUSDT")

N_BARS, N_SYM, N_STRAT, WINDOW, REPEATS = 17_520, 100, 4, 720, 3


def per_bar_loop(r, f, reb, w, *, fee_bps, slippage_bps, lag_bars, e0=1.0):
    """Baseline: the same accounting one bar at a time (numpy over symbols, Python over bars)."""
    n_bars, n_sym = r.shape
    execute = {b + lag_bars: j for j, b in enumerate(reb) if b + lag_bars < n_bars}
    x, equity, out = np.zeros(n_sym), e0, np.empty(n_bars)
    for t in range(n_bars):
        equity += x @ r[t] + x @ f[t]
        x = x * (1.0 + r[t])
        if t in execute:
            target = w[execute[t]] * equity
            equity -= (fee_bps + slippage_bps) / 1e4 * np.abs(target - x).sum()
            x = target
        out[t] = equity
    return out


def pure_python_loop(r, f, reb, w, *, fee_bps, slippage_bps, lag_bars, e0=1.0):
    """Naive baseline: bar by bar and symbol by symbol in plain Python (lists of floats)."""
    r, f, w = r.tolist(), f.tolist(), w.tolist()
    n_sym = len(r[0])
    execute = {b + lag_bars: j for j, b in enumerate(reb) if b + lag_bars < len(r)}
    x, equity, out = [0.0] * n_sym, e0, []
    for t, (rt, ft) in enumerate(zip(r, f)):
        equity += sum(xi * (ri + fi) for xi, ri, fi in zip(x, rt, ft))
        x = [xi * (1.0 + ri) for xi, ri in zip(x, rt)]
        if t in execute:
            target = [wi * equity for wi in w[execute[t]]]
            equity -= (fee_bps + slippage_bps) / 1e4 * sum(abs(a - b) for a, b in zip(target, x))
            x = target
        out.append(equity)
    return np.array(out)


def best_of(fn, repeats=REPEATS):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    rng = np.random.default_rng(42)
    ts = np.datetime64("2023-01-01T00", "us") + np.arange(N_BARS) * np.timedelta64(1, "h")
    r = rng.standard_t(4, (N_BARS, N_SYM)) * 0.006
    f = -rng.normal(1e-5, 2e-5, (N_BARS, N_SYM)) * (np.arange(N_BARS) % 8 == 7)[:, None]
    reb = np.arange(23, N_BARS, 24)
    weights = [rng.dirichlet(np.full(N_SYM, 0.3), len(reb)) for _ in range(N_STRAT)]
    kw = dict(fee_bps=5.0, slippage_bps=2.0, lag_bars=1)

    t_vec, frames = best_of(lambda: [simulate(ts, r, f, reb, w, **kw) for w in weights])
    t_loop, loops = best_of(lambda: [per_bar_loop(r, f, reb, w, **kw) for w in weights])
    t_py, pys = best_of(lambda: [pure_python_loop(r, f, reb, w, **kw) for w in weights], 1)

    def max_diff(baseline):
        return max(np.abs(fr["equity"].to_numpy() - eq).max() for fr, eq in zip(frames, baseline))

    t_met, _ = best_of(lambda: [performance_metrics(fr, periods_per_year=8760) for fr in frames])
    hourly = [rebalance_plan(reb, w, n_bars=N_BARS, frequency="hourly") for w in weights]
    t_hourly, _ = best_of(lambda: [simulate(ts, r, f, hb, hw, **kw) for hb, hw in hourly], 1)
    t_stop, stopped = best_of(lambda: [simulate(ts, r, f, reb, w, stop_loss=0.05, **kw) for w in weights])
    n_stops = sum(int(fr["stops"].sum()) for fr in stopped)
    # predicted annualized covariances, one per asof: a fixed correlated matrix scaled by a vol regime
    loadings = rng.normal(0, 0.5, (N_SYM, 3))
    base_cov = (loadings @ loadings.T + np.diag(rng.uniform(0.2, 0.6, N_SYM))) * 0.5
    covs = base_cov[None] * rng.uniform(0.5, 2.0, len(reb))[:, None, None]
    vol_target = SizingRule(target_vol=0.5, max_leverage=3.0)
    buffered = SizingRule(target_vol=0.5, max_leverage=3.0, cash_buffer=True, cash_buffer_base=0.05)
    t_vt, vt_frames = best_of(lambda: [simulate(ts, r, f, reb, w, sizing=vol_target, predicted_cov=covs, **kw) for w in weights])
    t_buf, buf_frames = best_of(lambda: [simulate(ts, r, f, reb, w, sizing=buffered, predicted_cov=covs, **kw) for w in weights])
    mean_lev = np.mean([fr["sizing_leverage"].mean() for fr in vt_frames])
    mean_cash = np.mean([fr["cash_fraction"].mean() for fr in buf_frames])

    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"] + [f"S{i:03d}USDT" for i in range(3, N_SYM)]
    # snapshot brackets for BTC/ETH/SOL, the conservative default for the made-up symbols
    tiers = {s: r.tiers for s, r in resolve_tiers(symbols, snapshot=load_snapshot()).items()}

    def betas_all():  # the WINDOW bars ending at the asof bar (fewer for the first 29 asofs)
        return [({"BTCUSDT": rolling_betas(r[max(0, b + 1 - WINDOW): b + 1], reference=0)},
                 bar_vols(r[max(0, b + 1 - WINDOW): b + 1])) for b in reb]

    t_beta, stats = best_of(betas_all, 1)

    leverages, modes = (1.0, 3.0, 5.0, 10.0), ("cross", "isolated")

    def stress_one_call_each():  # one call per (book, asof, leverage, margin mode)
        rows = 0
        for k, fr in enumerate(frames):
            eq = fr["equity"].to_numpy()
            for j, b in enumerate(reb):
                betas, vols = stats[j]
                for leverage in leverages:
                    for mode in modes:
                        rows += stress_test(weights[k][j], symbols, betas, scenarios=SCENARIOS, leverage=leverage,
                                            tiers=tiers, equity=eq[b], vols=vols, bar_hours=1, margin_mode=mode).height
        return rows

    def stress_all():  # what the evaluation does: every leverage and margin mode of a (book, asof) in one call
        rows = 0
        for k, fr in enumerate(frames):
            eq = fr["equity"].to_numpy()
            for j, b in enumerate(reb):
                betas, vols = stats[j]
                rows += stress_test(weights[k][j], symbols, betas, scenarios=SCENARIOS, leverage=leverages, tiers=tiers,
                                    equity=eq[b], vols=vols, bar_hours=1, margin_mode=modes).height
        return rows

    t_stress, rows = best_of(stress_all, 1)
    t_stress_each, rows_each = best_of(stress_one_call_each, 1)
    assert rows_each == rows

    def liquidation_all():
        return sum(liquidation_levels(weights[k][j], symbols, leverage=3.0, tiers=tiers, margin_mode=mode).height
                   for k in range(N_STRAT) for j in range(len(reb)) for mode in ("cross", "isolated"))

    t_liq, liq_rows = best_of(liquidation_all, 1)
    n_exec = len(reb) * N_STRAT
    print(f"\n{N_STRAT} strategies x {N_SYM} symbols x {N_BARS} bars, {len(reb)} daily rebalances, lag 1\n")
    print("| step | time (s) | note |")
    print("|---|---:|---|")
    print(f"| simulate, vectorized (best of {REPEATS}) | {t_vec:.3f} | {N_STRAT} strategies |")
    print(f"| per-bar numpy loop baseline (best of {REPEATS}) | {t_loop:.3f} | {t_loop / t_vec:.1f}x slower; "
          f"max equity diff {max_diff(loops):.1e} |")
    print(f"| per-bar pure-Python loop baseline (once) | {t_py:.3f} | {t_py / t_vec:.0f}x slower; "
          f"max equity diff {max_diff(pys):.1e} |")
    print(f"| performance_metrics (best of {REPEATS}) | {t_met:.4f} | {N_STRAT} strategies |")
    print(f"| simulate, hourly rebalancing (once) | {t_hourly:.3f} | {N_STRAT} x {len(hourly[0][0])} rebalances |")
    print(f"| simulate, stop-loss 5% (best of {REPEATS}) | {t_stop:.3f} | {n_stops} positions stopped |")
    print(f"| simulate, sizing: vol target (best of {REPEATS}) | {t_vt:.3f} | mean leverage {mean_lev:.2f} |")
    print(f"| simulate, sizing: vol target + drawdown cash buffer (best of {REPEATS}) | {t_buf:.3f} | "
          f"mean cash fraction {mean_cash:.3f} |")
    print(f"| rolling_betas and vols, {WINDOW}-bar window | {t_beta:.3f} | {len(reb)} asofs |")
    print(f"| stress_test, 4 leverages x cross + isolated in one call per book and asof | {t_stress:.3f} | {n_exec} "
          f"books x {len(SCENARIOS)} scenarios x 8 -> {rows} rows, {1e6 * t_stress / rows:.0f} us/row |")
    print(f"| the same, one call per leverage and margin mode | {t_stress_each:.3f} | "
          f"{t_stress_each / t_stress:.1f}x the time |")
    print(f"| liquidation_levels, cross + isolated | {t_liq:.3f} | {liq_rows} positions |")


if __name__ == "__main__":
    main()
