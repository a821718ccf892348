"""Where a book's risk and return come from, and what trading cost it can bear.

Risk contributions (Euler). With target weights ``w`` (fractions of equity) and the ANNUALIZED
covariance ``Σ`` the book was solved on, the book's variance splits exactly over the symbols:

    σ_p² = wᵀΣw = Σ_i RC_i,    RC_i = w_i (Σw)_i           (annualized variance)
    share_i = RC_i / σ_p²                                   (Σ_i share_i = 1; < 0 = a hedge)
    MC_i = ∂σ_p / ∂w_i = (Σw)_i / σ_p                       (annualized vol per unit of weight)

``σ_p`` is homogeneous of degree one in ``w``, so Euler's theorem gives ``Σ_i w_i MC_i = σ_p``: the
contributions add up, which stand-alone volatilities ``|w_i| σ_i`` (correlation ignored) do not.
A symbol held at 0 contributes 0, but its MC says what adding weight to it would do to the risk.

Return attribution, in fractions of the initial equity ``E_{-1}`` (the accounting of
:func:`perpfolio.backtest.simulate`, summed over the whole run): per symbol ``ret_price = Σ_t x_it
r_it / E_{-1}``, ``ret_funding = Σ_t x_it f_it / E_{-1}``, ``ret_fees`` and ``ret_slippage`` (minus the
costs of every trade of the symbol: rebalances, stop-loss and delisting closes), and the account's
interest on its equity as the row ``cash``. Over the rows they add up to the book's total return
``E_T / E_{-1} - 1`` and column by column to ``performance_metrics``' ``ret_price``, ``ret_funding``,
``ret_costs`` and ``ret_interest``.

Break-even cost. ``g(c) = R_book(c) - R_ref(c)``: the gap in total return between the book and a
reference book (equal weight), both re-simulated with a cost of ``c`` bps per side of traded
notional (taker fee + slippage, split in the configured ratio). The break-even cost is the lowest
root of ``g`` on ``[0, max_cost_bps]``, bracketed on a grid and refined by Brent's method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import polars as pl
from scipy.optimize import brentq

from perpfolio.errors import DataError

CASH = "cash"  # the attribution row of the interest on equity (symbols end in USDT: no collision)
HELD = 1e-6  # |w| above this is a held position
# costs (bps per side) at which the gap to the reference is evaluated before the root is refined
BREAK_EVEN_GRID_BPS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
BreakEvenStatus = Literal["beats_below", "beats_above", "never_beats", "beats_throughout"]


@dataclass(frozen=True)
class EulerContributions:
    """Euler decomposition of K books over N symbols (annualized; module docstring).

    variance      K      wᵀΣw
    contribution  K x N  RC_i = w_i (Σw)_i; rows sum to ``variance``
    marginal      K x N  (Σw)_i / σ_p; NaN where σ_p = 0 (a flat or riskless book)
    """

    variance: np.ndarray
    contribution: np.ndarray
    marginal: np.ndarray


def euler_contributions(*, weights: np.ndarray, cov: np.ndarray) -> EulerContributions:
    """Risk contributions of K weight vectors (K x N) under their covariances (K x N x N,
    annualized): ``RC = w ⊙ Σw``, ``wᵀΣw = Σ_i RC_i``, ``MC = Σw / √(wᵀΣw)`` (module docstring).

    Raises DataError on mismatched shapes or a non-finite weight or covariance entry."""
    w = np.asarray(weights, dtype=float)
    s = np.asarray(cov, dtype=float)
    if w.ndim != 2 or s.shape != (*w.shape, w.shape[1]):
        raise DataError(f"euler_contributions: weights must be K x N and cov K x N x N, got {w.shape} and {s.shape}")
    if not (np.isfinite(w).all() and np.isfinite(s).all()):
        raise DataError("euler_contributions: weights and cov must be finite (drop the asofs without an estimate)")
    sw = np.einsum("kij,kj->ki", s, w)
    contribution = w * sw
    variance = contribution.sum(axis=1)
    vol = np.sqrt(np.maximum(variance, 0.0))
    marginal = np.divide(sw, vol[:, None], out=np.full_like(sw, np.nan), where=vol[:, None] > 0)
    return EulerContributions(variance=variance, contribution=contribution, marginal=marginal)


def contributions_frame(
    *, asofs: Sequence, symbols: Sequence[str], weights: np.ndarray, cov: np.ndarray, members: np.ndarray,
    book: str, estimator: str,
) -> pl.DataFrame:
    """risk.contributions rows of one book: one per asof and symbol that is a member of the asof's
    universe (``members``, K x N) or held (|w| > 1e-6), from :func:`euler_contributions`.

    Columns: as_of, strategy (= ``book``), estimator, symbol, weight, variance_contribution (RC_i,
    annualized variance), share (RC_i / σ_p²; null when σ_p = 0), marginal_vol ((Σw)_i / σ_p; null
    when σ_p = 0), book_vol (σ_p, annualized)."""
    risk = euler_contributions(weights=weights, cov=cov)
    w = np.asarray(weights, dtype=float)
    keep = np.asarray(members, dtype=bool) | (np.abs(w) > HELD)
    if keep.shape != w.shape:
        raise DataError(f"contributions_frame: members must be {w.shape}, got {keep.shape}")
    k_idx, i_idx = np.nonzero(keep)
    variance = risk.variance[k_idx]
    share = np.divide(risk.contribution[k_idx, i_idx], variance, out=np.full(len(k_idx), np.nan), where=variance > 0)
    return pl.DataFrame({
        "as_of": pl.Series([asofs[k] for k in k_idx], dtype=pl.Datetime("us", "UTC")),
        "strategy": [book] * len(k_idx),
        "estimator": [estimator] * len(k_idx),
        "symbol": [symbols[i] for i in i_idx],
        "weight": w[k_idx, i_idx],
        "variance_contribution": risk.contribution[k_idx, i_idx],
        "share": share,
        "marginal_vol": risk.marginal[k_idx, i_idx],
        "book_vol": np.sqrt(np.maximum(variance, 0.0)),
    }).with_columns(pl.col("share", "marginal_vol").fill_nan(None))


def return_attribution(path: pl.DataFrame, per_symbol: pl.DataFrame) -> pl.DataFrame:
    """Total return of one book split by symbol and source (module docstring), from
    ``simulate(..., by_symbol=True)``'s two frames: the per-bar ``path`` (equity, pnl, interest) and
    the per-symbol totals (symbol, price_pnl, funding_pnl, fees, slippage; equity units).

    Returns one row per symbol and a last row ``symbol = "cash"`` (the interest; 0 in the other
    columns): ret_price, ret_funding, ret_fees (<= 0), ret_slippage (<= 0), ret_costs = ret_fees +
    ret_slippage, ret_interest (0 on the symbols' rows) and ret_total (their sum), each PnL over
    ``E_{-1} = equity_0 - pnl_0``. ``ret_total`` sums over the rows to ``E_T / E_{-1} - 1``."""
    for frame, cols, what in ((path, ("equity", "pnl"), "path"),
                              (per_symbol, ("symbol", "price_pnl", "funding_pnl", "fees", "slippage"), "per_symbol")):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise DataError(f"return_attribution: {what} lacks columns {missing}")
    if path.is_empty():
        raise DataError("return_attribution: the path has no bars")
    start = float(path["equity"][0] - path["pnl"][0])
    if not start > 0:
        raise DataError(f"return_attribution: initial equity must be > 0, got {start}")
    interest = float(path["interest"].sum()) if "interest" in path.columns else 0.0
    symbols = per_symbol.select(
        "symbol", ret_price=pl.col("price_pnl") / start, ret_funding=pl.col("funding_pnl") / start,
        ret_fees=-pl.col("fees") / start, ret_slippage=-pl.col("slippage") / start, ret_interest=pl.lit(0.0),
    )
    cash = pl.DataFrame({"symbol": [CASH], "ret_price": [0.0], "ret_funding": [0.0], "ret_fees": [0.0],
                         "ret_slippage": [0.0], "ret_interest": [interest / start]})
    return pl.concat([symbols, cash]).with_columns(ret_costs=pl.col("ret_fees") + pl.col("ret_slippage")).with_columns(
        ret_total=pl.col("ret_price") + pl.col("ret_funding") + pl.col("ret_costs") + pl.col("ret_interest"),
    ).select("symbol", "ret_price", "ret_funding", "ret_fees", "ret_slippage", "ret_costs", "ret_interest", "ret_total")


def split_cost(cost_bps: float, *, fee_bps: float, slippage_bps: float) -> tuple[float, float]:
    """``(fee, slippage)`` in bps per side adding up to ``cost_bps`` in the configured ratio
    ``fee_bps : slippage_bps`` (all fee when both are 0)."""
    total = fee_bps + slippage_bps
    if total <= 0:
        return cost_bps, 0.0
    return cost_bps * fee_bps / total, cost_bps * slippage_bps / total  # exact at cost_bps = total


def total_return(path: pl.DataFrame) -> float:
    """``E_T / E_{-1} - 1`` of one path from :func:`perpfolio.backtest.simulate` (``E_{-1} = equity_0 -
    pnl_0``), the total_return of ``performance_metrics`` without the other statistics."""
    return float(path["equity"][-1] / (path["equity"][0] - path["pnl"][0]) - 1.0)


def return_at_cost(run: Callable[..., pl.DataFrame], *, fee_bps: float, slippage_bps: float,
                   since=None) -> Callable[[float], float]:
    """``c -> total return of run(fee_bps=f, slippage_bps=s)`` with ``(f, s) = split_cost(c)`` (bps per
    side, the configured ratio): a book's return as a function of its trading cost, for
    :func:`break_even_cost`. ``run`` is a simulation taking the two costs as keywords. With
    ``since`` (a bar ts), the total return over the bars from ``since`` on (two books compared over
    the bars both traded: the equity before that bar is the base)."""

    def at(cost_bps: float) -> float:
        fee, slip = split_cost(cost_bps, fee_bps=fee_bps, slippage_bps=slippage_bps)
        path = run(fee_bps=fee, slippage_bps=slip)
        return total_return(path if since is None else path.filter(pl.col("ts") >= since))

    return at


@dataclass(frozen=True)
class BreakEven:
    """The cost (bps per side) where the book's total return meets the reference's.

    status: ``beats_below`` (ahead of the reference at costs below ``cost_bps``), ``beats_above``
    (behind it below ``cost_bps``, ahead above: it trades less than the reference), ``never_beats``
    (behind or level at every grid cost up to the maximum; ``cost_bps`` None) or ``beats_throughout``
    (ahead at every grid cost; None). ``gap_at_zero`` = ``g(0)``: the book's lead before costs.
    """

    cost_bps: float | None
    status: BreakEvenStatus
    gap_at_zero: float


def break_even_cost(
    *, book: Callable[[float], float], reference: Callable[[float], float], max_cost_bps: float = 1000.0,
    grid_bps: Sequence[float] = BREAK_EVEN_GRID_BPS, xtol_bps: float = 1e-6,
) -> BreakEven:
    """Lowest cost ``c`` in ``[0, max_cost_bps]`` (bps per side) with ``book(c) = reference(c)``.

    ``book`` and ``reference`` map a cost in bps per side to a total return (fraction). The gap
    ``g = book - reference`` is evaluated at 0, at the grid costs below ``max_cost_bps`` and at
    ``max_cost_bps``; the first pair of neighbours where the book's lead changes sign (``g > 0``
    on one side, ``g <= 0`` on the other) brackets the root, which Brent's method refines to
    ``xtol_bps``. A book level with the reference (``g = 0``) does not beat it. Without a sign
    change the cost is None and the status says which side the book stayed on."""
    if not max_cost_bps > 0:
        raise DataError(f"break_even_cost: max_cost_bps must be > 0, got {max_cost_bps}")
    grid = np.unique(np.clip(np.concatenate([[0.0], np.asarray(grid_bps, dtype=float), [max_cost_bps]]), 0.0,
                             max_cost_bps))

    def gap(c: float) -> float:
        value = float(book(c) - reference(c))
        if not np.isfinite(value):
            raise DataError(f"break_even_cost: the return gap at {c:g} bps is {value}")
        return value

    gaps = [gap(grid[0])]
    for lo, hi in pairwise(grid):
        gaps.append(gap(hi))
        ahead_lo, ahead_hi = gaps[-2] > 0, gaps[-1] > 0
        if ahead_lo != ahead_hi:
            root = float(hi) if gaps[-1] == 0.0 else float(brentq(gap, lo, hi, xtol=xtol_bps))
            return BreakEven(cost_bps=root, status="beats_below" if gaps[0] > 0 else "beats_above",
                             gap_at_zero=gaps[0])
    return BreakEven(cost_bps=None, status="beats_throughout" if gaps[0] > 0 else "never_beats", gap_at_zero=gaps[0])
