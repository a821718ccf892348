"""Instant-shock stress tests with the exchange's tiered maintenance margin (cross and isolated).

A scenario happens at once (no trading in between). Kinds (``Scenario.kind``):

* ``price``: the ``reference`` symbol moves by ``shock`` (a SIMPLE return, -0.10 = -10%), every other
  symbol ``i`` by ``beta_i * shock`` with ``beta_i`` from :func:`rolling_betas` against that reference;
  ``reference = "all"`` moves every symbol by ``shock`` (a joint shock). A held symbol without a beta
  (no returns overlapping the reference's in the window) moves by the shock itself (beta 1).
* ``funding``: prices stay; every position pays ``funding_rate_8h * hours / 8`` of its notional
  (positive rate: longs pay, shorts receive, the exchange convention).
* ``volatility``: every position moves AGAINST itself by ``sigmas * vol_multiplier * vol_i *
  sqrt(hours / bar_hours)``, with ``vol_i`` the symbol's per-bar volatility (:func:`bar_vols`) over
  the window of ``bar_hours``-hour bars (so the scenario means the same on 1 h, 4 h and 24 h bars).
  A held symbol without a volatility takes the largest of the held symbols that have one.
* ``replay``: the per-symbol returns of one historical bar (``moves``, from :func:`worst_bars`). A
  held symbol without a return in that bar (not listed yet, an outage) moves by its beta times the
  reference's move in that bar when both exist, else by the bar's cross-sectional mean move.

Every substitute move (beta 1, largest volatility, beta x reference, bar mean) is recorded in the
row's ``proxied`` column, so nothing is guessed silently.

Scenarios are data: :func:`load_scenarios` reads ``config/scenarios.toml``. Maintenance margin uses
the exchange's bracket formula ``MM(n) = n * mmr_k - cum_k`` for the bracket ``k`` that holds the
absolute notional ``n`` (perpfolio.tiers). A notional beyond the last bracket (a position the
exchange would not accept) is margined with the last bracket extended and reported in the row
(``oversized``, never capital sufficient; ``exceeds_max_notional`` in :func:`liquidation_levels`).
"""

from __future__ import annotations

import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError
from perpfolio.tiers import Tier, validate_tiers

# |weight| at or below this fraction of equity is no position (solver noise such as 1e-10): it is set
# to 0 before any stress or liquidation computation, so noise never creates or removes a position.
FLAT_WEIGHT = 1e-6
ZERO_PRICE_RATIO = 1e-9  # liquidation price / price below this is rounding of "only at price 0"
JOINT = "all"  # the reference of a joint price shock: every symbol moves by the shock


@dataclass(frozen=True)
class Scenario:
    """One instant scenario (see the module docstring for the kinds). Rates and moves are decimals.

    ``shock``: the price return of ``price`` scenarios (-0.05 = -5%). ``reference``: the shocked
    symbol of a ``price`` scenario (others move by ``beta_i * shock``) or ``"all"`` (every symbol by
    ``shock``); for a ``replay``, the symbol whose move (times a beta) stands in for a held symbol
    without one. ``funding_rate_8h`` and ``hours``: a ``funding`` spike (0.005 = +0.5% per 8h).
    ``sigmas``, ``vol_multiplier`` and ``hours``: a ``volatility`` spike. ``moves``: (symbol, return)
    pairs of a ``replay``.
    """

    name: str
    shock: float = 0.0
    reference: str | None = None
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
    Scenario("btc_-5pct_1h", -0.05, reference="BTCUSDT"),
    Scenario("btc_-10pct_1h", -0.10, reference="BTCUSDT"),
    Scenario("all_-10pct", -0.10, reference=JOINT),
)
MarginMode = Literal["cross", "isolated"]
_KINDS = ("price", "funding", "volatility", "replay")


def load_scenarios(path: Path | str, *, symbols: Sequence[str], reference: str) -> tuple[tuple[Scenario, ...], int]:
    """Read ``[[scenario]]`` tables and ``[replay] worst_bars`` from a TOML file.

    Each scenario: ``name`` (unique) and ``kind`` (price | funding | volatility), then its fields
    (``shock`` and optional ``reference``; ``funding_rate_8h`` and ``hours``; ``sigmas``,
    ``vol_multiplier`` and ``hours``). A price scenario without ``reference`` shocks ``reference``
    (the stress reference); its reference must be ``"all"`` or one of ``symbols``. Returns
    (scenarios, number of worst historical bars to replay; 0 = none). Any unknown key, missing
    field, bad value or unknown reference is a ConfigError naming the file and the scenario.
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
        values["reference"] = table.get("reference", reference) if kind == "price" else None
        if kind == "price" and values["reference"] != JOINT and values["reference"] not in symbols:
            whose = "" if "reference" in table else " (the stress reference, used where a scenario names none)"
            raise ConfigError(f"{where}: reference {values['reference']!r}{whose} is not a configured symbol "
                              f"{list(symbols)}; name one of them, or \"{JOINT}\" for a joint shock")
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
    replay = raw.get("replay", {})
    if set(replay) - {"worst_bars"}:
        raise ConfigError(f"{path}: [replay] takes only worst_bars (the worst historical bars to replay; "
                          f"worst_hours was renamed), got {sorted(replay)}")
    worst = replay.get("worst_bars", 0)
    if isinstance(worst, bool) or not isinstance(worst, int) or worst < 0:
        raise ConfigError(f"{path}: [replay] worst_bars must be an integer >= 0, got {worst!r}")
    return tuple(out), worst


def worst_bars(bar_ts: np.ndarray, returns: np.ndarray, symbols: Sequence[str], *, count: int, bar_hours: int,
               reference: str | None = None) -> tuple[Scenario, ...]:
    """Replay scenarios of the ``count`` worst bars of the history, worst first.

    A bar's severity is its equal-weight mean return across the symbols with a return (NaN
    ignored; bars with none are skipped). Each scenario (``kind='replay'``) is named by the bar it
    replays, ``replay:<bar open, UTC ISO>/PT<bar_hours>H`` (e.g. ``replay:2025-02-03T00:00Z/PT4H``),
    and carries that bar's actual per-symbol returns (``moves``) and ``reference`` (the symbol
    whose move stands in, times a beta, for a held symbol without one).
    """
    r = np.asarray(returns, dtype=float)
    if r.ndim != 2 or r.shape != (len(bar_ts), len(symbols)):
        raise DataError(f"worst_bars: returns {r.shape} must be ({len(bar_ts)}, {len(symbols)})")
    seen = np.isfinite(r).any(axis=1)
    mean = np.full(len(r), np.inf)
    mean[seen] = np.nanmean(r[seen], axis=1)
    order = [t for t in np.argsort(mean, kind="stable")[:count] if seen[t]]
    return tuple(
        Scenario(f"replay:{np.datetime_as_string(np.datetime64(bar_ts[t], 'm'))}Z/PT{bar_hours}H", reference=reference,
                 kind="replay", moves=tuple((s, float(v)) for s, v in zip(symbols, r[t]) if np.isfinite(v)))
        for t in order
    )


def rolling_betas(returns: np.ndarray, *, reference: int) -> np.ndarray:
    """Betas of every column on the reference column over the given window rows, pairwise.

    ``beta_i = cov(r_i, r_ref) / var(r_ref)`` over the rows where BOTH column i and the reference
    have a return (NaN rows skipped per pair; each pair's own means; the ddof cancels), so a symbol
    listed late or in an outage is measured on the bars it has. ``beta_ref = 1``. NaN where fewer
    than 2 rows overlap or the reference does not move over them (no usable reference returns:
    every beta is NaN). Input: T x N per-bar returns (simple or log, the betas are unitless); the
    caller slices the window (e.g. the ``window`` bars ending at the asof bar). Output: N betas.
    """
    r = np.asarray(returns, dtype=float)
    if r.ndim != 2:
        raise DataError(f"rolling_betas: returns must be T x N, got shape {r.shape}")
    if not 0 <= reference < r.shape[1]:
        raise DataError(f"rolling_betas: reference={reference} out of range for {r.shape[1]} columns")
    ok = np.isfinite(r)
    seen = ok.astype(float)
    # centred on each column's own mean first (a shift leaves every beta unchanged and keeps the sums
    # below free of cancellation); then per pair, over the rows both have: n, sum x, sum y, sum xx, sum xy
    y = np.where(ok, r - np.where(ok, r, 0.0).sum(axis=0) / np.maximum(ok.sum(axis=0), 1), 0.0)
    x, has_x = y[:, reference], seen[:, reference]
    n, sx, sy = has_x @ seen, x @ seen, has_x @ y
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (x * x) @ seen - sx * sx / n
        cov = x @ y - sx * sy / n
        betas = np.where((n >= 2) & (var > 1e-12 * ((x * x) @ seen)) & (var > 0), cov / var, np.nan)
    if np.isfinite(betas[reference]):
        betas[reference] = 1.0
    return betas


def bar_vols(returns: np.ndarray) -> np.ndarray:
    """Per-bar volatility of every column: the sample standard deviation (ddof = 1) of its own
    returns in the rows given (NaN skipped per column), in return units per bar; NaN with fewer
    than 2 returns. Input T x N, output N."""
    r = np.asarray(returns, dtype=float)
    if r.ndim != 2:
        raise DataError(f"bar_vols: returns must be T x N, got shape {r.shape}")
    with warnings.catch_warnings():  # a column with fewer than 2 returns has no sd: NaN below, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(r, axis=0, ddof=1)
    return np.where(np.isfinite(r).sum(axis=0) >= 2, sd, np.nan)


def maintenance_margin(notional: float, tiers: Sequence[Tier]) -> float:
    """``MM = |notional| * mmr_k - cum_k`` (USDT) for the last bracket k with min_notional_k <= |notional|.

    A notional above the last bracket's max_notional (a position the exchange would not accept) is
    margined with the last bracket extended; compare with ``tiers[-1].max_notional`` to tell.
    """
    validate_tiers(tiers, where="maintenance_margin")
    floors, mmr, cum, _ = bracket_arrays([tiers])
    return float(bracket_margin(np.array([[abs(notional)]]), floors, mmr, cum)[0, 0])


def stress_test(
    weights: np.ndarray,
    symbols: Sequence[str],
    betas: Mapping[str, np.ndarray],
    *,
    scenarios: Sequence[Scenario] = DEFAULT_SCENARIOS,
    leverage: float | Sequence[float],
    tiers: Mapping[str, Sequence[Tier]],
    equity: float = 1.0,
    buffer: float = 0.05,
    account_usdt: float = 100_000.0,
    vols: np.ndarray | None = None,
    bar_hours: float | None = None,
    margin_mode: MarginMode | Sequence[MarginMode] = "cross",
    tier_sources: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Apply each scenario once to a book and check margin, liquidation and capital sufficiency, at
    each of the ``leverage`` values and in each ``margin_mode`` (one value or a sequence of them).

    Account equity ``A = equity * account_usdt`` (USDT; ``equity`` is the strategy's equity in units
    of ``account_usdt``, 1.0 = an account of that size). Positions ``p_i = leverage * A * w_i`` (USDT
    notionals, negative = short). Per scenario with price moves ``s_i`` and funding rates ``c_i``
    charged on notional (see the module docstring):

    * position pnl ``pnl_i = p_i s_i - p_i c_i``; ``MM_i = MM(|p_i (1 + s_i)|)`` (post-shock notional,
      per-symbol brackets, the last one extended beyond its max_notional)
    * cross margin (one pool): pnl = sum_i pnl_i; equity_after = A + pnl;
      maintenance_margin = sum_i MM_i; margin_ratio = MM / equity_after (inf when equity_after <= 0);
      liquidated = equity_after <= MM (every position closes: positions_liquidated = held count)
    * isolated margin: position i has margin ``m_i = A |p_i| / sum_j |p_j|`` (the equity split in
      proportion to notional). It is liquidated when ``m_i + pnl_i <= MM_i`` and then loses its whole
      margin (``pnl_i -> -m_i``; what is left goes to the exchange's liquidation). equity_after =
      A + sum_i pnl_i; maintenance_margin = sum of MM_i of surviving positions; margin_ratio =
      max_i MM_i / (m_i + pnl_i) over held positions (inf when one has no equity left);
      liquidated = any position liquidated
    * oversized: the held symbols whose notional before or after the shock exceeds their last
      bracket's max_notional (null when none)
    * capital_sufficient = not liquidated, not oversized and equity_after >= maintenance_margin + buffer * A

    Weights with ``|w_i| <= FLAT_WEIGHT`` (1e-6, solver noise) are treated as 0. Symbols held
    (w_i != 0) must be in ``tiers`` (perpfolio.tiers.resolve_tiers covers any symbol). ``betas``
    maps each reference symbol the price scenarios name to the N betas against it (NaN where
    unknown; only held symbols' matter); a replay uses those against its ``reference`` when given;
    ``vols`` (per-bar volatilities, N) and ``bar_hours`` (the length of those bars, hours) are
    needed only by ``volatility`` scenarios; ``tier_sources`` (symbol -> where its tiers came from)
    only fills ``tier_source``. The moves, brackets and checks that do not depend on the leverage
    or the margin mode are computed once for all of them.

    Returns one row per (leverage, margin_mode, scenario), in that order: scenario, kind, reference,
    shock (``Scenario.headline``), leverage, margin_mode, account_usdt, pnl, equity_after,
    maintenance_margin (USDT), pnl_frac, equity_after_frac (divided by A), margin_ratio, liquidated,
    positions_liquidated, capital_sufficient, oversized, proxied (symbols moved by a substitute,
    with how), tier_source (the distinct sources of the held symbols' tiers).
    """
    w = np.asarray(weights, dtype=float)
    n = len(symbols)
    b = {ref: np.asarray(v, dtype=float) for ref, v in betas.items()}
    if w.shape != (n,) or any(v.shape != (n,) for v in b.values()):
        raise DataError(f"stress_test: weights {w.shape} and the betas against {list(b)} "
                        f"{[v.shape for v in b.values()]} must all be ({n},)")
    bad_w = np.flatnonzero(~np.isfinite(w))
    if len(bad_w):
        raise DataError(f"stress_test: weights for {symbols[bad_w[0]]} is {w[bad_w[0]]}")
    w = np.where(np.abs(w) > FLAT_WEIGHT, w, 0.0)
    held = w != 0
    leverages = [float(x) for x in np.atleast_1d(np.asarray(leverage, dtype=float))]
    modes = [margin_mode] if isinstance(margin_mode, str) else list(margin_mode)
    for name, value, ok in (("leverage", leverage, bool(leverages) and all(x > 0 for x in leverages)),
                            ("equity", equity, equity > 0), ("account_usdt", account_usdt, account_usdt > 0),
                            ("buffer", buffer, buffer >= 0)):
        if not ok:
            raise ConfigError(f"stress_test: {name} must be {'>= 0' if name == 'buffer' else '> 0'}, got {value}")
    if not modes or any(mode not in ("cross", "isolated") for mode in modes):
        raise ConfigError(f"stress_test: margin_mode must be 'cross' or 'isolated', got {margin_mode!r}")
    if not scenarios:
        raise ConfigError("stress_test: scenarios is empty")
    tier_lists = held_tier_lists(symbols, held, tiers, "stress_test")
    moves, rates, proxied = _scenario_moves(scenarios, symbols, np.sign(w), b, vols, bar_hours)
    floors, mmr, cum, caps = bracket_arrays(tier_lists)
    acct = equity * account_usdt
    n_scen = len(scenarios)
    columns: dict[str, list] = {k: [] for k in ("leverage", "margin_mode", "pnl", "equity_after", "maintenance_margin",
                                                "margin_ratio", "liquidated", "positions_liquidated",
                                                "capital_sufficient", "oversized")}
    for lev in leverages:
        pos = lev * acct * w
        pos_pnl = (moves - rates) * pos
        after = np.abs(pos * (1.0 + moves))
        mm_pos = bracket_margin(after, floors, mmr, cum)
        over = held & ((np.abs(pos) > caps) | (after > caps))
        oversized = [", ".join(symbols[i] for i in np.flatnonzero(row)) or None for row in over]
        for mode in modes:
            pnl, mm, margin_ratio, liquidated, n_liq = _margin(mode, acct, pos, pos_pnl, mm_pos, held)
            equity_after = acct + pnl
            columns["leverage"].append(np.full(n_scen, lev))
            columns["margin_mode"] += [mode] * n_scen
            columns["pnl"].append(pnl)
            columns["equity_after"].append(equity_after)
            columns["maintenance_margin"].append(mm)
            columns["margin_ratio"].append(margin_ratio)
            columns["liquidated"].append(liquidated)
            columns["positions_liquidated"].append(n_liq.astype(np.int64))
            columns["capital_sufficient"].append(~liquidated & ~over.any(axis=1) & (equity_after >= mm + buffer * acct))
            columns["oversized"] += oversized
    blocks = len(leverages) * len(modes)
    pnl, equity_after = np.concatenate(columns["pnl"]), np.concatenate(columns["equity_after"])
    return pl.DataFrame({
        "scenario": [sc.name for sc in scenarios] * blocks,
        "kind": [sc.kind for sc in scenarios] * blocks,
        "reference": pl.Series([sc.reference if sc.kind in ("price", "replay") else None for sc in scenarios] * blocks,
                               dtype=pl.String),
        "shock": [float(sc.headline) for sc in scenarios] * blocks,
        "leverage": np.concatenate(columns["leverage"]),
        "margin_mode": columns["margin_mode"],
        "account_usdt": np.full(n_scen * blocks, float(account_usdt)),
        "pnl": pnl,
        "equity_after": equity_after,
        "maintenance_margin": np.concatenate(columns["maintenance_margin"]),
        "pnl_frac": pnl / acct,
        "equity_after_frac": equity_after / acct,
        "margin_ratio": np.concatenate(columns["margin_ratio"]),
        "liquidated": np.concatenate(columns["liquidated"]),
        "positions_liquidated": np.concatenate(columns["positions_liquidated"]),
        "capital_sufficient": np.concatenate(columns["capital_sufficient"]),
        "oversized": pl.Series(columns["oversized"], dtype=pl.String),
        "proxied": pl.Series(proxied * blocks, dtype=pl.String),
        "tier_source": pl.Series([_sources(symbols, held, tier_sources)] * (n_scen * blocks), dtype=pl.String),
    })


def _margin(mode, acct, pos, pos_pnl, mm_pos, held):
    """Per scenario (rows of the S x N position arrays): pnl, maintenance margin, margin ratio,
    liquidated and positions liquidated under ``mode`` (see :func:`stress_test`)."""
    if mode == "cross":
        pnl = pos_pnl.sum(axis=1)
        equity_after = acct + pnl
        mm = mm_pos.sum(axis=1)
        margin_ratio = np.divide(mm, equity_after, out=np.full(len(mm), np.inf), where=equity_after > 0)
        liquidated = equity_after <= mm
        return pnl, mm, margin_ratio, liquidated, np.where(liquidated, held.sum(), 0)
    gross = np.abs(pos).sum()
    margin = acct * np.abs(pos) / gross if gross > 0 else np.zeros(len(pos))  # a flat book has no position to back
    own = margin + pos_pnl
    liq_pos = held & (own <= mm_pos)
    pnl = np.where(liq_pos, -margin, pos_pnl).sum(axis=1)
    mm = np.where(liq_pos, 0.0, mm_pos).sum(axis=1)
    ratio = np.divide(mm_pos, own, out=np.full(own.shape, np.inf), where=own > 0)
    n_liq = liq_pos.sum(axis=1)
    return pnl, mm, np.where(held, ratio, 0.0).max(axis=1), n_liq > 0, n_liq


def liquidation_levels(
    weights: np.ndarray,
    symbols: Sequence[str],
    *,
    leverage: float,
    tiers: Mapping[str, Sequence[Tier]],
    margin_mode: MarginMode = "cross",
    equity: float = 1.0,
    account_usdt: float = 100_000.0,
    tier_sources: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """Liquidation price of every held position, moving that symbol alone (others unchanged).

    With ``p = leverage * A * w_i`` (``A = equity * account_usdt``, ``q = |p|``), equity ``E``
    (cross: the account ``A``; isolated: the position's margin ``m_i = A q / sum_j |p_j|``) and the
    maintenance margin of the other positions ``M_o`` (cross: ``sum_{j != i} MM_j(|p_j|)``;
    isolated: 0), the position is liquidated when ``E + p s <= MM(q (1 + s)) + M_o``. Within
    bracket k, ``MM = q (1 + s) mmr_k - cum_k``, so the boundary is at
    ``s* = (q mmr_k - cum_k + M_o - E) / (p - q mmr_k)``, kept for the bracket that holds the
    notional ``q (1 + s*)`` (the last bracket is taken as open-ended). Within a bracket the equity
    gap shrinks as the price moves against the position, so with a continuous table (Binance,
    Bybit) the root is unique. A whole-position table (OKX) makes MM jump up at a bracket boundary,
    which can liquidate a growing position AT the boundary: ``s*`` is then the first adverse move
    at which equity is at or below MM, a root inside a bracket or such a boundary. A position
    already at or below its margin gets the nearest root (the move that would restore it).

    Weights with ``|w_i| <= FLAT_WEIGHT`` are no position (no row). Returns one row per held symbol:
    symbol, weight, notional (USDT), account_usdt, margin_mode, margin (USDT, the equity that backs
    the position), liquidation_move ``s*`` (the price return that liquidates, null when no positive
    price does: e.g. a fully collateralized long), liquidation_price_ratio ``1 + s*`` (liquidation
    price / current price, null likewise), distance ``-sign(p) s*`` (the adverse move to
    liquidation, a fraction; 0 when already liquidatable), exceeds_max_notional (the position is
    beyond its last bracket: the exchange would not accept it) and tier_source (null without
    ``tier_sources``).
    """
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(symbols),) or not np.isfinite(w).all():
        raise DataError(f"liquidation_levels: weights {w} must be {len(symbols)} finite values")
    w = np.where(np.abs(w) > FLAT_WEIGHT, w, 0.0)
    if margin_mode not in ("cross", "isolated"):
        raise ConfigError(f"liquidation_levels: margin_mode must be 'cross' or 'isolated', got {margin_mode!r}")
    if not (leverage > 0 and equity > 0 and account_usdt > 0):
        raise ConfigError("liquidation_levels: leverage, equity and account_usdt must be > 0")
    held = w != 0
    tier_lists = held_tier_lists(symbols, held, tiers, "liquidation_levels")
    floors, mmr, cum, caps = bracket_arrays(tier_lists)
    acct = equity * account_usdt
    pos = leverage * acct * w
    q = np.abs(pos)
    mm_now = bracket_margin(q[None, :], floors, mmr, cum)[0]
    if margin_mode == "cross":
        backing = np.full(len(w), acct)
        others = mm_now.sum() - mm_now
    else:
        backing = acct * q / q.sum() if q.sum() > 0 else np.zeros(len(w))
        others = np.zeros(len(w))
    safe_now = backing - mm_now - others > 0  # equity above maintenance margin at today's price
    with np.errstate(divide="ignore", invalid="ignore"):
        roots = ((q[:, None] * mmr - cum + others[:, None] - backing[:, None])
                 / (pos[:, None] - q[:, None] * mmr))
        notional = q[:, None] * (1.0 + roots)
        upper = np.concatenate([floors[:, 1:], np.full((len(w), 1), np.inf)], axis=1)
        # a liquidation price within rounding of 0 (e.g. a fully collateralized long) is no price at all
        in_bracket = (np.isfinite(roots) & (1.0 + roots > ZERO_PRICE_RATIO)
                      & (notional >= floors - 1e-9 * np.maximum(floors, 1)) & (notional <= upper))
        # the move that lands exactly on bracket k's floor, liquidating there if MM of bracket k is reached
        edges = floors[:, 1:] / q[:, None] - 1.0
        edge_gap = (backing[:, None] + pos[:, None] * edges - (floors[:, 1:] * mmr[:, 1:] - cum[:, 1:])
                    - others[:, None])
        at_edge = np.isfinite(edges) & (1.0 + edges > ZERO_PRICE_RATIO) & (edge_gap <= 0)
        adverse = -np.sign(pos)[:, None]
        # safe now: the nearest adverse root or boundary; else the nearest root (where the margin is restored)
        first = np.where(safe_now[:, None],
                         np.concatenate([in_bracket & (adverse * roots >= 0), at_edge & (adverse * edges >= 0)], axis=1),
                         np.concatenate([in_bracket, np.zeros_like(at_edge)], axis=1))
    moves = np.concatenate([roots, edges], axis=1)
    away = np.where(first, np.abs(moves), np.inf)
    pick = away.argmin(axis=1)
    rows = np.arange(len(w))
    move = np.where(np.isfinite(away[rows, pick]), moves[rows, pick], np.nan)
    idx = np.flatnonzero(held)
    dist = np.maximum(0.0, -np.sign(pos) * move)
    return pl.DataFrame({
        "symbol": [symbols[i] for i in idx],
        "weight": w[idx],
        "notional": pos[idx],
        "account_usdt": np.full(len(idx), float(account_usdt)),
        "margin_mode": [margin_mode] * len(idx),
        "margin": backing[idx],
        "liquidation_move": pl.Series(move[idx], dtype=pl.Float64).fill_nan(None),
        "liquidation_price_ratio": pl.Series(1.0 + move[idx], dtype=pl.Float64).fill_nan(None),
        "distance": pl.Series(dist[idx], dtype=pl.Float64).fill_nan(None),
        "exceeds_max_notional": q[idx] > caps[idx],
        "tier_source": pl.Series([None if tier_sources is None else tier_sources[symbols[i]] for i in idx],
                                 dtype=pl.String),
    })


def _sources(symbols, held, tier_sources) -> str | None:
    """The distinct sources of the held symbols' tiers, sorted and comma-separated (None: none held or not given)."""
    if tier_sources is None:
        return None
    lacking = [s for s, h in zip(symbols, held) if h and s not in tier_sources]
    if lacking:
        raise ConfigError(f"stress_test: tier_sources has no entry for held symbol {lacking[0]}")
    return ", ".join(sorted({tier_sources[s] for s, h in zip(symbols, held) if h})) or None


def held_tier_lists(symbols, held, tiers, where):
    """Each symbol's brackets in symbol order: its own for a held one (ConfigError, naming ``where``,
    when a held symbol has none), a zero-margin placeholder for one not held."""
    out = []
    for sym, h in zip(symbols, held):
        if not h:
            out.append([Tier(0.0, np.inf, 0.0, np.inf, 0.0)])
        elif sym in tiers:
            validate_tiers(tiers[sym], where=f"{where}: leverage tiers of {sym}")
            out.append(tiers[sym])
        else:
            raise ConfigError(f"{where}: no leverage tiers for symbol {sym}; resolve them with "
                              "perpfolio.tiers.resolve_tiers (its conservative default covers any symbol)")
    return out


def _scenario_moves(scenarios, symbols, signs, betas, vols, bar_hours):
    """S x N price moves, S x N funding charges (fraction of notional a long pays) and, per
    scenario, the held symbols moved by a substitute and how (None when none)."""
    n = len(symbols)
    held = signs != 0
    moves, rates = np.zeros((len(scenarios), n)), np.zeros((len(scenarios), n))
    proxied: list[str | None] = []
    for k, sc in enumerate(scenarios):
        notes: list[str] = []
        if sc.kind not in _KINDS:
            raise ConfigError(f"stress_test: scenario {sc.name}: unknown kind {sc.kind!r}")
        if sc.kind == "price" and sc.reference == JOINT:
            moves[k] = sc.shock
        elif sc.kind == "price":
            if sc.reference not in symbols:
                raise ConfigError(f"stress_test: scenario {sc.name}: reference {sc.reference} not in symbols "
                                  f"(name a symbol, or '{JOINT}' for a joint shock)")
            if sc.reference not in betas:
                raise ConfigError(f"stress_test: scenario {sc.name}: no betas against its reference {sc.reference} "
                                  f"(betas given against {sorted(betas)})")
            ref = list(symbols).index(sc.reference)
            known = np.isfinite(betas[sc.reference])
            known[ref] = True
            moves[k] = np.where(held, np.where(known, betas[sc.reference], 1.0), 0.0) * sc.shock
            moves[k, ref] = sc.shock
            notes = [f"{symbols[i]} (beta 1: no beta to {sc.reference})" for i in np.flatnonzero(held & ~known)]
        elif sc.kind == "funding":
            rates[k] = sc.funding_rate_8h * sc.hours / 8.0
        elif sc.kind == "volatility":
            if bar_hours is None or not bar_hours > 0:
                raise ConfigError(f"stress_test: scenario {sc.name} needs bar_hours > 0 (the length of the bars "
                                  f"the volatilities are measured on), got {bar_hours}")
            v = np.full(n, np.nan) if vols is None else np.asarray(vols, dtype=float)
            usable = np.isfinite(v) & (v >= 0)
            lacking = np.flatnonzero(held & ~usable)
            if len(lacking) and not (held & usable).any():
                raise DataError(f"stress_test: scenario {sc.name} needs the per-bar volatility of "
                                f"{symbols[lacking[0]]}, got {v[lacking[0]]}")
            if len(lacking):
                v = np.where(usable, v, v[held & usable].max())
                notes = [f"{symbols[i]} (largest held volatility)" for i in lacking]
            scale = sc.sigmas * sc.vol_multiplier * np.sqrt(sc.hours / bar_hours)
            moves[k] = -signs * scale * np.where(held, v, 0.0)
        else:
            replay = dict(sc.moves)
            if not replay:
                raise DataError(f"stress_test: replay {sc.name} has no moves")
            ref_move = replay.get(sc.reference) if sc.reference is not None else None
            ref_betas = betas.get(sc.reference, np.full(n, np.nan)) if sc.reference is not None else np.full(n, np.nan)
            for i in np.flatnonzero(held):
                s = symbols[i]
                if s in replay:
                    moves[k, i] = replay[s]
                elif ref_move is not None and np.isfinite(ref_betas[i]):
                    moves[k, i] = ref_betas[i] * ref_move
                    notes.append(f"{s} (beta x {sc.reference})")
                else:
                    moves[k, i] = float(np.mean(list(replay.values())))
                    notes.append(f"{s} (bar mean)")
        low = np.flatnonzero(held & (moves[k] <= -1.0))
        if len(low):
            raise ConfigError(f"stress_test: scenario {sc.name} moves {symbols[low[0]]} by "
                              f"{moves[k, low[0]]} <= -100%")
        proxied.append(", ".join(notes) or None)
    return moves, rates, proxied


def bracket_arrays(tier_lists: Sequence[Sequence[Tier]]):
    """Pad per-symbol brackets to N x B arrays (floors padded with +inf so they never match) and
    each symbol's last max_notional (N)."""
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


def bracket_margin(notional, floors, mmr, cum) -> np.ndarray:
    """S x N absolute notionals -> S x N maintenance margins (USDT), the last bracket extended."""
    idx = (notional[..., None] >= floors).sum(axis=-1) - 1
    rows = np.arange(notional.shape[1])
    return notional * mmr[rows, idx] - cum[rows, idx]
