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
  ``x* = m w E_pre`` (``x* = 0`` once ``E_pre <= 0``: a ruined account does not trade again), with
  the sizing multiplier ``m = 1`` unless a sizing rule is given (below), and

      traded   = sum_i |x*_i - x_i|          (account currency)
      fees     = fee_bps / 1e4 * traded
      slippage = slippage_bps / 1e4 * sum_i s_i |x*_i - x_i|   (s_i = slippage_scale, 1 by default)

  charged at that bar. Rebalances whose execution bar lies past the last bar are not executed.
* ``E <- E + interest + price_pnl + funding_pnl - fees - slippage`` each bar (``pnl`` is that
  increment), ``interest = c E_prev`` with ``c = cash_rate_per_bar`` (0 by default). With
  ``D_t = (1 + c)^(t+1)`` this is ``E_t = D_t (E_init + sum_{s<=t} g_s / D_s)``, ``g`` the trading
  pnl, which keeps the segment-wise vectorization (and is the plain cumulative sum when c = 0).
* Output per bar: ``turnover = traded / E_pre`` (0 on bars without a trade);
  ``gross_leverage = sum_i |x_i| / E`` at the bar's close, after any trade;
  ``drawdown = E / max(initial_equity, running max E) - 1`` (<= 0).

* Optional position sizing (``sizing``, a :class:`perpfolio.optimize.sizing.SizingRule`; off by
  default): ``m_j = lambda_j (1 - c_j)`` at execution j, from what is known at its decision asof
  ``k_j`` only. ``lambda_j = min(L_max, sigma* / sqrt(w_j' S_j w_j))`` with ``S_j`` the predicted
  (annualized) covariance of asof ``k_j`` (``predicted_cov``; 1 with vol targeting off);
  ``c_j = min(c_max, c_0 + k_dd |DD_j| + k_vol (sigma_hat_j / sigma* - 1)^+)`` (0 with the cash
  buffer off), where ``DD_j`` is the account's OWN drawdown at the close of bar ``k_j`` (bar
  ``k_j - 1`` when ``lag_bars = 0``, whose asof bar is the execution bar; 0 before bar 0), i.e.
  ``E / max(initial_equity, running max E) - 1`` through that bar. Within a holding segment the
  drawdown only needs the segment's per-bar equity, computed vectorized when the buffer is on.
  The notional not deployed (``1 - m`` of the target) stays as equity earning the cash rate like
  the rest (perpetuals are unfunded: the whole equity is collateral). Output per bar:
  ``sizing_leverage = lambda`` and ``cash_fraction = c`` of the latest execution at or before the
  bar (1 and 0 before the first execution and without sizing).

* Optional stop-loss (``stop_loss``, off by default): a position opened (or resized) at an
  execution is closed at the CLOSE of the first later bar where its price move since that
  execution reaches ``-stop_loss`` against it (long: ``prod(1 + r) - 1 <= -stop_loss``; short:
  ``>= +stop_loss``). The bar earns its pnl, the closing trade ``|x_i|`` (drifted notional) pays
  fees and slippage at that bar, and the symbol stays flat until the next execution. The next
  execution bar itself is not checked (the rebalance trades there anyway). ``stops`` counts the
  positions stopped in each bar.

Liquidation is not modelled here (see ``perpfolio.stress``). The simulation is sequential only
across rebalances: within a holding segment the drift is a ``cumprod`` of ``1 + r`` and the pnl is
a vectorized product, so the cost is O(T N) array work plus O(K N) Python-level steps.

Missing prices (a NaN price return: the symbol has no bar) follow the exchange, never a guess:

* outage (more bars of the symbol follow): the position is carried at its last price (a 0
  return per missing bar), and the first bar after the hole brings the gap-spanning return (and
  the funding charged during the gap), so the position earns exactly the move over the gap;
* delisting (the symbol's last bar is ``delisted_after`` bars or more before the last bar of the
  history): the position is closed at the close of its last bar, paying fees and slippage on
  the drifted notional like a stop, and the symbol stays flat; ``delisting_closes`` counts them;
* an execution at a bar where a symbol has no price cannot trade it: the position keeps its
  drifted notional until the next execution (``untraded`` counts such positions at each
  execution), and a symbol already delisted is traded to 0.

A NaN funding return where the price return exists is a ``DataError`` naming the bar and symbol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import to_datetime64
from perpfolio.optimize.sizing import SizingRule

Frequency = Literal["hourly", "daily", "weekly", "adaptive"]
ADAPTIVE_TURBULENT_EVERY = 7  # adaptive: in a turbulent regime, trade at most every 7th decision
BASELINES = ("equal_weight", "btc_only", "static")
BASELINE_PREFIX = "baseline:"


def rebalance_plan(
    decision_bars: np.ndarray, decision_weights: np.ndarray, *, n_bars: int, frequency: Frequency,
    turbulent: np.ndarray | None = None, turbulent_every: int = ADAPTIVE_TURBULENT_EVERY,
) -> tuple[np.ndarray, np.ndarray]:
    """When the book trades back to its target, given the (daily) decisions.

    * ``daily``: at every decision bar (the decisions as they are).
    * ``weekly``: at every 7th decision, counting from the first (decisions 0, 7, 14, ...); the
      decisions in between are ignored.
    * ``hourly``: at every bar from the first decision on, to the latest decision at or before
      that bar (the drift is undone each bar; the target changes only at a decision).
    * ``adaptive``: the article's regime-dependent frequency, more often when calm and less in
      spikes: every decision whose regime is calm (``turbulent[k]`` False), and during a turbulent
      regime only a decision at least ``turbulent_every`` decisions after the last trade (the
      first decision always trades). ``turbulent`` holds one bool per decision (unknown = calm).

    Returns (rebalance_bars, target weights), the inputs of :func:`simulate`. ``decision_weights`` may
    be any per-decision array (K x ...): the same plan picks, e.g., the K x N x N predicted covariances.
    """
    bars = np.asarray(decision_bars, dtype=np.int64)
    w = np.asarray(decision_weights, dtype=float)
    if w.shape[0] != len(bars):
        raise DataError(f"rebalance_plan: {len(bars)} decision bars but {w.shape[0]} weight rows")
    if frequency == "daily" or not len(bars):
        return bars, w
    if frequency == "weekly":
        return bars[::7], w[::7]
    if frequency == "hourly":
        every = np.arange(bars[0], n_bars, dtype=np.int64)
        return every, w[np.searchsorted(bars, every, side="right") - 1]
    if frequency == "adaptive":
        if turbulent is None or len(turbulent) != len(bars):
            raise DataError(f"rebalance_plan: adaptive needs one regime flag per decision ({len(bars)}), "
                            f"got {None if turbulent is None else len(turbulent)}")
        if turbulent_every < 1:
            raise ConfigError(f"rebalance_plan: turbulent_every must be >= 1, got {turbulent_every}")
        keep, last = [], None
        for k, stressed in enumerate(np.asarray(turbulent, dtype=bool)):
            if last is None or not stressed or k - last >= turbulent_every:
                keep.append(k)
                last = k
        return bars[keep], w[keep]
    raise ConfigError(f"rebalance_plan: frequency must be hourly, daily, weekly or adaptive, got {frequency!r}")


def baseline_weights(
    kind: str, symbols: Sequence[str], n_decisions: int, *, static: Mapping[str, float] | None = None,
    btc: str = "BTCUSDT", members: np.ndarray | None = None,
) -> np.ndarray:
    """K x N target weights of a baseline book (fractions of equity), constant unless the
    point-in-time universe changes.

    * ``equal_weight``: 1/n in each of the n symbols in the universe (flat when none is).
    * ``btc_only``: 1 in ``btc`` (ConfigError when it is not in ``symbols``); flat while it is out
      of the universe.
    * ``static``: the given ``{symbol: weight}`` (symbols not listed get 0; a listed symbol that is
      not in ``symbols`` is a ConfigError), used as given while all its symbols are in the
      universe; otherwise the weights of the symbols in it, rescaled to the configured total
      (left as they are when they sum to 0).

    ``members``: K x N universe (default: every symbol at every decision).
    """
    n = len(symbols)
    members = np.ones((n_decisions, n), dtype=bool) if members is None else np.asarray(members, dtype=bool)
    if members.shape != (n_decisions, n):
        raise DataError(f"baseline_weights: members must be {n_decisions} x {n}, got {members.shape}")
    if kind == "equal_weight":
        return members / np.maximum(members.sum(axis=1, keepdims=True), 1)
    if kind == "btc_only":
        if btc not in symbols:
            raise ConfigError(f"baseline btc_only: {btc} is not among the symbols {list(symbols)}")
        return members * (np.asarray(symbols) == btc).astype(float)
    elif kind == "static":
        if not static:
            raise ConfigError("baseline static: no static weights given (PERPFOLIO_STATIC_WEIGHTS)")
        unknown = [s for s in static if s not in symbols]
        if unknown:
            raise ConfigError(f"baseline static: weights for {unknown} but the symbols are {list(symbols)}; "
                              "set PERPFOLIO_STATIC_WEIGHTS or drop 'static' from PERPFOLIO_BASELINES")
        row = np.array([float(static.get(s, 0.0)) for s in symbols])
        if not np.isfinite(row).all():
            raise ConfigError(f"baseline static: weights must be finite, got {dict(static)}")
        kept = members * row
        complete = (members | (row == 0)).all(axis=1, keepdims=True)
        kept_total = kept.sum(axis=1, keepdims=True)
        rescale = np.where(kept_total != 0, row.sum() / np.where(kept_total != 0, kept_total, 1.0), 1.0)
        return np.where(complete, row, kept * rescale)
    raise ConfigError(f"unknown baseline {kind!r}; choose from {BASELINES}")

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
    stop_loss: float | None = None,
    slippage_scale: np.ndarray | None = None,
    cash_rate_per_bar: float = 0.0,
    sizing: SizingRule | None = None,
    predicted_cov: np.ndarray | None = None,
    delisted_after: int = 24,
    by_symbol: bool = False,
) -> pl.DataFrame | tuple[pl.DataFrame, pl.DataFrame]:
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
        stop_loss: maximum loss per position and trade as a fraction of its entry notional
            (0.1 = close after a 10% adverse price move); None (default) = no stop.
        slippage_scale: K x N positive multipliers of ``slippage_bps`` per rebalance and symbol
            (e.g. current / typical volatility), applied to the trades of that execution and to
            stop-loss closes of the positions it opened; None (default) = 1 everywhere.
        cash_rate_per_bar: interest on the account's equity per bar (collateral earning a rate),
            ``interest_t = c E_{t-1}``; 0 (default) = cash earns nothing.
        sizing: scale each target by ``lambda (1 - c)`` (module docstring); None (default) = as given.
        predicted_cov: K x N x N predicted ANNUALIZED covariances at each asof (rows as
            ``rebalance_bars``), required when ``sizing.target_vol`` is set; NaN rows = unknown.
        delisted_after: a symbol whose last bar lies this many bars (or more) before the last bar
            of the history is delisted at its last bar (module docstring); a shorter silence at the
            end is an outage in progress. Default 24 (a day of hourly bars).
        by_symbol: also return each symbol's share of the run's totals (below); False (default) =
            the per-bar frame only.

    Returns:
        One row per bar: ts (Datetime us UTC), equity, pnl, price_pnl, funding_pnl, fees, slippage
        (equity units, per bar), turnover (traded / pre-cost equity), gross_leverage, drawdown
        (fractions), stops (positions closed by the stop-loss in the bar), interest (equity units),
        sizing_leverage and cash_fraction (the sizing in force: lambda and c), delisting_closes
        (positions closed at a delisting in the bar) and untraded (positions an execution in the
        bar could not trade: no price).
        With ``by_symbol``: ``(that frame, per-symbol totals)``, one row per symbol (``symbols``, or
        the column indices as text) with price_pnl = sum_t x_it r_it, funding_pnl = sum_t x_it f_it,
        fees = fee_bps/1e4 sum |trade_i| and slippage = slippage_bps/1e4 sum s_i |trade_i| (equity
        units) over every trade of the symbol: rebalances, stop-loss and delisting closes. Each
        column sums over the symbols to the frame's column total (the interest is the account's, not
        a symbol's).
    """
    if stop_loss is not None and not 0 < stop_loss < 1:
        raise DataError(f"simulate: stop_loss must be in (0, 1) or None, got {stop_loss}")
    if not (np.isfinite(cash_rate_per_bar) and cash_rate_per_bar > -1):
        raise DataError(f"simulate: cash_rate_per_bar must be a finite rate > -1, got {cash_rate_per_bar}")
    if isinstance(delisted_after, bool) or not isinstance(delisted_after, (int, np.integer)) or delisted_after < 1:
        raise DataError(f"simulate: delisted_after must be an integer >= 1 (bars), got {delisted_after!r}")
    r, f, reb, w = _validate(bar_ts, price_returns, funding_returns, rebalance_bars, target_weights,
                             fee_bps=fee_bps, slippage_bps=slippage_bps, lag_bars=lag_bars,
                             initial_equity=initial_equity, symbols=symbols)
    n_bars, n_sym = r.shape
    scale = np.ones_like(w) if slippage_scale is None else np.asarray(slippage_scale, dtype=float)
    if scale.shape != w.shape or not (np.isfinite(scale).all() and (scale > 0).all()):
        raise DataError(f"simulate: slippage_scale must be {w.shape} finite positive multipliers, got shape {scale.shape}")
    lev, vol = _sizing_inputs(sizing, predicted_cov, w, reb)
    exec_bars = reb + lag_bars
    keep = exec_bars < n_bars
    exec_bars, w, scale, lev, vol = exec_bars[keep], w[keep], scale[keep], lev[keep], vol[keep]
    dd_bars = reb[keep] - (1 if lag_bars == 0 else 0)  # the bar whose close gives each decision's drawdown
    # held[t]: index of the last execution strictly before bar t (-1: flat, before the first trade).
    held = np.searchsorted(exec_bars, np.arange(n_bars), side="left") - 1
    priced = ~np.isnan(r)
    delist_bar = np.full(n_sym, n_bars)  # no delisting
    if not priced.all():
        _check_funding(f, priced, bar_ts, symbols)
        r, f = np.where(priced, r, 0.0), np.where(priced, f, 0.0)  # no bar: carried at the last price
        last_bar = np.where(priced.any(axis=0), n_bars - 1 - np.argmax(priced[::-1], axis=0), -1)
        delist_bar = np.where((last_bar >= 0) & (n_bars - 1 - last_bar >= delisted_after), last_bar, n_bars)
    elif np.isnan(f).any():
        _check_funding(f, priced, bar_ts, symbols)
    tradable = priced[exec_bars] if len(exec_bars) else np.zeros((0, n_sym), dtype=bool)
    gone = delist_bar[None, :] <= exec_bars[:, None]  # delisted at or before the execution: trade to 0

    # growth[t] = prod of (1 + r) from the segment's first bar through bar t; growth_prev: through t-1.
    growth = np.ones((n_bars, n_sym))
    seg_starts = exec_bars + 1
    seg_ends = np.append(exec_bars[1:] + 1, n_bars)
    for a, b in zip(seg_starts, seg_ends):
        if a < b:
            np.cumprod(r[a:b] + 1.0, axis=0, out=growth[a:b])
    stop_coef = np.zeros((n_bars, n_sym))  # |x0| . stop_coef[t] = notional closed by stops at bar t
    if stop_loss is not None and len(exec_bars):
        growth, stop_coef = _apply_stops(growth, np.sign(w), exec_bars, stop_loss)
    delist_coef = None
    if (delist_bar < n_bars).any():
        growth, delist_coef = _apply_delistings(growth, exec_bars, delist_bar)
    # |x0| . close_coef[t] = notional closed at bar t (stops, delistings)
    close_coef = stop_coef if delist_coef is None else stop_coef + delist_coef
    growth_prev = np.vstack([np.ones((1, n_sym)), growth[:-1]])
    growth_prev[seg_starts[seg_starts < n_bars]] = 1.0
    price_coef = growth_prev * r  # price_pnl[t] = x0[held[t]] . price_coef[t]
    fund_coef = growth_prev * f
    fee_rate, slip_rate = fee_bps / 1e4, slippage_bps / 1e4

    # Sequential part, one step per execution: pnl of the segment that ends at the execution bar.
    n_exec = len(exec_bars)
    growth_cash = (1.0 + cash_rate_per_bar) ** np.arange(1, n_bars + 1)  # D_t: one bar of interest per bar
    disc = 1.0 / growth_cash[:, None]
    pnl_disc, stop_disc = (price_coef + fund_coef) * disc, close_coef * disc
    seg_pnl_coef = (np.add.reduceat(pnl_disc[: exec_bars[-1] + 1], np.append(0, exec_bars[:-1] + 1), axis=0)
                    if n_exec else np.zeros((0, n_sym)))
    seg_stop_coef = (np.add.reduceat(stop_disc[: exec_bars[-1] + 1], np.append(0, exec_bars[:-1] + 1), axis=0)
                     if n_exec else np.zeros((0, n_sym)))
    x0 = np.zeros((n_exec + 1, n_sym))  # row j: positions right after execution j; last row: flat
    scale_rows = np.vstack([scale, np.ones((1, n_sym))])  # slippage multipliers, same rows as x0
    traded = np.zeros(n_exec)
    traded_scaled = np.zeros(n_exec)  # sum_i scale_ji |trade_i|: the notional slippage is charged on
    trades = np.zeros((n_exec, n_sym))  # |trade_i| of each execution (the per-symbol costs)
    e_pre = np.zeros(n_exec)
    cash = np.zeros(n_exec)  # c_j of each execution (0 without a cash buffer)
    untraded = np.zeros(n_exec, dtype=np.int64)
    drawdown_path = _DrawdownPath(n_bars, initial_equity) if sizing is not None and sizing.cash_buffer else None
    equity, d_prev = float(initial_equity), 1.0  # equity after the previous execution, and D there
    x_prev, s_prev = x0[-1], scale_rows[-1]
    for j, e in enumerate(exec_bars):
        if drawdown_path is not None:  # equity of the bars before e (positions x_prev), then c_j from DD at dd_bars[j]
            cost_weights = np.abs(x_prev) * (fee_rate + slip_rate * s_prev)
            drawdown_path.extend(e, equity / d_prev, growth_cash, pnl_disc, stop_disc, x_prev, cost_weights)
            cash[j] = sizing.cash_fraction(drawdown_path.at(dd_bars[j]), vol[j])
        stopped = np.abs(x_prev) * seg_stop_coef[j]
        discounted = equity / d_prev + x_prev @ seg_pnl_coef[j] - fee_rate * stopped.sum() - slip_rate * (s_prev @ stopped)
        equity, d_prev = growth_cash[e] * discounted, growth_cash[e]
        drifted = x_prev * growth[e]
        target = (lev[j] * (1.0 - cash[j])) * w[j] * equity if equity > 0 else np.zeros(n_sym)
        target = np.where(gone[j], 0.0, np.where(tradable[j], target, drifted))
        untraded[j] = int(np.sum(~tradable[j] & ~gone[j] & (drifted != 0)))
        trade = np.abs(target - drifted)
        traded[j], traded_scaled[j] = trade.sum(), scale[j] @ trade
        trades[j] = trade
        e_pre[j] = equity
        equity -= fee_rate * traded[j] + slip_rate * traded_scaled[j]
        x0[j] = target
        x_prev, s_prev = target, scale[j]
        if drawdown_path is not None:
            drawdown_path.close_execution(e, equity)

    x_held = x0[held]  # held == -1 picks the flat last row
    price_pnl = np.einsum("tn,tn->t", x_held, price_coef)
    funding_pnl = np.einsum("tn,tn->t", x_held, fund_coef)
    traded_bar = np.einsum("tn,tn->t", np.abs(x_held), close_coef)
    scaled_bar = np.einsum("tn,tn->t", np.abs(x_held) * scale_rows[held], close_coef)
    traded_bar[exec_bars] += traded
    scaled_bar[exec_bars] += traded_scaled
    fees = fee_rate * traded_bar
    slippage = slip_rate * scaled_bar
    trading = price_pnl + funding_pnl - fees - slippage
    eq = growth_cash * (initial_equity + np.cumsum(trading / growth_cash))
    interest = cash_rate_per_bar * np.concatenate([[initial_equity], eq[:-1]])
    pnl = trading + interest
    pre_cost = eq + fees + slippage
    turnover = np.divide(traded_bar, pre_cost, out=np.zeros(n_bars), where=pre_cost > 0)
    turnover[exec_bars] = np.divide(traded, e_pre, out=np.zeros(n_exec), where=e_pre > 0)
    stops = ((stop_coef > 0) & (x_held != 0)).sum(axis=1)
    delisting_closes = (np.zeros(n_bars, dtype=np.int64) if delist_coef is None
                        else ((delist_coef > 0) & (x_held != 0)).sum(axis=1))
    untraded_bar = np.zeros(n_bars, dtype=np.int64)
    untraded_bar[exec_bars] = untraded
    gross = np.abs(x_held * growth).sum(axis=1)
    gross[exec_bars] = np.abs(x0[:n_exec]).sum(axis=1)
    peak = np.maximum(np.maximum.accumulate(eq), initial_equity)
    in_force = np.searchsorted(exec_bars, np.arange(n_bars), side="right") - 1  # latest execution at or before t
    frame = pl.DataFrame({
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
        "stops": stops.astype(np.int64),
        "interest": interest,
        "sizing_leverage": np.append(lev, 1.0)[in_force],
        "cash_fraction": np.append(cash, 0.0)[in_force],
        "delisting_closes": delisting_closes.astype(np.int64),
        "untraded": untraded_bar,
    })
    if not by_symbol:
        return frame
    closed = np.abs(x_held) * close_coef  # notional closed by stops and delistings, per bar and symbol
    per_symbol = pl.DataFrame({
        "symbol": list(symbols) if symbols is not None else [str(i) for i in range(n_sym)],
        "price_pnl": (x_held * price_coef).sum(axis=0),
        "funding_pnl": (x_held * fund_coef).sum(axis=0),
        "fees": fee_rate * (closed.sum(axis=0) + trades.sum(axis=0)),
        "slippage": slip_rate * ((closed * scale_rows[held]).sum(axis=0) + (scale * trades).sum(axis=0)),
    })
    return frame, per_symbol


def _sizing_inputs(sizing: SizingRule | None, predicted_cov: np.ndarray | None, w: np.ndarray,
                   rebalance_bars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lambda, predicted book vol) per rebalance: (1, NaN) without sizing; validates ``predicted_cov``."""
    k, n = w.shape
    if sizing is None:
        if predicted_cov is not None:
            raise DataError("simulate: predicted_cov is given but no sizing rule uses it (pass sizing=SizingRule(...))")
        return np.ones(k), np.full(k, np.nan)
    cov = None
    if predicted_cov is not None:
        cov = np.asarray(predicted_cov, dtype=float)
        if cov.shape != (k, n, n):
            raise DataError(f"simulate: predicted_cov must be {k} x {n} x {n} (one covariance per rebalance), got {cov.shape}")
        unknown = ~np.isfinite(cov).all(axis=(1, 2))
        if unknown.any() and np.isinf(cov[unknown]).any():
            j = int(np.flatnonzero(unknown)[np.isinf(cov[unknown]).any(axis=(1, 2))][0])
            raise DataError(f"simulate: predicted_cov at rebalance {j} (asof bar {rebalance_bars[j]}) is infinite; "
                            "NaN marks an unknown prediction")
    return sizing.leverage(w, cov)


class _DrawdownPath:
    """Per-bar equity and running peak, filled one holding segment at a time inside the execution loop.

    ``extend(e, ...)`` fills the bars not filled yet before bar ``e`` held at positions ``x`` (the same
    closed form as the output: ``E_t = D_t (E_a/D_a + sum g_s / D_s)``, ``g = x . pnl + stop costs``);
    ``close_execution(e, E)`` records the post-trade equity of the execution bar; ``at(t)`` is
    ``E_t / max(E_init, max_{s<=t} E_s) - 1`` (0 for t < 0).
    """

    def __init__(self, n_bars: int, initial_equity: float) -> None:
        self.equity = np.empty(n_bars)
        self.peak = np.empty(n_bars)
        self.filled = 0  # bars [0, filled) are known
        self.running_peak = float(initial_equity)

    def extend(self, e, start_discounted, growth_cash, pnl_disc, stop_disc, x, cost_weights) -> None:
        a = self.filled
        if a >= e:
            return
        g = pnl_disc[a:e] @ x - stop_disc[a:e] @ cost_weights
        self.equity[a:e] = growth_cash[a:e] * (start_discounted + np.cumsum(g))
        self.peak[a:e] = np.maximum(np.maximum.accumulate(self.equity[a:e]), self.running_peak)
        self.running_peak, self.filled = float(self.peak[e - 1]), e

    def close_execution(self, e, equity: float) -> None:
        self.running_peak = max(self.running_peak, equity)
        self.equity[e], self.peak[e], self.filled = equity, self.running_peak, e + 1

    def at(self, t: int) -> float:
        return 0.0 if t < 0 else float(self.equity[t] / self.peak[t] - 1.0)


def bar_returns(equity: pl.DataFrame) -> np.ndarray:
    """Simple per-bar returns ``r_t = E_t / E_{t-1} - 1`` (T values) of one equity path from
    :func:`simulate`, with ``E_{-1} = E_0 - pnl_0`` the initial equity: the series every return
    statistic of :func:`performance_metrics` and of :mod:`perpfolio.significance` is computed on.

    Raises DataError when ts, equity or pnl is missing, there are fewer than 2 bars, ts is not
    strictly increasing (one book per call), equity is not finite or reaches <= 0 before the last bar.
    """
    missing = [c for c in ("ts", "equity", "pnl") if c not in equity.columns]
    if missing:
        raise DataError(f"bar_returns: equity frame lacks columns {missing}")
    if equity.height < 2:
        raise DataError(f"bar_returns: need at least 2 bars, got {equity.height}")
    ts = equity["ts"].to_numpy()
    if not np.all(ts[1:] > ts[:-1]):
        raise DataError("bar_returns: ts must be strictly increasing (one strategy per call)")
    eq = equity["equity"].to_numpy().astype(float)
    if not np.all(np.isfinite(eq)):
        raise DataError("bar_returns: equity contains NaN or inf")
    path = np.concatenate([[eq[0] - float(equity["pnl"][0])], eq])
    if np.any(path[:-1] <= 0):
        raise DataError("bar_returns: equity reaches <= 0; bar returns are undefined after ruin")
    return path[1:] / path[:-1] - 1.0


def return_statistics(ret: np.ndarray, *, periods_per_year: float) -> dict[str, np.ndarray]:
    """Headline statistics of simple per-bar returns ``ret`` (... x T, T >= 2) along the LAST axis,
    so one call scores one series or a whole matrix of bootstrap resamples (one per row);
    ``ppy = periods_per_year``, ``G_t = prod_{s<=t} (1 + r_s)`` the growth of one unit:

    * sharpe = mean(r) / std(r, ddof=1) * sqrt(ppy)   (annualized, rf = 0; NaN where std == 0)
    * ann_vol = std(r, ddof=1) * sqrt(ppy)
    * ann_return = G_T^(ppy / T) - 1   (geometric: the compounded annual return)
    * max_drawdown = -min_t (G_t / max(1, max_{s<=t} G_s) - 1): POSITIVE magnitude (0.2 = -20%)
    * cvar_95 = :func:`cvar` at 5%: mean loss of the ceil(5% T) worst bars, POSITIVE

    Returns arrays of shape ``ret.shape[:-1]`` (0-d for one series).
    """
    r = np.asarray(ret, dtype=float)
    n, ppy = r.shape[-1], float(periods_per_year)
    mean, std = r.mean(axis=-1), r.std(axis=-1, ddof=1)
    growth = np.cumprod(1.0 + r, axis=-1)
    peak = np.maximum(np.maximum.accumulate(growth, axis=-1), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sharpe = np.where(std > 0, mean / std * np.sqrt(ppy), np.nan)
    return {
        "sharpe": sharpe,
        "ann_vol": std * np.sqrt(ppy),
        "ann_return": growth[..., -1] ** (ppy / n) - 1.0,
        "max_drawdown": -(growth / peak - 1.0).min(axis=-1),
        "cvar_95": cvar(r, share=0.05),
    }


def cvar(ret: np.ndarray, *, share: float) -> np.ndarray:
    """Conditional value at risk of per-bar returns (... x T) along the last axis: minus the mean
    of the ceil(share T) smallest returns, a POSITIVE loss (per bar, not annualized)."""
    r = np.asarray(ret, dtype=float)
    k = int(np.ceil(share * r.shape[-1]))
    return -np.partition(r, k - 1, axis=-1)[..., :k].mean(axis=-1)


def performance_metrics(equity: pl.DataFrame, *, periods_per_year: float) -> dict[str, float]:
    """Summary statistics of one equity path from :func:`simulate`.

    Bar returns ``r_t = E_t / E_{t-1} - 1`` (simple, per bar; :func:`bar_returns`) over all T rows, with
    ``E_{-1} = E_0 - pnl_0`` the initial equity; ``ppy = periods_per_year`` (8760 / bar_hours).

    * total_return = E_T / E_{-1} - 1;  ann_return = (E_T / E_{-1})^(ppy / T) - 1
    * ann_vol = std(r, ddof=1) * sqrt(ppy)
    * sharpe = mean(r) / std(r, ddof=1) * sqrt(ppy)   (risk-free rate 0; NaN if std == 0)
    * sortino = mean(r) / sqrt(mean(min(0, r)^2)) * sqrt(ppy)   (NaN if no negative bar)
    * max_drawdown = -min(E_t / max(E_{-1}, max_{s<=t} E_s) - 1): POSITIVE magnitude (0.2 = -20%)
    * max_drawdown_duration_h = longest run of consecutive bars with E_t below its running peak,
      times the bar length 8760 / ppy hours (a drawdown still open at the end counts)
    * max_loss = -min(r): worst single-bar (hourly) return as a POSITIVE loss (negative if no bar lost)
    * max_loss_day = -min over UTC calendar days d (of the bar open ts) of E_last(d) / E_last(d-1) - 1,
      with E_last(first day - 1) = E_{-1}: worst day as a POSITIVE loss
    * cvar_95 / cvar_99 = -mean of the ceil(5% T) / ceil(1% T) worst bar returns: POSITIVE losses
    * turnover = (sum_t traded_t / mean(E)) * ppy / T: annualized multiples of equity traded, with
      traded_t = turnover_t * (E_t + fees_t + slippage_t)  (the pre-cost equity of the trade)
    * funding_pnl, fees, slippage (totals, equity units); costs = fees + slippage
    * avg_gross_leverage, max_gross_leverage: mean and max of gross_leverage over the bars
    * attribution, fractions of the initial equity E_{-1}: ret_price = sum price_pnl / E_{-1},
      ret_funding = sum funding_pnl / E_{-1}, ret_costs = -costs / E_{-1}, ret_interest = sum
      interest / E_{-1} (0 without a cash rate or an ``interest`` column);
      ret_price + ret_funding + ret_costs + ret_interest = total_return exactly (the accounting identity)
    * stops: positions closed by the stop-loss (0 without one); delisting_closes: positions closed at
      a delisting (0 without the column)
    * avg_sizing_leverage, avg_cash_fraction: means over the bars of sizing_leverage (lambda) and
      cash_fraction (c) of the sizing rule (1 and 0 without sizing or without those columns)

    sharpe, ann_vol, ann_return, max_drawdown and cvar_95 are :func:`return_statistics` of r (the
    bootstrap of :mod:`perpfolio.significance` resamples exactly these).
    """
    missing = [c for c in ("ts", "equity", "pnl", "price_pnl", "funding_pnl", "fees", "slippage", "turnover",
                           "gross_leverage") if c not in equity.columns]
    if missing:
        raise DataError(f"performance_metrics: equity frame lacks columns {missing}")
    if periods_per_year <= 0:
        raise DataError(f"performance_metrics: periods_per_year must be > 0, got {periods_per_year}")
    ret = bar_returns(equity)
    eq = equity["equity"].to_numpy().astype(float)
    start = eq[0] - float(equity["pnl"][0])
    path = np.concatenate([[start], eq])
    n, ppy = len(ret), float(periods_per_year)
    headline = {k: float(v) for k, v in return_statistics(ret, periods_per_year=ppy).items()}
    down = np.sqrt(np.mean(np.minimum(ret, 0.0) ** 2))
    drawdown = path / np.maximum.accumulate(path) - 1.0
    fees, slip = equity["fees"].to_numpy(), equity["slippage"].to_numpy()
    traded = equity["turnover"].to_numpy() * (eq + fees + slip)
    gross = equity["gross_leverage"].to_numpy()
    day_end = (equity.select(pl.col("ts").dt.date().alias("day"), "equity")
               .group_by("day", maintain_order=True).agg(pl.col("equity").last())["equity"].to_numpy())
    daily = np.concatenate([[start], day_end])
    price, funding = float(equity["price_pnl"].sum()), float(equity["funding_pnl"].sum())
    stops = float(equity["stops"].sum()) if "stops" in equity.columns else 0.0
    delisted = float(equity["delisting_closes"].sum()) if "delisting_closes" in equity.columns else 0.0
    lam = float(equity["sizing_leverage"].mean()) if "sizing_leverage" in equity.columns else 1.0
    cash = float(equity["cash_fraction"].mean()) if "cash_fraction" in equity.columns else 0.0
    return {
        "total_return": float(path[-1] / path[0] - 1.0),
        "sharpe": headline["sharpe"],
        "sortino": float(ret.mean() / down * np.sqrt(ppy)) if down > 0 else float("nan"),
        "ann_return": headline["ann_return"],
        "ann_vol": headline["ann_vol"],
        "max_drawdown": headline["max_drawdown"],
        "max_drawdown_duration_h": float(_longest_run(drawdown < 0) * 8760.0 / ppy),
        "max_loss": float(-ret.min()),
        "max_loss_day": float(-(daily[1:] / daily[:-1] - 1.0).min()),
        "turnover": float(traded.sum() / eq.mean() * ppy / n),
        "cvar_95": headline["cvar_95"],
        "cvar_99": float(cvar(ret, share=0.01)),
        "funding_pnl": funding,
        "fees": float(fees.sum()),
        "slippage": float(slip.sum()),
        "costs": float(fees.sum() + slip.sum()),
        "avg_gross_leverage": float(gross.mean()),
        "max_gross_leverage": float(gross.max()),
        "ret_price": price / start,
        "ret_funding": funding / start,
        "ret_costs": -float(fees.sum() + slip.sum()) / start,
        "ret_interest": _interest(equity) / start,
        "stops": stops,
        "delisting_closes": delisted,
        "avg_sizing_leverage": lam,
        "avg_cash_fraction": cash,
    }


REGIME_METRICS_SCHEMA = {"regime": pl.String, "bars": pl.Int64, "share": pl.Float64, "ann_return": pl.Float64,
                         "ann_vol": pl.Float64, "sharpe": pl.Float64, "cvar_95": pl.Float64, "max_loss": pl.Float64}


def regime_metrics(equity: pl.DataFrame, asofs: Sequence, regimes: Sequence[str], *,
                   periods_per_year: float) -> pl.DataFrame:
    """A book's bar returns split by the market regime in force: the regime of the latest asof
    strictly BEFORE the bar, as ``signals.signals`` decided it. The regime of asof ``a`` is computed
    from the bars up to and including the one opened at ``a``, so that bar (and any bar at or
    before the first asof) has no regime known before it and is left out: no bar helps decide its
    own label.

    Bar returns ``r_t = E_t / E_{t-1} - 1`` as in :func:`performance_metrics`; per regime:
    bars, share of the labelled bars, ann_return = mean(r) * ppy (arithmetic), ann_vol = std(r, ddof=1) *
    sqrt(ppy), sharpe = ann_return / ann_vol (NaN with fewer than 2 bars or zero vol), cvar_95 =
    -mean of the ceil(5 %) worst bars and max_loss = -min(r) (POSITIVE losses). Returns regime,
    bars, share, ann_return, ann_vol, sharpe, cvar_95, max_loss, one row per regime present.
    """
    if len(asofs) != len(regimes) or not len(asofs):
        raise DataError(f"regime_metrics: {len(asofs)} asofs for {len(regimes)} regimes (need one each, at least one)")
    path = equity.sort("ts")
    ret = bar_returns(path)
    at = np.searchsorted(to_datetime64(asofs), to_datetime64(path["ts"]), side="left") - 1
    known = at >= 0
    ret, labels = ret[known], np.asarray(regimes, dtype=object)[at[known]]
    rows = []
    for regime in sorted(set(labels.tolist())):
        r = ret[labels == regime]
        vol = r.std(ddof=1) * np.sqrt(periods_per_year) if r.size > 1 else float("nan")
        mean = r.mean() * periods_per_year
        rows.append({"regime": regime, "bars": int(r.size), "share": r.size / ret.size, "ann_return": float(mean),
                     "ann_vol": float(vol), "sharpe": float(mean / vol) if vol > 0 else float("nan"),
                     "cvar_95": float(cvar(r, share=0.05)), "max_loss": float(-r.min())})
    return pl.DataFrame(rows, schema=REGIME_METRICS_SCHEMA)


def monthly_metrics(equity: pl.DataFrame) -> pl.DataFrame:
    """Per UTC calendar month (of the bar open ts) of one equity path from :func:`simulate`.

    With ``E_0`` the equity before the month's first bar (the previous month's last equity, or the
    initial equity): total_return = E_last / E_0 - 1; ret_price, ret_funding = sums of price_pnl,
    funding_pnl over the month / E_0; ret_costs = -(fees + slippage) / E_0; ret_interest = interest
    of the month / E_0 (the four add up to total_return); max_drawdown = -min(E_t / max(E_0, max_{s<=t} E_s) - 1) within the month;
    max_loss = worst bar return of the month as a POSITIVE loss.
    Returns: month (Date, first day), total_return, ret_price, ret_funding, ret_costs, ret_interest,
    max_drawdown, max_loss.
    """
    for col in ("ts", "equity", "pnl", "price_pnl", "funding_pnl", "fees", "slippage"):
        if col not in equity.columns:
            raise DataError(f"monthly_metrics: equity frame lacks column {col!r}")
    frame = equity.sort("ts").with_columns(
        month=pl.col("ts").dt.truncate("1mo").dt.date(),
        e_prev=pl.col("equity") - pl.col("pnl"),
    )
    rows = []
    for (month,), part in frame.group_by("month", maintain_order=True):
        e0 = float(part["e_prev"][0])
        path = np.concatenate([[e0], part["equity"].to_numpy()])
        if np.any(path[:-1] <= 0):
            raise DataError(f"monthly_metrics: equity reaches <= 0 in {month}")
        costs = float(part["fees"].sum() + part["slippage"].sum())
        rows.append({
            "month": month,
            "total_return": path[-1] / e0 - 1.0,
            "ret_price": float(part["price_pnl"].sum()) / e0,
            "ret_funding": float(part["funding_pnl"].sum()) / e0,
            "ret_costs": -costs / e0,
            "ret_interest": _interest(part) / e0,
            "max_drawdown": float(-(path / np.maximum.accumulate(path) - 1.0).min()),
            "max_loss": float(-(path[1:] / path[:-1] - 1.0).min()),
        })
    return pl.DataFrame(rows)


def _interest(equity: pl.DataFrame) -> float:
    """Total interest of an equity frame (0 for frames without the column)."""
    return float(equity["interest"].sum()) if "interest" in equity.columns else 0.0


def _longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of consecutive True values."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((ends - starts).max()) if len(starts) else 0


def _apply_stops(growth, sign_w, exec_bars, stop_loss):
    """Zero the drift factor of stopped positions from their stop bar on; return (growth, stop_coef).

    Segment j holds the positions of execution j over bars exec_j + 1 .. exec_{j+1} (or the last
    bar); the stop is looked for on those bars except exec_{j+1}. ``stop_coef[t, i]`` is the drift
    factor of the closed position at its stop bar (so ``|x0_i| * stop_coef`` is the notional sold).
    """
    n_bars = growth.shape[0]
    growth = growth.copy()
    stop_coef = np.zeros_like(growth)
    ends = np.append(exec_bars[1:], n_bars)  # first bar NOT checked (next execution, or past the end)
    for j, (a, b) in enumerate(zip(exec_bars + 1, ends)):
        if a >= b or not sign_w[j].any():
            continue
        hit = sign_w[j] * (growth[a:b] - 1.0) <= -stop_loss
        hit &= sign_w[j] != 0
        cols = np.flatnonzero(hit.any(axis=0))
        first = a + hit[:, cols].argmax(axis=0)
        seg_end = min(b + 1, n_bars)
        for i, t in zip(cols, first):
            stop_coef[t, i] = growth[t, i]
            growth[t:seg_end, i] = 0.0
    return growth, stop_coef


def _apply_delistings(growth, exec_bars, delist_bar):
    """Close every position still held at its symbol's delisting bar; return (growth, close_coef).

    The position of execution j in symbol i is closed at the close of ``delist_bar[i]`` when that
    bar lies strictly inside the segment (after exec_j, before the next execution, which trades a
    delisted symbol to 0 itself): ``close_coef[L, i]`` is its drift factor there and the drift is 0
    from then on (the same mechanics as a stop)."""
    n_bars = growth.shape[0]
    growth = growth.copy()
    close_coef = np.zeros_like(growth)
    for i in np.flatnonzero(delist_bar < n_bars):
        at = int(delist_bar[i])
        j = int(np.searchsorted(exec_bars, at, side="left")) - 1  # last execution strictly before the bar
        if j < 0:
            continue
        seg_end = min(exec_bars[j + 1] + 1, n_bars) if j + 1 < len(exec_bars) else n_bars
        close_coef[at, i] = growth[at, i]
        growth[at:seg_end, i] = 0.0
    return growth, close_coef


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


def _check_funding(f, priced, bar_ts, symbols):
    """A NaN funding return on a bar that has a price -> DataError naming bar and symbol."""
    bad = np.argwhere(np.isnan(f) & priced)
    if len(bad):
        t, i = bad[0]
        raise DataError(f"simulate: funding_return is NaN at bar {t} ({bar_ts[t]}) for {_name(symbols, i)}, which has a "
                        "price return there; a bar without funding events has a funding return of 0")


def _name(symbols, i) -> str:
    return f"symbol {symbols[i]!r}" if symbols is not None else f"column {i}"


def compare(metrics: pl.DataFrame, stress: pl.DataFrame) -> pl.DataFrame:
    """One row per book: the backtest headline beside its worst stress outcome.

    Inputs: ``metrics`` (strategy, total_return, sharpe, max_drawdown, max_loss_day, cvar_99) and
    ``stress`` rows (strategy, scenario, leverage, margin_mode, account_usdt, equity_after as a
    fraction of the equity before, liquidated, capital_sufficient). Per strategy:

    * kind = "baseline" for names starting with ``baseline:``, else "strategy"; rank by Sharpe (1 = best,
      equal Sharpe ratios ranked by name)
    * excess_vs_equal_weight = total_return - total_return of ``baseline:equal_weight`` (null without it)
    * worst_scenario / worst_equity_after: the minimum equity_after over rebalances and scenarios at
      the LOWEST stressed leverage under cross margin
    * liquidations: number of stress rows that liquidate (all leverages and margin modes)
    * max_safe_leverage: the highest leverage L whose rows (every rebalance, scenario and margin mode)
      are all capital sufficient; 0 when none is
    * account_usdt: the account size (USDT) those rows were sized on, which max_safe_leverage assumes
      (tiered maintenance margin grows with the notional); one size per book, else a DataError
    """
    for frame, cols, what in ((metrics, ("strategy", "total_return", "sharpe", "max_drawdown", "max_loss_day",
                                         "cvar_99"), "metrics"),
                              (stress, ("strategy", "scenario", "leverage", "margin_mode", "account_usdt",
                                        "equity_after", "liquidated", "capital_sufficient"), "stress")):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DataError(f"compare: {what} lacks columns {missing}")
    ew = metrics.filter(pl.col("strategy") == BASELINE_PREFIX + "equal_weight")["total_return"]
    low = stress["leverage"].min()
    worst = (stress.filter((pl.col("leverage") == low) & (pl.col("margin_mode") == "cross"))
             .sort("equity_after", "scenario").group_by("strategy", maintain_order=True)
             .agg(worst_scenario=pl.col("scenario").first(), worst_equity_after=pl.col("equity_after").first()))
    safe = (stress.group_by("strategy", "leverage").agg(pl.col("capital_sufficient").all())
            .group_by("strategy").agg(max_safe_leverage=pl.col("leverage").filter(pl.col("capital_sufficient"))
                                      .max().fill_null(0.0)))
    liq = stress.group_by("strategy").agg(liquidations=pl.col("liquidated").sum().cast(pl.Int64),
                                          account_usdt=pl.col("account_usdt").first(),
                                          accounts=pl.col("account_usdt").n_unique())
    mixed = liq.filter(pl.col("accounts") > 1)["strategy"].to_list()
    if mixed:
        raise DataError(f"compare: stress rows of {mixed} were sized on different account_usdt; one size per book")
    out = (metrics.select("strategy", "total_return", "sharpe", "max_drawdown", "max_loss_day", "cvar_99")
           .with_columns(
               kind=pl.when(pl.col("strategy").str.starts_with(BASELINE_PREFIX)).then(pl.lit("baseline"))
               .otherwise(pl.lit("strategy")),
               # ties (e.g. a strategy that fell back to another's weights, or a hybrid whose cap does not bind
               # beside its uncapped overlay) are ranked by name, also when solver noise separates them (< 1e-8)
               rank=pl.struct(pl.col("sharpe").neg().round(8), "strategy").rank("ordinal").cast(pl.Int64),
               excess_vs_equal_weight=(pl.col("total_return") - ew[0]) if ew.len() else pl.lit(None, pl.Float64),
           )
           .join(worst, on="strategy", how="left").join(liq, on="strategy", how="left")
           .join(safe, on="strategy", how="left"))
    lacking = out.filter(pl.col("worst_scenario").is_null())["strategy"].to_list()
    if lacking:
        raise DataError(f"compare: no stress rows at leverage {low} (cross margin) for {lacking}")
    return out.sort("rank").select(
        "strategy", "kind", "rank", "total_return", "excess_vs_equal_weight", "sharpe", "max_drawdown",
        "max_loss_day", "cvar_99", "worst_scenario", "worst_equity_after", "liquidations", "max_safe_leverage",
        "account_usdt")
