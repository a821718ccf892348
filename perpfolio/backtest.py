"""Walk-forward backtest of perpetual-futures books: drift, funding, fees and slippage.

Accounting (exact; every number in the output follows from these lines):

* Positions are notionals ``x_i`` in equity units (account currency). Equity ``E`` starts at
  ``initial_equity`` with no positions (all cash) before bar 0.
* Bar ``t`` (opened at ``bar_ts[t]``) carries SIMPLE per-bar returns ``r_i`` (close/prev close - 1)
  and ``f_i``, the funding return of a LONG over the bar (minus the sum of the funding rates paid in
  it: a short, ``x_i < 0``, receives when rates are positive). The positions held during the bar earn

      price_pnl   = sum_i x_i r_i
      funding_pnl = sum_i x_i f_i

  then drift with the price, ``x_i <- x_i (1 + r_i)`` (funding is cash and does not move notional).
* Weights decided at the asof bar ``k = rebalance_bars[j]`` (fractions of equity, negative = short)
  are executed at the CLOSE of bar ``k + lag_bars`` (``lag_bars=1``: the bar after the asof still
  earns the old, drifted positions). With ``E_pre`` the equity after that bar's pnl, the target is
  ``x* = w E_pre`` (``x* = 0`` once ``E_pre <= 0``: a ruined account does not trade again), and

      traded   = sum_i |x*_i - x_i|          (account currency)
      fees     = fee_bps / 1e4 * traded
      slippage = slippage_bps / 1e4 * traded

  charged at that bar. Rebalances whose execution bar lies past the last bar are not executed.
* ``E <- E + price_pnl + funding_pnl - fees - slippage`` each bar (``pnl`` is that increment).
* Output per bar: ``turnover = traded / E_pre`` (0 on bars without a trade);
  ``gross_leverage = sum_i |x_i| / E`` at the bar's close, after any trade;
  ``drawdown = E / max(initial_equity, running max E) - 1`` (<= 0).

Liquidation is not modelled here (see ``perpfolio.stress``). The simulation is sequential only
across rebalances: within a holding segment the drift is a ``cumprod`` of ``1 + r`` and the pnl is
a vectorized product, so the cost is O(T N) array work plus O(K N) Python-level steps.

Missing returns (NaN) are a ``DataError`` naming the bar and the symbol, unless the position held
in that symbol during the bar is zero (then the value cannot matter and is ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from perpfolio.errors import DataError

def simulate(
    bar_ts: np.ndarray,
    price_returns: np.ndarray,
    funding_returns: np.ndarray,
    rebalance_bars: np.ndarray,
    target_weights: np.ndarray,
    *,
    fee_bps: float = 5.0,
    slippage_bps: float = 2.0,
    lag_bars: int = 1,
    initial_equity: float = 1.0,
    symbols: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Simulate a book that trades to ``target_weights`` (see the module docstring for the accounting).

    Args:
        bar_ts: T bar OPEN times, ``datetime64[us]`` (UTC), strictly increasing.
        price_returns: T x N SIMPLE per-bar price returns.
        funding_returns: T x N per-bar funding returns of a long position (simple, not annualized).
        rebalance_bars: K strictly ascending indices of the asof bars.
        target_weights: K x N weights decided at each asof, fractions of equity.
        fee_bps, slippage_bps: costs per unit of traded notional, in basis points.
        lag_bars: execution at the close of bar ``asof + lag_bars`` (0 = at the asof bar's close).
        initial_equity: equity before bar 0 (equity units).
        symbols: N names used in error messages only (default: column indices).

    Returns:
        One row per bar: ts (Datetime us UTC), equity, pnl, price_pnl, funding_pnl, fees, slippage
        (equity units, per bar), turnover (traded / equity), gross_leverage, drawdown (fractions).
    """
    r, f, reb, w = _validate(bar_ts, price_returns, funding_returns, rebalance_bars, target_weights,
                             fee_bps=fee_bps, slippage_bps=slippage_bps, lag_bars=lag_bars,
                             initial_equity=initial_equity, symbols=symbols)
    n_bars, n_sym = r.shape
    exec_bars = reb + lag_bars
    keep = exec_bars < n_bars
    exec_bars, w = exec_bars[keep], w[keep]
    # held[t]: index of the last execution strictly before bar t (-1: flat, before the first trade).
    held = np.searchsorted(exec_bars, np.arange(n_bars), side="left") - 1
    missing = np.isnan(r) | np.isnan(f)
    if missing.any():
        _check_missing(r, f, missing, held, w, bar_ts, symbols)
        r = np.where(missing, 0.0, r)  # only where the held position is zero (checked above)
        f = np.where(missing, 0.0, f)

    # growth[t] = prod of (1 + r) from the segment's first bar through bar t; growth_prev: through t-1.
    growth = np.ones((n_bars, n_sym))
    seg_starts = exec_bars + 1
    seg_ends = np.append(exec_bars[1:] + 1, n_bars)
    for a, b in zip(seg_starts, seg_ends):
        if a < b:
            np.cumprod(r[a:b] + 1.0, axis=0, out=growth[a:b])
    growth_prev = np.vstack([np.ones((1, n_sym)), growth[:-1]])
    growth_prev[seg_starts[seg_starts < n_bars]] = 1.0
    price_coef = growth_prev * r  # price_pnl[t] = x0[held[t]] . price_coef[t]
    fund_coef = growth_prev * f

    # Sequential part, one step per execution: pnl of the segment that ends at the execution bar.
    n_exec = len(exec_bars)
    seg_pnl_coef = (np.add.reduceat((price_coef + fund_coef)[: exec_bars[-1] + 1],
                                    np.append(0, exec_bars[:-1] + 1), axis=0)
                    if n_exec else np.zeros((0, n_sym)))
    x0 = np.zeros((n_exec + 1, n_sym))  # row j: positions right after execution j; last row: flat
    traded = np.zeros(n_exec)
    e_pre = np.zeros(n_exec)
    equity = float(initial_equity)
    x_prev = x0[-1]
    for j, e in enumerate(exec_bars):
        equity += x_prev @ seg_pnl_coef[j]
        drifted = x_prev * growth[e]
        target = w[j] * equity if equity > 0 else np.zeros(n_sym)
        traded[j] = np.abs(target - drifted).sum()
        e_pre[j] = equity
        equity -= (fee_bps + slippage_bps) / 1e4 * traded[j]
        x0[j] = target
        x_prev = target

    x_held = x0[held]  # held == -1 picks the flat last row
    price_pnl = np.einsum("tn,tn->t", x_held, price_coef)
    funding_pnl = np.einsum("tn,tn->t", x_held, fund_coef)
    traded_bar = np.zeros(n_bars)
    traded_bar[exec_bars] = traded
    fees = fee_bps / 1e4 * traded_bar
    slippage = slippage_bps / 1e4 * traded_bar
    pnl = price_pnl + funding_pnl - fees - slippage
    eq = initial_equity + np.cumsum(pnl)
    turnover = np.zeros(n_bars)
    turnover[exec_bars] = np.divide(traded, e_pre, out=np.zeros(n_exec), where=e_pre > 0)
    gross = np.abs(x_held * growth).sum(axis=1)
    gross[exec_bars] = np.abs(x0[:n_exec]).sum(axis=1)
    peak = np.maximum(np.maximum.accumulate(eq), initial_equity)
    return pl.DataFrame({
        "ts": pl.Series(bar_ts).dt.replace_time_zone("UTC"),
        "equity": eq,
        "pnl": pnl,
        "price_pnl": price_pnl,
        "funding_pnl": funding_pnl,
        "fees": fees,
        "slippage": slippage,
        "turnover": turnover,
        "gross_leverage": gross / eq,
        "drawdown": eq / peak - 1.0,
    })


def performance_metrics(equity: pl.DataFrame, *, periods_per_year: float) -> dict[str, float]:
    """Summary statistics of one equity path from :func:`simulate`.

    Bar returns ``r_t = E_t / E_{t-1} - 1`` (simple, per bar) over all T rows, with
    ``E_{-1} = E_0 - pnl_0`` the initial equity; ``ppy = periods_per_year`` (8760 / bar_hours).

    * ann_return = (E_T / E_{-1})^(ppy / T) - 1
    * ann_vol = std(r, ddof=1) * sqrt(ppy)
    * sharpe = mean(r) / std(r, ddof=1) * sqrt(ppy)   (risk-free rate 0; NaN if std == 0)
    * sortino = mean(r) / sqrt(mean(min(0, r)^2)) * sqrt(ppy)   (NaN if no negative bar)
    * max_drawdown = -min(E_t / max(E_{-1}, max_{s<=t} E_s) - 1): POSITIVE magnitude (0.2 = -20%)
    * max_loss = -min(r): worst single-bar return as a POSITIVE loss (negative if no bar lost)
    * cvar_95 = -mean of the ceil(5% T) worst bar returns: a POSITIVE loss
    * turnover = (sum_t traded_t / mean(E)) * ppy / T: annualized multiples of equity traded, with
      traded_t = turnover_t * (E_t + fees_t + slippage_t)  (the pre-cost equity of the trade)
    * funding_pnl = sum of funding_pnl; costs = sum of fees + slippage (equity units, totals, >= 0)
    """
    missing = [c for c in ("ts", "equity", "pnl", "funding_pnl", "fees", "slippage", "turnover")
               if c not in equity.columns]
    if missing:
        raise DataError(f"performance_metrics: equity frame lacks columns {missing}")
    if equity.height < 2:
        raise DataError(f"performance_metrics: need at least 2 bars, got {equity.height}")
    if periods_per_year <= 0:
        raise DataError(f"performance_metrics: periods_per_year must be > 0, got {periods_per_year}")
    ts = equity["ts"].to_numpy()
    if not np.all(ts[1:] > ts[:-1]):
        raise DataError("performance_metrics: ts must be strictly increasing (one strategy per call)")
    eq = equity["equity"].to_numpy().astype(float)
    if not np.all(np.isfinite(eq)):
        raise DataError("performance_metrics: equity contains NaN or inf")
    start = eq[0] - float(equity["pnl"][0])
    path = np.concatenate([[start], eq])
    if np.any(path[:-1] <= 0):
        raise DataError("performance_metrics: equity reaches <= 0; bar returns are undefined after ruin")
    ret = path[1:] / path[:-1] - 1.0
    n, ppy = len(ret), float(periods_per_year)
    std = ret.std(ddof=1)
    down = np.sqrt(np.mean(np.minimum(ret, 0.0) ** 2))
    drawdown = path / np.maximum.accumulate(path) - 1.0
    tail = np.sort(ret)[: int(np.ceil(0.05 * n))]
    fees, slip = equity["fees"].to_numpy(), equity["slippage"].to_numpy()
    traded = equity["turnover"].to_numpy() * (eq + fees + slip)
    return {
        "sharpe": float(ret.mean() / std * np.sqrt(ppy)) if std > 0 else float("nan"),
        "sortino": float(ret.mean() / down * np.sqrt(ppy)) if down > 0 else float("nan"),
        "ann_return": float((path[-1] / path[0]) ** (ppy / n) - 1.0),
        "ann_vol": float(std * np.sqrt(ppy)),
        "max_drawdown": float(-drawdown.min()),
        "max_loss": float(-ret.min()),
        "turnover": float(traded.sum() / eq.mean() * ppy / n),
        "cvar_95": float(-tail.mean()),
        "funding_pnl": float(equity["funding_pnl"].sum()),
        "costs": float(fees.sum() + slip.sum()),
    }


def _validate(bar_ts, price_returns, funding_returns, rebalance_bars, target_weights, *,
              fee_bps, slippage_bps, lag_bars, initial_equity, symbols):
    r = np.asarray(price_returns, dtype=float)
    f = np.asarray(funding_returns, dtype=float)
    w = np.asarray(target_weights, dtype=float)
    reb = np.asarray(rebalance_bars)
    ts = np.asarray(bar_ts)
    if r.ndim != 2:
        raise DataError(f"simulate: price_returns must be T x N, got shape {r.shape}")
    n_bars, n_sym = r.shape
    if f.shape != r.shape:
        raise DataError(f"simulate: funding_returns shape {f.shape} != price_returns shape {r.shape}")
    if ts.dtype != np.dtype("datetime64[us]") or ts.shape != (n_bars,):
        raise DataError(f"simulate: bar_ts must be {n_bars} datetime64[us] values, got {ts.dtype} {ts.shape}")
    if n_bars > 1 and not np.all(ts[1:] > ts[:-1]):
        raise DataError("simulate: bar_ts must be strictly increasing")
    if reb.ndim != 1 or not np.issubdtype(reb.dtype, np.integer):
        raise DataError(f"simulate: rebalance_bars must be a 1-d integer array, got {reb.dtype} {reb.shape}")
    if w.shape != (len(reb), n_sym):
        raise DataError(f"simulate: target_weights shape {w.shape} != ({len(reb)}, {n_sym})")
    if len(reb) and (reb[0] < 0 or reb[-1] >= n_bars or np.any(np.diff(reb) <= 0)):
        raise DataError(f"simulate: rebalance_bars must be strictly ascending in [0, {n_bars}), got {reb}")
    if symbols is not None and len(symbols) != n_sym:
        raise DataError(f"simulate: {len(symbols)} symbols for {n_sym} columns")
    if not np.isfinite(w).all():
        j, i = np.argwhere(~np.isfinite(w))[0]
        raise DataError(f"simulate: target_weights[{j}] for {_name(symbols, i)} is {w[j, i]}")
    for name, arr in (("price_returns", r), ("funding_returns", f)):
        if np.isinf(arr).any():
            t, i = np.argwhere(np.isinf(arr))[0]
            raise DataError(f"simulate: {name} is {arr[t, i]} at bar {t} ({ts[t]}) for {_name(symbols, i)}")
    if isinstance(lag_bars, bool) or not isinstance(lag_bars, (int, np.integer)) or lag_bars < 0:
        raise DataError(f"simulate: lag_bars must be an integer >= 0, got {lag_bars!r}")
    if fee_bps < 0 or slippage_bps < 0:
        raise DataError(f"simulate: fee_bps and slippage_bps must be >= 0, got {fee_bps}, {slippage_bps}")
    if not initial_equity > 0:
        raise DataError(f"simulate: initial_equity must be > 0, got {initial_equity}")
    return r, f, reb.astype(np.int64), w


def _check_missing(r, f, missing, held, w, bar_ts, symbols):
    """NaN return/funding where the held position is nonzero -> DataError naming bar and symbol."""
    w_held = np.vstack([w, np.zeros((1, w.shape[1]))])[held]
    bad = np.argwhere(missing & (w_held != 0))
    if len(bad):
        t, i = bad[0]
        what = "price_return" if np.isnan(r[t, i]) else "funding_return"
        raise DataError(
            f"simulate: {what} is NaN at bar {t} ({bar_ts[t]}) for {_name(symbols, i)}, which holds a "
            f"position (weight {w_held[t, i]}); pass gap-spanning returns instead of NaN"
        )


def _name(symbols, i) -> str:
    return f"symbol {symbols[i]!r}" if symbols is not None else f"column {i}"
