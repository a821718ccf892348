"""Instant-shock stress tests with the exchange's tiered maintenance margin (cross and isolated).

A scenario happens at once (no trading in between). Kinds (``Scenario.kind``):

* ``price``: the reference symbol moves by ``shock`` (a SIMPLE return, -0.10 = -10%), every other
  symbol ``i`` by ``beta_i * shock`` with ``beta_i`` from :func:`rolling_betas`; without a
  reference every symbol moves by ``shock`` (a joint shock).
* ``funding``: prices stay; every position pays ``funding_rate_8h * hours / 8`` of its notional
  (positive rate: longs pay, shorts receive, the exchange convention).
* ``volatility``: every position moves AGAINST itself by ``sigmas * vol_multiplier * vol_i *
  sqrt(hours)``, with ``vol_i`` the symbol's per-bar (hourly) volatility over the window.
* ``replay``: the per-symbol returns of a historical bar (``moves``), e.g. from :func:`worst_hours`.

Scenarios are data: :func:`load_scenarios` reads ``config/scenarios.toml``. Maintenance margin uses Binance's bracket formula
``MM(n) = n * mmr_k - cum_k`` for the bracket ``k`` that holds the absolute notional ``n``
(``cum_k = cum_{k-1} + min_notional_k (mmr_k - mmr_{k-1})``, so MM is continuous across brackets).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError

DEFAULT_TIERS_PATH = Path(__file__).parent / "data" / "leverage_tiers.json"
# |weight| at or below this fraction of equity is no position (solver noise such as 1e-10): it is set
# to 0 before any stress or liquidation computation, so noise never creates or removes a position.
FLAT_WEIGHT = 1e-6
ZERO_PRICE_RATIO = 1e-9  # liquidation price / price below this is rounding of "only at price 0"


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
    """One instant scenario (see the module docstring for the kinds). Rates and moves are decimals.

    ``shock``: the price return of ``price`` scenarios (-0.05 = -5%). ``reference``: the shocked
    symbol of a ``price`` scenario (others move by ``beta_i * shock``); ``None`` = every symbol.
    ``funding_rate_8h`` and ``hours``: a ``funding`` spike (0.005 = +0.5% per 8h). ``sigmas``,
    ``vol_multiplier`` and ``hours``: a ``volatility`` spike. ``moves``: (symbol, return) pairs of a
    ``replay``.
    """

    name: str
    shock: float = 0.0
    reference: str | None = "BTCUSDT"
    kind: Literal["price", "funding", "volatility", "replay"] = "price"
    funding_rate_8h: float = 0.0
    hours: float = 1.0
    sigmas: float = 0.0
    vol_multiplier: float = 1.0
    moves: tuple[tuple[str, float], ...] = ()

    @property
    def headline(self) -> float:
        """One number that sizes the scenario: the price shock, the funding rate per 8h, the
        adverse move in per-bar sigmas (sigmas x multiplier), or the worst replayed move."""
        if self.kind == "funding":
            return self.funding_rate_8h
        if self.kind == "volatility":
            return self.sigmas * self.vol_multiplier
        if self.kind == "replay":
            return min((m for _, m in self.moves), default=0.0)
        return self.shock


DEFAULT_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("btc_-5pct_1h", -0.05),
    Scenario("btc_-10pct_1h", -0.10),
    Scenario("all_-10pct", -0.10, reference=None),
)
MarginMode = Literal["cross", "isolated"]
_KINDS = ("price", "funding", "volatility", "replay")


def load_scenarios(path: Path | str) -> tuple[tuple[Scenario, ...], int]:
    """Read ``[[scenario]]`` tables and ``[replay] worst_hours`` from a TOML file.

    Each scenario: ``name`` (unique) and ``kind`` (price | funding | volatility), then its fields
    (``shock`` and optional ``reference``; ``funding_rate_8h`` and ``hours``; ``sigmas``,
    ``vol_multiplier`` and ``hours``). Returns (scenarios, number of worst historical hours to
    replay; 0 = none). Any unknown key, missing field or bad value is a ConfigError naming the file
    and the scenario.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read scenarios: {exc}") from exc
    allowed = {f.name for f in fields(Scenario)} - {"moves"}
    required = {"price": ("shock",), "funding": ("funding_rate_8h", "hours"), "volatility": ("sigmas", "hours")}
    out = []
    for k, table in enumerate(raw.get("scenario", [])):
        name = table.get("name", f"#{k + 1}")
        where = f"{path}: scenario {name!r}"
        unknown = set(table) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
        kind = table.get("kind", "price")
        if kind not in required:
            raise ConfigError(f"{where}: kind must be one of {sorted(required)}, got {kind!r}")
        missing = [f for f in ("name", *required[kind]) if f not in table]
        if missing:
            raise ConfigError(f"{where}: missing {missing} for kind {kind!r}")
        values = dict(table)
        if kind == "price":
            values["reference"] = table.get("reference") or None
        try:
            sc = Scenario(**values)
            numbers = (sc.shock, sc.funding_rate_8h, sc.hours, sc.sigmas, sc.vol_multiplier)
            if not all(np.isfinite(float(v)) for v in numbers):
                raise ValueError("non-finite number")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if sc.hours <= 0 or sc.shock <= -1 or sc.sigmas < 0 or sc.vol_multiplier <= 0:
            raise ConfigError(f"{where}: need hours > 0, shock > -1, sigmas >= 0, vol_multiplier > 0; got {sc}")
        out.append(sc)
    names = [sc.name for sc in out]
    if not out or len(set(names)) != len(names):
        raise ConfigError(f"{path}: need at least one [[scenario]] and unique names, got {names}")
    worst = raw.get("replay", {}).get("worst_hours", 0)
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ConfigError(f"{path}: [replay] worst_hours must be an integer >= 0, got {worst!r}")
    return tuple(out), worst


def worst_hours(bar_ts: np.ndarray, returns: np.ndarray, symbols: Sequence[str], *, count: int) -> tuple[Scenario, ...]:
    """Replay scenarios of the ``count`` worst bars of the history, worst first.

    A bar's severity is its equal-weight mean return across the symbols with a return (NaN
    ignored; bars with none are skipped). Each scenario (``kind='replay'``, name
    ``replay:<bar open, UTC ISO>``) carries that bar's actual per-symbol returns (``moves``).
    """
    r = np.asarray(returns, dtype=float)
    if r.ndim != 2 or r.shape != (len(bar_ts), len(symbols)):
        raise DataError(f"worst_hours: returns {r.shape} must be ({len(bar_ts)}, {len(symbols)})")
    seen = np.isfinite(r).any(axis=1)
    mean = np.full(len(r), np.inf)
    mean[seen] = np.nanmean(r[seen], axis=1)
    order = [t for t in np.argsort(mean, kind="stable")[:count] if seen[t]]
    return tuple(
        Scenario(f"replay:{np.datetime_as_string(np.datetime64(bar_ts[t], 'm'))}Z", reference=None, kind="replay",
                 moves=tuple((s, float(v)) for s, v in zip(symbols, r[t]) if np.isfinite(v)))
        for t in order
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
    vols: np.ndarray | None = None,
    margin_mode: MarginMode = "cross",
) -> pl.DataFrame:
    """Apply each scenario once to a book and check margin, liquidation and capital sufficiency.

    Account equity ``A = equity * account_notional`` (USDT; ``equity`` is the strategy's equity in
    units of ``account_notional``, 1.0 = an account of that size). Positions
    ``p_i = leverage * A * w_i`` (USDT notionals, negative = short). Per scenario with price moves
    ``s_i`` and funding rates ``c_i`` charged on notional (see the module docstring):

    * position pnl ``pnl_i = p_i s_i - p_i c_i``; ``MM_i = MM(|p_i (1 + s_i)|)`` (post-shock notional,
      per-symbol brackets)
    * cross margin (one pool): pnl = sum_i pnl_i; equity_after = A + pnl;
      maintenance_margin = sum_i MM_i; margin_ratio = MM / equity_after (inf when equity_after <= 0);
      liquidated = equity_after <= MM (every position closes: positions_liquidated = held count)
    * isolated margin: position i has margin ``m_i = A |p_i| / sum_j |p_j|`` (the equity split in
      proportion to notional). It is liquidated when ``m_i + pnl_i <= MM_i`` and then loses its whole
      margin (``pnl_i -> -m_i``; what is left goes to the exchange's liquidation). equity_after =
      A + sum_i pnl_i; maintenance_margin = sum of MM_i of surviving positions; margin_ratio =
      max_i MM_i / (m_i + pnl_i) over held positions (inf when one has no equity left);
      liquidated = any position liquidated
    * capital_sufficient = not liquidated and equity_after >= maintenance_margin + buffer * A

    Weights with ``|w_i| <= FLAT_WEIGHT`` (1e-6, solver noise) are treated as 0. Symbols held
    (w_i != 0) must be in ``tiers`` unless ``default_mmr`` is given (then an unknown
    symbol's MM is ``|n| * default_mmr``). Betas only matter (and must be finite) for held symbols;
    ``vols`` (per-bar volatilities, N) are needed only by ``volatility`` scenarios.

    Returns one row per scenario: scenario, kind, reference, shock (``Scenario.headline``),
    leverage, margin_mode, pnl, equity_after, maintenance_margin (USDT), pnl_frac,
    equity_after_frac (divided by A), margin_ratio, liquidated, positions_liquidated,
    capital_sufficient.
    """
    w = np.asarray(weights, dtype=float)
    b = np.asarray(betas, dtype=float)
    n = len(symbols)
    if w.shape != (n,) or b.shape != (n,):
        raise DataError(f"stress_test: weights {w.shape} and betas {b.shape} must both be ({n},)")
    bad_w = np.flatnonzero(~np.isfinite(w))
    if len(bad_w):
        raise DataError(f"stress_test: weights for {symbols[bad_w[0]]} is {w[bad_w[0]]}")
    w = np.where(np.abs(w) > FLAT_WEIGHT, w, 0.0)
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
    if margin_mode not in ("cross", "isolated"):
        raise ConfigError(f"stress_test: margin_mode must be 'cross' or 'isolated', got {margin_mode!r}")
    if not scenarios:
        raise ConfigError("stress_test: scenarios is empty")
    tier_lists = _tier_lists(symbols, held, tiers, default_mmr, "stress_test")
    moves, rates = _scenario_moves(scenarios, symbols, np.sign(w), b, vols)

    acct = equity * account_notional
    pos = leverage * acct * w
    pos_pnl = (moves - rates) * pos
    mm_pos = _margin(np.abs(pos * (1.0 + moves)), *_bracket_arrays(tier_lists), symbols)
    if margin_mode == "cross":
        pnl = pos_pnl.sum(axis=1)
        equity_after = acct + pnl
        mm = mm_pos.sum(axis=1)
        margin_ratio = np.divide(mm, equity_after, out=np.full(len(mm), np.inf), where=equity_after > 0)
        liquidated = equity_after <= mm
        n_liq = np.where(liquidated, held.sum(), 0)
    else:
        margin = acct * np.abs(pos) / np.abs(pos).sum()
        own = margin + pos_pnl
        liq_pos = held & (own <= mm_pos)
        pnl = np.where(liq_pos, -margin, pos_pnl).sum(axis=1)
        equity_after = acct + pnl
        mm = np.where(liq_pos, 0.0, mm_pos).sum(axis=1)
        ratio = np.divide(mm_pos, own, out=np.full(own.shape, np.inf), where=own > 0)
        margin_ratio = np.where(held, ratio, 0.0).max(axis=1)
        n_liq = liq_pos.sum(axis=1)
        liquidated = n_liq > 0
    return pl.DataFrame({
        "scenario": [sc.name for sc in scenarios],
        "kind": [sc.kind for sc in scenarios],
        "reference": pl.Series([sc.reference if sc.kind == "price" else None for sc in scenarios], dtype=pl.String),
        "shock": [float(sc.headline) for sc in scenarios],
        "leverage": np.full(len(scenarios), float(leverage)),
        "margin_mode": [margin_mode] * len(scenarios),
        "pnl": pnl,
        "equity_after": equity_after,
        "maintenance_margin": mm,
        "pnl_frac": pnl / acct,
        "equity_after_frac": equity_after / acct,
        "margin_ratio": margin_ratio,
        "liquidated": liquidated,
        "positions_liquidated": n_liq.astype(np.int64),
        "capital_sufficient": ~liquidated & (equity_after >= mm + buffer * acct),
    })


def liquidation_levels(
    weights: np.ndarray,
    symbols: Sequence[str],
    *,
    leverage: float,
    tiers: Mapping[str, Sequence[Tier]],
    margin_mode: MarginMode = "cross",
    equity: float = 1.0,
    account_notional: float = 100_000.0,
    default_mmr: float | None = None,
) -> pl.DataFrame:
    """Liquidation price of every held position, moving that symbol alone (others unchanged).

    With ``p = leverage * A * w_i`` (``q = |p|``), equity ``E`` (cross: the account ``A``;
    isolated: the position's margin ``m_i = A q / sum_j |p_j|``) and the maintenance margin of
    the other positions ``M_o`` (cross: ``sum_{j != i} MM_j(|p_j|)``; isolated: 0), the position is
    liquidated when ``E + p s = MM(q (1 + s))``. Within bracket k, ``MM = q (1 + s) mmr_k - cum_k``,
    so ``s* = (q mmr_k - cum_k + M_o - E) / (p - q mmr_k)``, kept for the bracket that holds the
    notional ``q (1 + s*)`` (the last bracket is taken as open-ended here). MM is continuous and
    the equity gap monotone in ``s``, so the root is unique.

    Weights with ``|w_i| <= FLAT_WEIGHT`` are no position (no row). Returns one row per held symbol: symbol, weight, notional (USDT), margin_mode, margin (USDT,
    the equity that backs the position), liquidation_move ``s*`` (the price return that liquidates,
    null when no positive price does: e.g. a fully collateralized long), liquidation_price_ratio
    ``1 + s*`` (liquidation price / current price, null likewise) and distance ``-sign(p) s*``
    (the adverse move to liquidation, a fraction; 0 when already liquidatable).
    """
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(symbols),) or not np.isfinite(w).all():
        raise DataError(f"liquidation_levels: weights {w} must be {len(symbols)} finite values")
    w = np.where(np.abs(w) > FLAT_WEIGHT, w, 0.0)
    if margin_mode not in ("cross", "isolated"):
        raise ConfigError(f"liquidation_levels: margin_mode must be 'cross' or 'isolated', got {margin_mode!r}")
    if not (leverage > 0 and equity > 0 and account_notional > 0):
        raise ConfigError("liquidation_levels: leverage, equity and account_notional must be > 0")
    held = w != 0
    tier_lists = _tier_lists(symbols, held, tiers, default_mmr, "liquidation_levels")
    floors, mmr, cum, caps = _bracket_arrays(tier_lists)
    acct = equity * account_notional
    pos = leverage * acct * w
    q = np.abs(pos)
    mm_now = _margin(q[None, :], floors, mmr, cum, caps, symbols)[0]
    if margin_mode == "cross":
        backing = np.full(len(w), acct)
        others = mm_now.sum() - mm_now
    else:
        backing = acct * q / q.sum() if q.sum() > 0 else np.zeros(len(w))
        others = np.zeros(len(w))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = ((q[:, None] * mmr - cum + others[:, None] - backing[:, None])
             / (pos[:, None] - q[:, None] * mmr))
        notional = q[:, None] * (1.0 + s)
        upper = np.concatenate([floors[:, 1:], np.full((len(w), 1), np.inf)], axis=1)
        # a liquidation price within rounding of 0 (e.g. a fully collateralized long) is no price at all
        valid = np.isfinite(s) & (1.0 + s > ZERO_PRICE_RATIO) & (notional >= floors - 1e-9 * np.maximum(floors, 1)) & (notional <= upper)
    pick = valid.argmax(axis=1)
    found = valid[np.arange(len(w)), pick]
    move = np.where(found, s[np.arange(len(w)), pick], np.nan)
    idx = np.flatnonzero(held)
    dist = np.maximum(0.0, -np.sign(pos) * move)
    return pl.DataFrame({
        "symbol": [symbols[i] for i in idx],
        "weight": w[idx],
        "notional": pos[idx],
        "margin_mode": [margin_mode] * len(idx),
        "margin": backing[idx],
        "liquidation_move": pl.Series(move[idx], dtype=pl.Float64).fill_nan(None),
        "liquidation_price_ratio": pl.Series(1.0 + move[idx], dtype=pl.Float64).fill_nan(None),
        "distance": pl.Series(dist[idx], dtype=pl.Float64).fill_nan(None),
    })


def _tier_lists(symbols, held, tiers, default_mmr, where):
    out = []
    for sym, h in zip(symbols, held):
        if not h:
            out.append([Tier(0.0, np.inf, 0.0, np.inf, 0.0)])
        elif sym in tiers:
            out.append(tiers[sym])
        elif default_mmr is not None:
            out.append([Tier(0.0, np.inf, default_mmr, np.inf, 0.0)])
        else:
            raise ConfigError(f"{where}: no leverage tiers for symbol {sym}; add it to the tier table or pass default_mmr")
    for sym, t in zip(symbols, out):
        _validate_tiers(sym, t)
    return out


def _scenario_moves(scenarios, symbols, signs, betas, vols):
    """S x N price moves and S x N funding charges (fraction of notional a long pays)."""
    n = len(symbols)
    held = signs != 0
    moves, rates = np.zeros((len(scenarios), n)), np.zeros((len(scenarios), n))
    for k, sc in enumerate(scenarios):
        if sc.kind not in _KINDS:
            raise ConfigError(f"stress_test: scenario {sc.name}: unknown kind {sc.kind!r}")
        if sc.kind == "price" and sc.reference is None:
            moves[k] = sc.shock
        elif sc.kind == "price":
            if sc.reference not in symbols:
                raise ConfigError(f"stress_test: scenario {sc.name}: reference {sc.reference} not in symbols")
            moves[k] = np.where(held, betas, 0.0) * sc.shock
            moves[k, list(symbols).index(sc.reference)] = sc.shock
        elif sc.kind == "funding":
            rates[k] = sc.funding_rate_8h * sc.hours / 8.0
        elif sc.kind == "volatility":
            v = np.full(n, np.nan) if vols is None else np.asarray(vols, dtype=float)
            bad = np.flatnonzero(held & ~(np.isfinite(v) & (v >= 0)))
            if len(bad):
                raise DataError(f"stress_test: scenario {sc.name} needs the per-bar volatility of "
                                f"{symbols[bad[0]]}, got {v[bad[0]]}")
            moves[k] = -signs * sc.sigmas * sc.vol_multiplier * np.where(held, v, 0.0) * np.sqrt(sc.hours)
        else:
            replay = dict(sc.moves)
            lacking = [s for s, h in zip(symbols, held) if h and s not in replay]
            if lacking:
                raise DataError(f"stress_test: replay {sc.name} has no move for held symbol {lacking[0]}")
            moves[k] = [replay.get(s, 0.0) if h else 0.0 for s, h in zip(symbols, held)]
        low = np.flatnonzero(held & (moves[k] <= -1.0))
        if len(low):
            raise ConfigError(f"stress_test: scenario {sc.name} moves {symbols[low[0]]} by "
                              f"{moves[k, low[0]]} <= -100%")
    return moves, rates


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
