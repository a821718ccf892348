"""Instant-shock stress tests with the exchange's tiered maintenance margin (cross margin).

A scenario moves prices once, instantly (no funding, no trading, no time passing):
the reference symbol by ``shock`` (a SIMPLE return, -0.10 = -10%), every other symbol ``i`` by
``beta_i * shock`` with ``beta_i`` from :func:`rolling_betas`; a scenario without a reference moves
every symbol by ``shock`` (a joint shock). Maintenance margin uses Binance's bracket formula
``MM(n) = n * mmr_k - cum_k`` for the bracket ``k`` that holds the absolute notional ``n``
(``cum_k = cum_{k-1} + min_notional_k (mmr_k - mmr_{k-1})``, so MM is continuous across brackets).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError

DEFAULT_TIERS_PATH = Path(__file__).parent / "data" / "leverage_tiers.json"


@dataclass(frozen=True)
class Tier:
    """One leverage bracket: applies to absolute notionals in [min_notional, max_notional] (USDT)."""

    min_notional: float
    max_notional: float
    mmr: float  # maintenance margin rate, decimal (0.004 = 0.4%)
    max_leverage: float
    cum: float  # maintenance amount (USDT) subtracted in the bracket formula


@dataclass(frozen=True)
class Scenario:
    """An instant price shock. ``shock`` is a SIMPLE return (-0.05 = -5%).

    ``reference`` is the shocked symbol (others move by ``beta_i * shock``); ``None`` moves every
    symbol by ``shock`` regardless of betas.
    """

    name: str
    shock: float
    reference: str | None = "BTCUSDT"


DEFAULT_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("btc_-5pct_1h", -0.05),
    Scenario("btc_-10pct_1h", -0.10),
    Scenario("all_-10pct", -0.10, reference=None),
)


def rolling_betas(returns: np.ndarray, *, reference: int) -> np.ndarray:
    """Betas of every column on the reference column over the given window rows.

    ``beta_i = cov(r_i, r_ref) / var(r_ref)`` (sample moments; the ddof cancels), ``beta_ref = 1``.
    Input: T x N per-bar returns (simple or log, the betas are unitless), no NaN. The caller slices
    the window (e.g. the ``window`` bars ending at the asof bar). Output: N betas.
    """
    r = np.asarray(returns, dtype=float)
    if r.ndim != 2 or r.shape[0] < 2:
        raise DataError(f"rolling_betas: returns must be T x N with T >= 2, got shape {r.shape}")
    if not 0 <= reference < r.shape[1]:
        raise DataError(f"rolling_betas: reference={reference} out of range for {r.shape[1]} columns")
    bad = np.argwhere(~np.isfinite(r))
    if len(bad):
        t, i = bad[0]
        raise DataError(f"rolling_betas: return at row {t}, column {i} is {r[t, i]}")
    centered = r - r.mean(axis=0)
    ref = centered[:, reference]
    var = ref @ ref
    if var <= 0:
        raise DataError(f"rolling_betas: reference column {reference} has zero variance in the window")
    betas = (ref @ centered) / var
    betas[reference] = 1.0
    return betas


def load_leverage_tiers(path: Path | str | None = None) -> dict[str, list[Tier]]:
    """Read ``{"tiers": {symbol: [{min_notional, max_notional, mmr, max_leverage, cum}, ...]}}``.

    Default: the packaged Binance USD-M snapshot of 2025-01-02 (BTC/ETH/SOLUSDT, first 4 brackets).
    Brackets must start at 0, be contiguous and have consistent ``cum`` (else ConfigError).
    """
    path = Path(path) if path is not None else DEFAULT_TIERS_PATH
    raw = json.loads(path.read_text())
    if not isinstance(raw.get("tiers"), dict):
        raise ConfigError(f"{path}: expected an object under key 'tiers'")
    fields = ("min_notional", "max_notional", "mmr", "max_leverage", "cum")
    out: dict[str, list[Tier]] = {}
    for symbol, rows in raw["tiers"].items():
        try:
            tiers = [Tier(**{k: float(row[k]) for k in fields}) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: symbol {symbol}: each bracket needs numeric {fields}") from exc
        _validate_tiers(symbol, tiers)
        out[symbol] = tiers
    return out


def maintenance_margin(notional: float, tiers: Sequence[Tier]) -> float:
    """``MM = |notional| * mmr_k - cum_k`` (USDT) for the bracket k with min_notional_k <= |notional|.

    A notional above the last bracket's max_notional raises ConfigError (extend the table).
    """
    _validate_tiers("<tiers>", tiers)
    return float(_margin(np.array([[abs(notional)]]), *_bracket_arrays([tiers]), ["<tiers>"])[0, 0])


def stress_test(
    weights: np.ndarray,
    symbols: Sequence[str],
    betas: np.ndarray,
    *,
    scenarios: Sequence[Scenario] = DEFAULT_SCENARIOS,
    leverage: float,
    tiers: Mapping[str, Sequence[Tier]],
    equity: float = 1.0,
    buffer: float = 0.05,
    account_notional: float = 100_000.0,
    default_mmr: float | None = None,
) -> pl.DataFrame:
    """Shock a cross-margined book once per scenario and check margin and capital sufficiency.

    Account equity ``A = equity * account_notional`` (USDT; ``equity`` is the strategy's equity in
    units of ``account_notional``, 1.0 = an account of that size). Positions
    ``p_i = leverage * A * w_i`` (USDT notionals, negative = short). Per scenario with shocks ``s_i``:

    * pnl = sum_i p_i s_i;  equity_after = A + pnl
    * maintenance_margin = sum_i MM_i(|p_i (1 + s_i)|)  (post-shock notionals, per-symbol brackets)
    * margin_ratio = maintenance_margin / equity_after  (inf when equity_after <= 0)
    * liquidated = equity_after <= maintenance_margin
    * capital_sufficient = equity_after >= maintenance_margin + buffer * A

    Symbols held (w_i != 0) must be in ``tiers`` unless ``default_mmr`` is given (then an unknown
    symbol's MM is ``|n| * default_mmr``). Betas only matter (and must be finite) for held symbols.

    Returns one row per scenario: scenario, reference, shock, leverage, pnl, equity_after,
    maintenance_margin (USDT), pnl_frac, equity_after_frac (divided by A), margin_ratio,
    liquidated, capital_sufficient.
    """
    w = np.asarray(weights, dtype=float)
    b = np.asarray(betas, dtype=float)
    n = len(symbols)
    if w.shape != (n,) or b.shape != (n,):
        raise DataError(f"stress_test: weights {w.shape} and betas {b.shape} must both be ({n},)")
    held = w != 0
    for name, arr in (("weights", w), ("betas", np.where(held, b, 0.0))):
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            raise DataError(f"stress_test: {name} for {symbols[bad[0]]} is {arr[bad[0]]}")
    for name, value, ok in (("leverage", leverage, leverage > 0), ("equity", equity, equity > 0),
                            ("account_notional", account_notional, account_notional > 0),
                            ("buffer", buffer, buffer >= 0)):
        if not ok:
            raise ConfigError(f"stress_test: {name} must be {'>= 0' if name == 'buffer' else '> 0'}, got {value}")
    if not scenarios:
        raise ConfigError("stress_test: scenarios is empty")
    tier_lists = []
    for sym, h in zip(symbols, held):
        if not h:
            tier_lists.append([Tier(0.0, np.inf, 0.0, np.inf, 0.0)])
        elif sym in tiers:
            tier_lists.append(tiers[sym])
        elif default_mmr is not None:
            tier_lists.append([Tier(0.0, np.inf, default_mmr, np.inf, 0.0)])
        else:
            raise ConfigError(f"stress_test: no leverage tiers for symbol {sym}; add it to the tier "
                              f"table or pass default_mmr")
    for sym, t in zip(symbols, tier_lists):
        _validate_tiers(sym, t)

    shocks = np.empty((len(scenarios), n))
    for k, sc in enumerate(scenarios):
        if sc.reference is None:
            shocks[k] = sc.shock
        elif sc.reference in symbols:
            shocks[k] = np.where(held, b, 0.0) * sc.shock
            shocks[k, list(symbols).index(sc.reference)] = sc.shock
        else:
            raise ConfigError(f"stress_test: scenario {sc.name}: reference {sc.reference} not in symbols")
        low = np.flatnonzero(held & (shocks[k] <= -1.0))
        if len(low):
            raise ConfigError(f"stress_test: scenario {sc.name} moves {symbols[low[0]]} by "
                              f"{shocks[k, low[0]]} <= -100%")

    acct = equity * account_notional
    pos = leverage * acct * w
    pnl = shocks @ pos
    equity_after = acct + pnl
    mm = _margin(np.abs(pos * (1.0 + shocks)), *_bracket_arrays(tier_lists), symbols).sum(axis=1)
    margin_ratio = np.divide(mm, equity_after, out=np.full(len(mm), np.inf), where=equity_after > 0)
    return pl.DataFrame({
        "scenario": [sc.name for sc in scenarios],
        "reference": pl.Series([sc.reference for sc in scenarios], dtype=pl.String),
        "shock": [float(sc.shock) for sc in scenarios],
        "leverage": np.full(len(scenarios), float(leverage)),
        "pnl": pnl,
        "equity_after": equity_after,
        "maintenance_margin": mm,
        "pnl_frac": pnl / acct,
        "equity_after_frac": equity_after / acct,
        "margin_ratio": margin_ratio,
        "liquidated": equity_after <= mm,
        "capital_sufficient": equity_after >= mm + buffer * acct,
    })


def _validate_tiers(symbol: str, tiers: Sequence[Tier]) -> None:
    if not tiers:
        raise ConfigError(f"leverage tiers for {symbol}: empty bracket list")
    if tiers[0].min_notional != 0:
        raise ConfigError(f"leverage tiers for {symbol}: first bracket starts at {tiers[0].min_notional}, not 0")
    for k, t in enumerate(tiers):
        if not (0 <= t.mmr < 1 and t.max_notional > t.min_notional):
            raise ConfigError(f"leverage tiers for {symbol}, bracket {k + 1}: invalid {t}")
        if k:
            prev = tiers[k - 1]
            cum = prev.cum + t.min_notional * (t.mmr - prev.mmr)
            if t.min_notional != prev.max_notional or abs(t.cum - cum) > 1e-6 * max(1.0, abs(cum)):
                raise ConfigError(f"leverage tiers for {symbol}, bracket {k + 1}: not contiguous with the "
                                  f"previous bracket or cum {t.cum} != expected {cum}")


def _bracket_arrays(tier_lists: Sequence[Sequence[Tier]]):
    """Pad per-symbol brackets to N x B arrays (floors padded with +inf so they never match)."""
    width = max(len(t) for t in tier_lists)
    floors = np.full((len(tier_lists), width), np.inf)
    mmr = np.zeros((len(tier_lists), width))
    cum = np.zeros((len(tier_lists), width))
    for i, tl in enumerate(tier_lists):
        floors[i, : len(tl)] = [t.min_notional for t in tl]
        mmr[i, : len(tl)] = [t.mmr for t in tl]
        cum[i, : len(tl)] = [t.cum for t in tl]
    caps = np.array([tl[-1].max_notional for tl in tier_lists])
    return floors, mmr, cum, caps


def _margin(notional, floors, mmr, cum, caps, symbols) -> np.ndarray:
    """S x N absolute notionals -> S x N maintenance margins (USDT)."""
    over = np.argwhere(notional > caps)
    if len(over):
        s, i = over[0]
        raise ConfigError(f"maintenance margin: notional {notional[s, i]:.2f} of {symbols[i]} exceeds the "
                          f"last leverage bracket ({caps[i]:.0f}); extend the tier table")
    idx = (notional[..., None] >= floors).sum(axis=-1) - 1
    rows = np.arange(notional.shape[1])
    return notional * mmr[rows, idx] - cum[rows, idx]
