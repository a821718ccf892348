"""Stress prediction versus what happened: every stressed book held through its holding window,
marked at the adverse intrabar extremes of its candles, against the verdict of ``risk.stress``.

**The realized path** (:func:`realized_outcomes`). A decision at asof bar ``a_k`` is executed at the
CLOSE of bar ``e_k = a_k + lag_bars`` (as in perpfolio.backtest.simulate; ``lag_bars = 1``): the book
opens ``p_i = L A w_k,i`` USDT (leverage ``L``, account ``A = account_usdt``, negative = short) at the
entry price ``P0_i`` = the close of ``e_k`` (the last close at or before it during an outage) and holds
the quantities ``q_i = p_i / P0_i`` unchanged (the notional drifts with the price) through the bars

    t = e_k + 1, ..., h_k,   h_k = e_(k+1) (the next decision's execution bar), the last bar for the last decision

so the asof bar and the execution bar are NOT in the window of decision k, and the next execution bar
IS its last bar (the positions are still on through that bar and traded at its close). ``bars_held =
h_k - e_k``; a decision whose window is empty (executed at or after the last bar) has no row. The
window follows the DECISIONS (one a day), whatever PERPFOLIO_REBALANCE says: every decision's
weights are stressed in risk.stress, so every one is held to the next decision here.

At each bar ``t`` of the window each open position is marked at its ADVERSE intrabar extreme, the
bar's ``low`` for a long and ``high`` for a short (``rho_i,t = P^adv_i,t / P0_i``, a price ratio, so
any price level works), every position at once (conservative: the extremes of different symbols need
not coincide within the bar):

    g_i,t  = p_i (rho_i,t - 1) + p_i sum_(s = e_k+1..t) (C_i,s-1 / P0_i) f_i,s       (USDT)
    MM_i,t = MM(|p_i| rho_i,t)  (the symbol's tiered bracket formula, perpfolio.stress / perpfolio.tiers)

with ``C`` the close (carried over missing bars) and ``f_i,s`` the funding return of a LONG over bar
``s`` (features.net_returns' funding_return: minus the rates settled in it), charged on the notional
at the bar's open like the backtest, so a long pays and a short receives positive rates. The funding
of bar ``t`` counts at ``t``'s extreme (it settles at the bar's end: the conservative side).

* cross (one pool): ``E_t = A + sum_i g_i,t``, ``MM_t = sum_i MM_i,t``; margin ratio ``MM_t / E_t``
  (inf when ``E_t <= 0``); liquidated at the first bar with ``E_t <= MM_t``, and the account is
  closed there (later bars do not count).
* isolated: position i has margin ``m_i = A |p_i| / sum_j |p_j|`` (the split of perpfolio.stress);
  its ratio is ``MM_i,t / (m_i + g_i,t)``; it is liquidated at the first bar with ``m_i + g_i,t <=
  MM_i,t`` and closed there, the others go on; the book's ratio at a bar is the largest of its open
  positions' (0 when none is open).

The worst margin ratio is the largest over the window (up to a liquidation), at the first bar that
reaches it (``realized_worst_ts``); ``realized_worst_symbol`` is the position that had moved most
against itself since entry at that bar (``realized_worst_move = -sign(p_i) (rho_i,t - 1)``), and
``realized_max_adverse_move`` the largest adverse move of any position over the whole window. The
same path marked at the closes only gives ``close_only_liquidated``: a liquidation that only the
wicks reveal is ``realized_liquidated and not close_only_liquidated``.

Missing bars follow the backtest: a symbol without a bar (outage) keeps its last close as its mark
(and the first bar after the hole brings the funding of the gap); a symbol delisted (its last bar
``delisted_after`` bars or more before the last bar of the history) is closed at its last close,
which locks its PnL and frees its margin; a position in a symbol delisted at or before the execution
bar, or without any close yet, is never opened (counted in ``unopened``). Weights with
``|w| <= perpfolio.stress.FLAT_WEIGHT`` are no position.

**The prediction** (:func:`predicted_verdicts`): the rows of risk.stress of the same asof, book,
leverage and margin mode, over the scenarios of kinds price, funding and volatility (the ones every
rebalance has). Replays are left out: they exist only for the latest rebalance and replay the worst
bars of the WHOLE stored history, which may lie inside that rebalance's own holding window (a
look-ahead), so they predict nothing. Predicted liquidated = any of those scenarios liquidates;
predicted margin ratio = the largest of theirs (null when one leaves no equity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.returns import returns_matrix
from perpfolio.stress import FLAT_WEIGHT, bracket_arrays, bracket_margin, held_tier_lists
from perpfolio.tiers import Tier

MARGIN_MODES = ("cross", "isolated")
PREDICTING_KINDS = ("price", "funding", "volatility")  # scenario kinds every rebalance is stressed with
KEYS = ("as_of", "strategy", "leverage", "margin_mode")
WORST_HOURS = 3  # worst realized bars named per book, leverage and margin mode in the confusion table


def candle_matrices(candles: pl.DataFrame, bar_ts: np.ndarray, symbols: Sequence[str], *,
                    bar_hours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T x N close, high and low (quote currency) of raw.candles on the bar grid ``bar_ts``
    (``datetime64[us]`` UTC bar open times), columns in ``symbols`` order; NaN where a symbol has no
    bar. The hourly candles make ``bar_hours`` bars as the returns do (perpfolio.returns): aligned to
    00:00 UTC, complete bars only, close = the last hourly close, high = the highest high, low = the
    lowest low. A candle off the grid, or a symbol with candles outside ``bar_ts``, is simply not used."""
    candles = candles.filter(pl.col("symbol").is_in(list(symbols)))
    if bar_hours > 1:
        candles = (candles.group_by("symbol", pl.col("ts").dt.truncate(f"{bar_hours}h"))
                   .agg(pl.col("close").sort_by("ts").last(), pl.col("high").max(), pl.col("low").min(),
                        hours=pl.len())
                   .filter(pl.col("hours") == bar_hours))
    out = []
    for column in ("close", "high", "low"):
        ts, found, matrix = returns_matrix(candles, column=column, bar_hours=bar_hours)
        grid = np.full((len(bar_ts), len(symbols)), np.nan)
        rows = np.searchsorted(ts, bar_ts)
        hit = (rows < len(ts)) & (ts[np.minimum(rows, len(ts) - 1)] == bar_ts) if len(ts) else np.zeros(len(bar_ts), bool)
        for j, symbol in enumerate(symbols):
            if symbol in found:
                grid[hit, j] = matrix[rows[hit], found.index(symbol)]
        out.append(grid)
    close, high, low = out
    present = np.isfinite(close)
    if (present != np.isfinite(high)).any() or (present != np.isfinite(low)).any():
        raise DataError("candle_matrices: a bar has a close but no high or low (or the other way round)")
    return close, high, low


def realized_outcomes(
    bar_ts: np.ndarray,
    close: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    funding: np.ndarray,
    asof_bars: np.ndarray,
    weights: np.ndarray,
    *,
    symbols: Sequence[str],
    leverages: Sequence[float],
    tiers: Mapping[str, Sequence[Tier]],
    account_usdt: float,
    margin_modes: Sequence[str] = MARGIN_MODES,
    lag_bars: int = 1,
    delisted_after: int = 24,
) -> tuple[pl.DataFrame, int]:
    """What the market did to each decision's positions over its holding window (module docstring).

    Args:
        bar_ts: T bar open times (``datetime64[us]``, UTC), the complete bar grid.
        close, high, low: T x N candle prices (quote currency; NaN where the symbol has no bar).
        funding: T x N funding returns of a LONG per bar (simple, not annualized; NaN where no bar).
        asof_bars: K strictly ascending bar indices of the decisions' asofs.
        weights: K x N target weights (fractions of equity, negative = short).
        symbols: N names. leverages: gross leverages L (> 0). tiers: brackets of every held symbol.
        account_usdt: the account A (USDT) the positions are sized on.
        lag_bars: execution at the close of bar ``asof + lag_bars`` (>= 0).
        delisted_after: a symbol whose last bar is this many bars or more before the last bar of the
            history is delisted at its last bar (as in perpfolio.backtest.simulate).

    Returns:
        (one row per decision with a non-empty window x leverage x margin mode: as_of, leverage,
        margin_mode, account_usdt, bars_held, realized_liquidated, realized_positions_liquidated,
        realized_liquidated_ts (first liquidation bar, null when none), close_only_liquidated,
        realized_worst_margin_ratio (null when the marks leave no equity), realized_worst_ts,
        realized_worst_symbol, realized_worst_move, realized_max_adverse_move (null for a flat book);
        the number of positions that could not be opened).
    """
    ts = np.asarray(bar_ts)
    c, h, lo, f = (np.asarray(a, dtype=float) for a in (close, high, low, funding))
    bars = np.asarray(asof_bars, dtype=np.int64)
    w = np.asarray(weights, dtype=float)
    n_bars, n = len(ts), len(symbols)
    if any(a.shape != (n_bars, n) for a in (c, h, lo, f)):
        raise DataError(f"realized_outcomes: close, high, low and funding must be {n_bars} x {n}, got "
                        f"{[a.shape for a in (c, h, lo, f)]}")
    if w.shape != (len(bars), n) or not np.isfinite(w).all():
        raise DataError(f"realized_outcomes: weights must be {len(bars)} x {n} finite values, got shape {w.shape}")
    if len(bars) and ((np.diff(bars) <= 0).any() or bars[0] < 0 or bars[-1] >= n_bars):
        raise DataError(f"realized_outcomes: asof_bars must ascend strictly within [0, {n_bars}), got {bars}")
    if not (account_usdt > 0 and all(lev > 0 for lev in leverages)):
        raise ConfigError(f"realized_outcomes: account_usdt and every leverage must be > 0, got {account_usdt}, "
                          f"{list(leverages)}")
    unknown = set(margin_modes) - set(MARGIN_MODES)
    if unknown or lag_bars < 0 or delisted_after < 1:
        raise ConfigError(f"realized_outcomes: need margin modes in {MARGIN_MODES}, lag_bars >= 0 and delisted_after "
                          f">= 1, got {list(margin_modes)}, {lag_bars}, {delisted_after}")
    marks = _marks(ts, c, h, lo, f, bars, w, symbols=symbols, lag_bars=lag_bars, delisted_after=delisted_after)
    if marks is None:
        return _empty(), 0
    brackets = bracket_arrays(held_tier_lists(symbols, marks.held.any(axis=0), tiers, "realized_outcomes"))[:3]
    frames = []
    for leverage in leverages:
        pos = (leverage * account_usdt * marks.weights)[:, None, :]
        for mode in margin_modes:
            path = _margin_path(pos, marks.rho, marks, account_usdt, mode, brackets)
            closes = _margin_path(pos, marks.rho_close, marks, account_usdt, mode, brackets)
            frames.append(_summary(path, marks, symbols).with_columns(
                leverage=pl.lit(float(leverage)), margin_mode=pl.lit(mode), account_usdt=pl.lit(float(account_usdt)),
                close_only_liquidated=pl.Series(closes.liquidated_bar.any(axis=1))))
    return pl.concat(frames).select(_empty().columns), marks.unopened


class _Path(NamedTuple):
    """Margin path of one leverage and margin mode, K decisions x W bars."""

    ratio: np.ndarray  # K x W margin ratio at the marks (inf: no equity left)
    alive_bar: np.ndarray  # K x W: the bar counts (inside the window, not after a cross liquidation)
    liquidated_bar: np.ndarray  # K x W: a liquidation happens at the bar
    positions_liquidated: np.ndarray  # K


class _Marks(NamedTuple):
    """Every kept decision's holding window, K decisions x W bars (x N symbols); see the module docstring."""

    as_of: np.ndarray  # K asof times
    bar_ts: np.ndarray  # K x W bar times (the padding past a window's end repeats its last bar)
    bars_held: np.ndarray  # K
    valid: np.ndarray  # K x W: the bar is in the window
    weights: np.ndarray  # K x N, 0 for no position (flat weights and positions that cannot be opened)
    held: np.ndarray  # K x N
    live: np.ndarray  # K x W x N: the position is open at the bar (held, not closed at a delisting)
    rho: np.ndarray  # K x W x N: adverse intrabar mark / entry price (1 where not held)
    rho_close: np.ndarray  # K x W x N: close (carried over missing bars) / entry price
    funding_cum: np.ndarray  # K x W x N: funding return paid so far per USDT of entry notional
    adverse: np.ndarray  # K x W x N: -sign(p) (rho - 1), -inf where not live
    unopened: int


def _marks(ts, c, h, lo, f, bars, w, *, symbols, lag_bars, delisted_after) -> _Marks | None:
    """The holding windows and marks of the decisions at ``bars`` (None when no window is non-empty)."""
    n_bars = len(ts)
    present = np.isfinite(c)
    carried = _carry_forward(c, present)
    last = np.where(present.any(axis=0), n_bars - 1 - np.argmax(present[::-1], axis=0), -1)
    delist = np.where((last >= 0) & (n_bars - 1 - last >= delisted_after), last, n_bars)
    execs = bars + lag_bars
    ends = np.minimum(np.append(execs[1:], n_bars - 1), n_bars - 1)  # the next execution bar is the last one held
    keep = ends > execs
    execs, ends, w, asofs = execs[keep], ends[keep], w[keep], bars[keep]
    if not len(execs):
        return None
    entry = carried[execs]  # K x N
    w = np.where(np.abs(w) > FLAT_WEIGHT, w, 0.0)
    openable = np.isfinite(entry) & (delist[None, :] > execs[:, None])
    unopened = int(((w != 0) & ~openable).sum())
    w = np.where(openable, w, 0.0)
    sign, held = np.sign(w)[:, None, :], w != 0
    steps = np.arange(1, int((ends - execs).max()) + 1)
    valid = steps[None, :] <= (ends - execs)[:, None]
    tt = np.minimum(execs[:, None] + steps[None, :], ends[:, None])
    on = present[tt] & valid[..., None]  # a bar of the symbol inside the window
    live = (tt[..., None] <= delist[None, None, :]) & valid[..., None] & held[:, None, :]
    bad = live & on & ~np.isfinite(f[tt])
    if bad.any():
        k, s, i = np.argwhere(bad)[0]
        raise DataError(f"realized_outcomes: no funding return for {symbols[i]} at {ts[tt[k, s]]} where it has a bar")
    p0 = np.where(openable, entry, 1.0)[:, None, :]
    rho = np.where(on, np.where(sign < 0, h[tt], lo[tt]), carried[tt]) / p0
    rho = np.where(held[:, None, :], rho, 1.0)
    rho_close = np.where(held[:, None, :], carried[tt] / p0, 1.0)
    step_funding = np.where(live & on, carried[tt - 1] / p0 * f[tt], 0.0)  # finite where live & on (checked above)
    return _Marks(ts[asofs], ts[tt], ends - execs, valid, w, held, live, rho, rho_close,
                  np.cumsum(step_funding, axis=1), np.where(live, -sign * (rho - 1.0), -np.inf), unopened)


def _summary(path: _Path, marks: _Marks, symbols: Sequence[str]) -> pl.DataFrame:
    """The realized columns of one leverage and margin mode, one row per decision."""
    rows = np.arange(len(marks.as_of))
    ratio = np.where(path.alive_bar, path.ratio, -1.0)
    worst_bar = ratio.argmax(axis=1)  # the first bar with the highest ratio
    worst_ratio = ratio[rows, worst_bar]
    at_worst = marks.adverse[rows, worst_bar]  # K x N
    who = at_worst.argmax(axis=1)
    named = np.isfinite(at_worst[rows, who])
    liquidated = path.liquidated_bar.any(axis=1)
    first_liq = marks.bar_ts[rows, path.liquidated_bar.argmax(axis=1)]
    most = marks.adverse.max(axis=(1, 2))
    utc = lambda values: pl.Series(values).dt.replace_time_zone("UTC")
    finite = lambda values: pl.Series(np.where(np.isfinite(values), values, np.nan)).fill_nan(None)
    return pl.DataFrame({
        "as_of": utc(marks.as_of),
        "bars_held": marks.bars_held,
        "realized_liquidated": liquidated,
        "realized_positions_liquidated": path.positions_liquidated,
        "realized_liquidated_ts": utc(np.where(liquidated, first_liq, np.datetime64("NaT"))),
        "realized_worst_margin_ratio": finite(worst_ratio),
        "realized_worst_ts": utc(marks.bar_ts[rows, worst_bar]),
        "realized_worst_symbol": pl.Series([symbols[i] if ok else None for i, ok in zip(who, named)], dtype=pl.String),
        "realized_worst_move": finite(np.where(named, at_worst[rows, who], np.nan)),
        "realized_max_adverse_move": finite(most),
    })


def _margin_path(pos, rho, marks: _Marks, account, mode, brackets) -> _Path:
    """Equity and tiered maintenance margin at the marks ``rho`` (module docstring), K x W x N."""
    floors, mmr, cum = brackets
    k, width, n = rho.shape
    live, valid = marks.live, marks.valid
    gain = pos * (rho - 1.0) + pos * marks.funding_cum  # USDT per position, locked after a delisting
    notional = np.where(live, np.abs(pos) * rho, 0.0)
    margin = bracket_margin(notional.reshape(-1, n), floors, mmr, cum).reshape(k, width, n)
    if mode == "cross":
        equity = account + gain.sum(axis=2)
        mm = margin.sum(axis=2)
        ratio = np.divide(mm, equity, out=np.full(equity.shape, np.inf), where=equity > 0)
        hit = valid & (equity <= mm)
        alive = valid & (np.cumsum(hit, axis=1) - hit == 0)  # up to and including the first liquidation
        liquidated = hit & alive
        count = (live & liquidated[..., None]).any(axis=1).sum(axis=1)  # every open position closes
        return _Path(ratio, alive, liquidated, count)
    gross = np.abs(pos).sum(axis=2, keepdims=True)
    own = np.divide(account * np.abs(pos), gross, out=np.zeros_like(pos), where=gross > 0) + gain
    hit = live & (own <= margin)
    alive = live & (np.cumsum(hit, axis=1) - hit == 0)
    liquidated = hit & alive  # each position's first liquidation
    per_position = np.divide(margin, own, out=np.full(own.shape, np.inf), where=own > 0)
    ratio = np.where(alive, per_position, 0.0).max(axis=2)
    return _Path(ratio, valid, liquidated.any(axis=2), liquidated.any(axis=1).sum(axis=1))


def _carry_forward(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """T x N: the last present value at or before each bar (NaN before the first)."""
    idx = np.maximum.accumulate(np.where(present, np.arange(len(values))[:, None], -1), axis=0)
    return np.where(idx >= 0, values[np.maximum(idx, 0), np.arange(values.shape[1])], np.nan)


def _empty() -> pl.DataFrame:
    utc = pl.Datetime("us", "UTC")
    return pl.DataFrame(schema={
        "as_of": utc, "leverage": pl.Float64, "margin_mode": pl.String, "account_usdt": pl.Float64,
        "bars_held": pl.Int64, "realized_liquidated": pl.Boolean, "realized_positions_liquidated": pl.Int64,
        "realized_liquidated_ts": utc, "close_only_liquidated": pl.Boolean, "realized_worst_margin_ratio": pl.Float64,
        "realized_worst_ts": utc, "realized_worst_symbol": pl.String, "realized_worst_move": pl.Float64,
        "realized_max_adverse_move": pl.Float64,
    })


def predicted_verdicts(stress: pl.DataFrame) -> pl.DataFrame:
    """The verdict of risk.stress per (as_of, strategy, leverage, margin_mode), over the scenarios of
    kinds price, funding and volatility (replays left out: module docstring).

    predicted_liquidated = any scenario liquidates; predicted_margin_ratio = the largest margin ratio
    of those scenarios (risk.stress stores null for a scenario that leaves no equity: then null);
    predicted_worst_scenario = the scenario with that ratio (a wiped-out one first, ties by name)."""
    missing = [col for col in (*KEYS, "scenario", "kind", "margin_ratio", "liquidated") if col not in stress.columns]
    if missing:
        raise DataError(f"predicted_verdicts: risk.stress lacks columns {missing}")
    ranked = stress.filter(pl.col("kind").is_in(PREDICTING_KINDS)).with_columns(
        ratio=pl.col("margin_ratio").fill_null(np.inf)
    ).sort([*KEYS, "ratio", "scenario"], descending=[False] * len(KEYS) + [True, False])
    return ranked.group_by(KEYS, maintain_order=True).agg(
        predicted_liquidated=pl.col("liquidated").any(),
        predicted_margin_ratio=pl.col("ratio").first(),
        predicted_worst_scenario=pl.col("scenario").first(),
    ).with_columns(pl.when(pl.col("predicted_margin_ratio").is_finite()).then("predicted_margin_ratio")
                   .alias("predicted_margin_ratio"))


def stress_vs_realized(predicted: pl.DataFrame, realized: pl.DataFrame) -> pl.DataFrame:
    """Predicted and realized side by side: the rows of both with the same (as_of, strategy, leverage,
    margin_mode), sorted by those keys. A realized row without a prediction, or the other way round
    (e.g. the latest decision, whose window is empty), is left out."""
    return predicted.join(realized, on=list(KEYS), how="inner").sort(list(KEYS))


def confusion(rows: pl.DataFrame, *, worst_hours: int = WORST_HOURS) -> pl.DataFrame:
    """Per strategy, leverage and margin mode: how often the stress verdict matched what happened.

    Counts of (predicted, realized) over the decisions: ``true_alarms`` (T, T), ``false_alarms``
    (T, F), ``missed`` (F, T) and ``true_calms`` (F, F); ``hit_rate = true_alarms / (true_alarms +
    missed)`` (the share of realized liquidations the stress predicted) and ``miss_rate = missed /
    (true_alarms + missed)`` (null without a realized liquidation); ``false_alarm_rate =
    false_alarms / (false_alarms + true_calms)`` (null when every decision was liquidated);
    ``wick_only`` = realized liquidations a close-only mark would not have seen. The worst realized
    bars: ``worst_margin_ratio`` (null = no equity left at the marks), its ``worst_ts``,
    ``worst_symbol`` and ``worst_as_of``, and ``worst_hours`` naming the ``worst_hours`` highest
    (``<ts> <symbol> <ratio>``, ``wiped`` for no equity left; worst first, ties by time)."""
    pred, real = pl.col("predicted_liquidated"), pl.col("realized_liquidated")
    ranked = rows.with_columns(order=pl.col("realized_worst_margin_ratio").fill_null(np.inf)).sort(
        [*KEYS[1:], "order", "realized_worst_ts"], descending=[False, False, False, True, False])
    label = pl.concat_str(
        pl.col("realized_worst_ts").dt.strftime("%Y-%m-%dT%H:%MZ"), pl.col("realized_worst_symbol").fill_null("flat"),
        pl.col("realized_worst_margin_ratio").round(4).cast(pl.String).fill_null("wiped"), separator=" ")
    out = ranked.group_by(KEYS[1:], maintain_order=True).agg(
        rebalances=pl.len(),
        true_alarms=(pred & real).sum(),
        false_alarms=(pred & ~real).sum(),
        missed=(~pred & real).sum(),
        true_calms=(~pred & ~real).sum(),
        wick_only=(real & ~pl.col("close_only_liquidated")).sum(),
        worst_margin_ratio=pl.col("realized_worst_margin_ratio").first(),
        worst_ts=pl.col("realized_worst_ts").first(),
        worst_symbol=pl.col("realized_worst_symbol").first(),
        worst_as_of=pl.col("as_of").first(),
        worst_hours=label.head(worst_hours).str.join("; "),
    )
    cast = [pl.col(c).cast(pl.Int64) for c in ("rebalances", "true_alarms", "false_alarms", "missed", "true_calms",
                                                "wick_only")]
    realized_liq = pl.col("true_alarms") + pl.col("missed")
    calm = pl.col("false_alarms") + pl.col("true_calms")
    return out.with_columns(cast).with_columns(
        hit_rate=pl.when(realized_liq > 0).then(pl.col("true_alarms") / realized_liq),
        miss_rate=pl.when(realized_liq > 0).then(pl.col("missed") / realized_liq),
        false_alarm_rate=pl.when(calm > 0).then(pl.col("false_alarms") / calm),
    ).sort(list(KEYS[1:]))
