"""Synthetic hourly perpetual-futures market: candles, funding events, an implied-vol index and the
mark and index (spot) prices of every perpetual.

Returns (symbol i, hourly bar t opened at ``start + t h``; LOG returns per bar)::

    r_i(t) = mu_i / 8760 - (m(t) s_i)^2 / 2 - log(1 + c_i) / 2880
             + m(t) s_i sqrt(1 - J) [rho_i sqrt(h_m(t)) e_m(t) + sqrt(1 - rho_i^2) sqrt(h_i(t)) e_i(t)]
             + m(t) s_i sqrt(J / lam) B_i(t) n_i(t)

- ``s_i = vol_i / sqrt(8760)``: calm hourly volatility; ``vol_i`` annualized base volatility,
  ``mu_i`` a small annual drift of the SIMPLE return: the log drift gives back the variance drag
  and the expected log loss of the planted crash ``c_i`` (one per 2880-hour cycle, below), so the
  market has no built-in downward bias, ``rho_i`` the loading on the market factor (one-factor model, so
  corr(i, j) is about ``rho_i rho_j``).
- ``e_m, e_i``: Student-t innovations, 4.5 degrees of freedom, scaled to unit variance.
- ``h(t+1) = omega + h(t) (a min(e(t)^2, 16) + b)``: GARCH(1,1) variance with the news term capped
  at 4 sd (one outlier cannot blow the variance up), ``omega = 1 - b - a E[min(e^2, 16)]`` so
  E[h] = 1. Market factor a=0.10, b=0.88; each symbol's own component a=0.05, b=0.93.
- Jumps: ``B_i(t) ~ Bernoulli(lam)``, ``lam = 1/240`` per hour, ``n_i ~ N(0, 1)``; jumps carry a
  share J = 5 % of the variance, so ``vol_i`` is the total calm volatility.
- ``m(t)``: turbulence multiplier, 1 when calm and 3 on the plateau of an episode.

Candles: ``close_i(t) = price0_i exp(sum_{u<=t} r_i(u))``, ``open_i(t) = close_i(t-1)`` (first
bar: ``price0_i``), ``high = max(open, close) exp(0.6 m s_i |g1|)``, ``low = min(open, close)
exp(-0.6 m s_i |g2|)``, ``volume`` (base units) ``= notional_i / close (0.5 + |r| / s_i)
exp(0.4 g3 - 0.08)``, lognormal and larger on large moves (g ~ N(0, 1)).

Parameters: BTCUSDT vol 50 %, rho 0.92, price0 95 000; ETHUSDT 65 %, 0.88, 3 300; SOLUSDT 85 %,
0.82, 190. Any other symbol draws its own from its generator: vol U(60 %, 120 %), rho
U(0.5, 0.85), price0 log-uniform on [0.05, 500], drift U(-10 %, 20 %) a year.

Planted schedule (d = days since ``start``; independent of ``end``):

- Turbulent episodes on d in [70 + 120 j, 78 + 120 j), j = 0, 1, ...: ``m`` rises from 1 to 3
  along a raised cosine over the first 36 h, stays at 3 and falls back over the last 36 h.
- One crash bar per episode, 14:00 UTC on its second calendar day: BTCUSDT's simple return is
  -11 % (log -0.1165); symbol i falls by ``11 % (rho_i vol_i) / (rho_BTC vol_BTC)``, at most 35 %.
  The crash return replaces the model return of that bar.
- Funding interval (hours): 1 for every symbol but BTCUSDT on d in [70 + 120 j, 80 + 120 j)
  (episode plus two days); else 4 for symbols with ``vol_i >= 60 %`` on d mod 200 in
  [110, 140); else 8. The interval is chosen at each event for the interval starting there, and
  events sit on multiples of their interval from 00:00 UTC, so leaving a 1 h or 4 h regime keeps
  the short interval until the clock is aligned. ``interval_hours`` of an event is the length of
  the interval that ENDS at it, equal to the gap since the previous event.

Funding rate per 8 h, an AR(1) on the hourly grid k (event time ``start + k h``)::

    f(k) = 0.95 f(k-1) + 0.05 target(k) + 2e-5 eps(k),   f(0) = 1e-4
    target(k) = 1e-4 + 5e-4 max(0, z(k) - 1.25) - 3e-4 stress(k-1)

``z(k)``: log return of the 24 bars before k divided by ``s_i sqrt(24)`` (strong up-trends give
positive spikes); ``stress(t) = w(t) + exp(-(t - crash) / 72 h)`` after a crash, with w the 0..1
turbulence ramp; f is clipped to [-0.75 %, +0.75 %]. An event's ``rate = f(k) interval / 8``
(decimal per funding interval, positive = longs pay shorts) and ``bar_ts = ts - 1 h``.

Implied vol (annualized decimal, BTC and ETH only, hourly; no index for other underlyings)::

    v(t) = E_5d[vol_i^2 (rho_i^2 h_m + (1 - rho_i^2) h_i)](t)          smooth base-variance forecast
    iv(t) = 1.2 sqrt(v(t) (1 + 0.3 + 0.1 (E_10d[m^2](t) - 1))) exp(x(t))

``E_n`` is an exponentially weighted mean with half-life n (started at the calm value); 0.3 is an
event-risk premium (about half the average variance the planted turbulence and crashes add over a
120-day cycle), so iv is about 1.37 x the base vol when calm and above the 30-day realized vol on
average;
``0.1 E_10d[m^2]`` is the partial, lagged reaction to an episode, which leaves iv below the
realized vol for days after a crash. ``x``: AR(1) noise, coefficient 0.98, stationary sd 3 %.

Reference prices (index = the spot composite, mark = the price margin is marked at), per symbol::

    b(t) = 0.9 b(t-1) + 0.1 f(t+1) + 3e-4 sqrt(1 - 0.9^2) u(t),   b(-1) = 1e-4 (the funding mean)
    index_close(t) = close(t) / (1 + b(t))
    mark_close(t)  = index_close(t) (1 + E_1h[b](t))

``b`` is the perp's basis (premium over spot, decimal): an AR(1) with a half-life of about 6.6 h
pulled toward the per-8h funding rate ``f`` at the bar's close, plus N(0, 1) noise ``u`` (stationary
sd 3 bp), so a positive funding goes with a perp premium and a negative one with a discount.
``E_1h`` is an EWMA with a half-life of 1 h started at ``b(-1)``: the mark follows the perp with a
short smoothing lag, as the exchange's mark (index plus a moving average of the basis) does. Each
series opens at its previous close (first bar: ``price0 / (1 + b(-1))`` for the index, ``price0``
for the mark) and borrows the perp bar's excursion: ``high = max(open, close) x high_perp /
max(open_perp, close_perp)`` and likewise ``low`` with min, so OHLC is consistent by construction.

Data events (``data_events=True``, PERPFOLIO_SYNTHETIC_EVENTS=on): the market is published the
way a real exchange publishes its universe. The true path above is generated as before; an event
changes only what is published (off: the clean, always-listed market, bit for bit):

- listing at hour L: no candle, mark or index bar with ts < L and no funding event settling a bar
  before L (the first event comes after L). Every price of the symbol is rescaled so the listing
  bar opens at ``price0`` (its path starts there; returns, funding rates and basis unchanged).
- delisting at hour D: no bar with ts >= D and no funding event after ts D, for ever.
- outage [a, b): candle, mark and index bars with ts in [a, b) are missing, and so are the funding
  events that settle them (bar_ts in [a, b)). The path continues underneath: the first bar after
  the hole opens at the true previous close and closes at the true close, so the gap-spanning
  return is the true move. The exchange-wide outage hides every symbol (the implied-vol index is
  another venue's and stays).
- bad print at bar t: the candle's close is 10 x the true close and its high ``max(open, 10 close)``
  times the bar's usual excursion factor (low, volume, mark and index keep their true values);
  bar t + 1 opens at the true close. Close-to-close: 10 x the true gross return of bar t, minus 1
  (about +900 %), then the true gross return of bar t + 1 / 10, minus 1 (about -90 %).
- missing funding day n: every funding event of the symbol with ts in that UTC day is absent.
  UTC day n starts 24 n hours after the first midnight at or after ``start``.

Planted for the known symbols (hours since ``start``, d = 24 h), so the default run over
[2025-01-01, 2025-07-30) with a 720-bar window meets every kind:
SOLUSDT listed at 20 d and delisted at 170 d; ETHUSDT outage [45 d + 13 h, 45 d + 18 h) (5 h; on a
midnight start its 16:00 funding event is lost); SOLUSDT bad print at bar 60 d + 14 h; ETHUSDT
missing funding day 75 (inside the first episode's 1 h funding: 24 events); every symbol's
exchange-wide outage [100 d + 7 h, 100 d + 10 h) (3 h; the 08:00 funding event is lost). BTCUSDT
(the stress reference) has no other event: never listed late, never delisted.
Drawn for every other symbol from its own streams, at rates independent of ``end``: listed late
with probability 1/5, at an hour uniform in [1 d, 180 d); delisted with probability 1/10, at an
hour uniform in [L + 30 d, L + 180 d) (L = 0 when listed from the start); an outage starts at a
listed hour with probability 1 / (90 x 24) (about one per 90 days), lasting 2 to 8 h (uniform); a
published bar is a bad print with probability 1 / (180 x 24); a UTC day starting while the symbol
is listed misses its funding with probability 1/180.

Determinism: every random stream is ``np.random.default_rng(SeedSequence([seed, key,
component]))`` with ``key = zlib.crc32(symbol)`` (0 for the market factor) and draws one value per
hour in time order, so a later ``end`` only appends rows and adding symbols changes nothing for
the others (prefix stability: the pipeline generates daily partitions). The data-event streams of
a drawn symbol are four values (listing, delisting), two per hour (outage start and length), one
per hour (bad print) and one per UTC day (missing funding), each in time order; no event time
depends on ``end``, and the only shared event is the planted exchange-wide outage.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError
from perpfolio.sources.window import check_window

HOURS_PER_YEAR = 8760
SOURCE = "synthetic"
_TS = pl.Datetime("us", "UTC")

# Student-t innovations, scaled to unit variance: Var(t_df) = df / (df - 2).
_T_DF = 4.5
_T_SCALE = float(np.sqrt((_T_DF - 2.0) / _T_DF))
_GARCH_MARKET = (0.10, 0.88)
_NEWS_CAP = 16.0  # cap on e^2 in the variance update (4 sd), so one outlier cannot explode h
_GARCH_IDIO = (0.05, 0.93)
_JUMP_PROB = 1.0 / (10 * 24)
_JUMP_SHARE = 0.05

# Planted schedule, in hours since start.
_TURB_FIRST = 70 * 24
_TURB_EVERY = 120 * 24
_TURB_LEN = 8 * 24
_TURB_RAMP = 36
_TURB_MULT = 3.0
_FAST_FUNDING_LEN = _TURB_LEN + 2 * 24
_FOUR_H_CYCLE = 200 * 24
_FOUR_H_WINDOW = (110 * 24, 140 * 24)
_FOUR_H_MIN_VOL = 0.60
_CRASH_BTC = -0.11
_CRASH_CAP = -0.35

# Funding rate per 8h.
_FUND_MEAN = 1e-4
_FUND_PHI = 0.95
_FUND_NOISE = 2e-5
_FUND_UP = 5e-4
_FUND_UP_Z = 1.25
_FUND_STRESS = 3e-4
_FUND_CRASH_DECAY_H = 72.0
_FUND_CLIP = 0.0075

# Implied-vol index.
_IV_SYMBOLS = ("BTCUSDT", "ETHUSDT")
_IV_PREMIUM = 1.2
_IV_FAST_HL_H = 5 * 24
_IV_TURB_HL_H = 10 * 24
_IV_TURB_SHARE = 0.1
_IV_EVENT_PREMIUM = 0.3
_IV_NOISE_PHI = 0.98
_IV_NOISE_SD = 0.03

# Basis of the perp over its index (reference prices).
_BASIS_PHI = 0.9  # per hour: half-life log(0.5) / log(0.9) = 6.6 h
_BASIS_SD = 3e-4  # stationary sd of the noise part, decimal
_MARK_HL_H = 1.0  # EWMA half-life of the basis in the mark price, hours

# Data events (data_events=True): rates of the drawn events, hours since start.
_LATE_PROB = 1 / 5
_LATE_HOURS = (1 * 24, 180 * 24)
_DELIST_PROB = 1 / 10
_DELIST_AFTER_HOURS = (30 * 24, 180 * 24)
_OUTAGE_PROB_H = 1 / (90 * 24)
_OUTAGE_HOURS = (2, 8)  # inclusive
_BAD_PRINT_PROB_H = 1 / (180 * 24)
_BAD_PRINT_FACTOR = 10.0
_FUNDING_GAP_PROB_D = 1 / 180
_EXCHANGE_OUTAGE = (100 * 24 + 7, 3)  # first hidden bar, hours

# Random-stream components (market uses key 0 and its own component ids).
_PARAMS, _IDIO, _JUMP_U, _JUMP_N, _RANGE, _VOLUME, _FUNDING, _IV_NOISE, _BASIS = range(9)
_LIFE, _OUTAGE, _BAD_PRINT, _FUNDING_GAP = range(9, 13)
_MARKET = 100


@dataclass(frozen=True)
class _Params:
    vol_ann: float
    rho: float
    price0: float
    drift_ann: float
    notional_per_hour: float


_KNOWN = {
    "BTCUSDT": _Params(0.50, 0.92, 95_000.0, 0.10, 7e8),
    "ETHUSDT": _Params(0.65, 0.88, 3_300.0, 0.05, 4e8),
    "SOLUSDT": _Params(0.85, 0.82, 190.0, 0.15, 1.5e8),
}


@dataclass(frozen=True)
class _Plan:
    """One symbol's data events in hours since start (module docstring, "Data events")."""

    listing: int = 0  # first published bar
    delisting: int | None = None  # first bar no longer published; None = never delisted
    outages: tuple[tuple[int, int], ...] = ()  # (first hidden bar, length in hours)
    bad_prints: tuple[int, ...] = ()
    funding_days: tuple[int, ...] = ()  # UTC day numbers without funding events


_PLANTED = {
    "BTCUSDT": _Plan(),
    "ETHUSDT": _Plan(outages=((45 * 24 + 13, 5),), funding_days=(75,)),
    "SOLUSDT": _Plan(listing=20 * 24, delisting=170 * 24, bad_prints=(60 * 24 + 14,)),
}


@dataclass(frozen=True)
class _DataEvents:
    """What the data events of one run hide or alter; hours x symbols masks over bars (ts offsets)."""

    listing: np.ndarray  # per symbol: hour of the first published bar (0 = listed from the start)
    hidden: np.ndarray  # bar not published (candles, mark and index)
    bad_print: np.ndarray  # candle close printed at _BAD_PRINT_FACTOR x the true close
    funding_dropped: np.ndarray  # by bar_ts: the funding event settling this bar is not published
    rows: list[tuple[str, str | None, datetime, datetime]]  # rows of SyntheticMarket.events


@dataclass(frozen=True)
class SyntheticMarket:
    """Raw frames of one synthetic run (schemas of the raw layer) and the planted events.

    ``candles``: ts, symbol, open, high, low, close, volume, source — bars with ts in [start, end).
    ``funding``: ts, bar_ts, symbol, rate (per interval), interval_hours, source — ts in (start, end].
    ``implied_vol``: ts, underlying, iv (annualized decimal), source — BTC and ETH only.
    ``events``: kind ("turbulent" | "crash" | "funding_1h" | "funding_4h", and with data events
    "listing" | "delisting" | "outage" | "bad_print" | "funding_missing"), symbol (null when
    market-wide), start, end (the planned end, may lie after the requested end); every event that
    starts in [start, end). Funding regimes are the scheduled windows; the interval itself switches
    at the first funding event on or after the window edge. "listing" and "delisting" are instants
    (start = end = the first published bar / the first bar no longer published); "outage" spans
    the hidden bars, "bad_print" its bar, "funding_missing" its UTC day.
    ``reference_prices``: ts, symbol, kind ("index" | "mark"), open, high, low, close, source —
    every symbol's index and mark bars with ts in [start, end), sorted by symbol, kind, ts.
    Candles, funding and implied_vol are sorted by symbol (underlying), then ts.
    """

    candles: pl.DataFrame
    funding: pl.DataFrame
    implied_vol: pl.DataFrame
    events: pl.DataFrame
    reference_prices: pl.DataFrame

    def __repr__(self) -> str:
        return (
            f"SyntheticMarket(candles={self.candles.height} rows, funding={self.funding.height} rows, "
            f"implied_vol={self.implied_vol.height} rows, events={self.events.height} rows, "
            f"reference_prices={self.reference_prices.height} rows)"
        )


def generate_market(
    symbols: Sequence[str], start: datetime, end: datetime, *, seed: int = 7, data_events: bool = False
) -> SyntheticMarket:
    """Generate hourly candles, funding events, an implied-vol index and the mark and index prices
    (see module docstring).

    ``start``/``end`` are tz-aware UTC datetimes on the hour; bars cover [start, end), funding
    events (start, end]. Deterministic in ``seed`` and prefix-stable in ``end`` and ``symbols``.
    ``data_events``: publish listings, delistings, outages, bad prints and missing funding days
    (module docstring, "Data events"); False gives the clean, always-listed market.
    """
    syms = _check_args(symbols, start, end, seed)
    if not isinstance(data_events, bool):
        raise ConfigError(f"data_events must be True or False, got {data_events!r}")
    n_hours = int((end - start) / timedelta(hours=1))
    start_hod = start.hour
    params = [_params(s, seed) for s in syms]
    vol = np.array([p.vol_ann for p in params])
    rho = np.array([p.rho for p in params])
    s_h = vol / np.sqrt(HOURS_PER_YEAR)

    mult, ramp = _turbulence(n_hours)
    crash_bars = _crash_bars(start, n_hours)

    # Innovations: one generator per (symbol, component), one draw per hour in time order.
    e_m = _rng(seed, 0, _MARKET).standard_t(_T_DF, n_hours) * _T_SCALE
    e_i = _per_symbol(syms, seed, _IDIO, lambda g: g.standard_t(_T_DF, n_hours) * _T_SCALE)
    jump = _per_symbol(syms, seed, _JUMP_U, lambda g: g.random(n_hours) < _JUMP_PROB)
    jump_n = _per_symbol(syms, seed, _JUMP_N, lambda g: g.standard_normal(n_hours))

    h = _garch(np.column_stack([e_m, e_i]), *_garch_coefs(len(syms)))
    h_m, h_i = h[:, :1], h[:, 1:]
    scale = mult[:, None] * s_h
    btc = _KNOWN["BTCUSDT"]
    crash_simple = np.maximum(_CRASH_BTC * (rho * vol) / (btc.rho * btc.vol_ann), _CRASH_CAP)
    # Log drift that makes drift_ann the expected SIMPLE return: minus the variance drag of the bar
    # and minus the planted crash's log loss spread over its 120-day cycle (no built-in bear market).
    log_drift = (
        np.array([p.drift_ann for p in params]) / HOURS_PER_YEAR
        - 0.5 * scale**2
        - np.log1p(crash_simple) / _TURB_EVERY
    )
    r = (
        log_drift
        + scale * np.sqrt(1.0 - _JUMP_SHARE)
        * (rho * np.sqrt(h_m) * e_m[:, None] + np.sqrt(1.0 - rho**2) * np.sqrt(h_i) * e_i)
        + scale * np.sqrt(_JUMP_SHARE / _JUMP_PROB) * np.where(jump, jump_n, 0.0)
    )
    r[crash_bars] = np.log1p(crash_simple)

    data = _data_events(syms, seed, start, n_hours) if data_events else None
    bars = _bars(syms, params, r, s_h, mult, seed)
    if data is not None:
        bars = _listed_at_price0(bars, params, data.listing)
    candles = _candles(syms, params, start, r, s_h, bars, seed, data)
    rate_8h = _funding_rate_8h(syms, r, s_h, ramp, crash_bars, seed)
    funding = _funding(syms, params, start, start_hod, rate_8h, data)
    implied_vol = _implied_vol(syms, params, start, h_m, h_i, mult, seed)
    events = _events(syms, params, start, n_hours, crash_bars, [] if data is None else data.rows)
    reference = _reference_prices(syms, params, start, bars, rate_8h, seed, data)
    return SyntheticMarket(candles, funding, implied_vol, events, reference)


def _check_args(symbols: Sequence[str], start: datetime, end: datetime, seed: int) -> list[str]:
    if isinstance(symbols, str):
        raise ConfigError(f"symbols must be a sequence of exchange ids, got the string {symbols!r}")
    syms = list(symbols)
    if not syms:
        raise ConfigError("symbols must not be empty")
    bad = [s for s in syms if not isinstance(s, str) or not s]
    if bad:
        raise ConfigError(f"symbols must be non-empty strings, got {bad!r}")
    dupes = sorted({s for s in syms if syms.count(s) > 1})
    if dupes:
        raise ConfigError(f"symbols contain duplicates: {dupes!r}")
    check_window(start, end)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    return sorted(syms)


def _rng(seed: int, key: int, component: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), key, component]))


def _key(symbol: str) -> int:
    return zlib.crc32(symbol.encode("utf-8"))


def _per_symbol(syms, seed, component, draw) -> np.ndarray:
    """Hours x symbols array; column j drawn from symbol j's own stream."""
    return np.column_stack([draw(_rng(seed, _key(s), component)) for s in syms])


def _params(symbol: str, seed: int) -> _Params:
    if symbol in _KNOWN:
        return _KNOWN[symbol]
    g = _rng(seed, _key(symbol), _PARAMS)
    return _Params(
        vol_ann=g.uniform(0.60, 1.20),
        rho=g.uniform(0.50, 0.85),
        price0=float(np.exp(g.uniform(np.log(0.05), np.log(500.0)))),
        drift_ann=g.uniform(-0.10, 0.20),
        notional_per_hour=float(np.exp(g.uniform(np.log(1e6), np.log(5e7)))),
    )


def _garch_coefs(n_symbols: int) -> tuple[np.ndarray, np.ndarray]:
    alpha = np.array([_GARCH_MARKET[0]] + [_GARCH_IDIO[0]] * n_symbols)
    beta = np.array([_GARCH_MARKET[1]] + [_GARCH_IDIO[1]] * n_symbols)
    return alpha, beta


@functools.lru_cache
def _capped_t_moment(df: float, cap: float) -> float:
    """E[min(e^2, cap)] for a unit-variance Student-t e (trapezoid rule over |e| >= sqrt(cap))."""
    scale = np.sqrt((df - 2.0) / df)
    x = np.linspace(np.sqrt(cap), 2000.0, 200_001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p((x / scale) ** 2 / df)) / scale
    excess = (x**2 - cap) * pdf
    return 1.0 - 2.0 * float(np.sum((excess[1:] + excess[:-1]) / 2.0 * np.diff(x)))


def _garch(e: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """h(t) = omega + h(t-1) (a min(e(t-1)^2, c) + b), omega = 1 - b - a E[min(e^2, c)], so E[h] = 1.

    Pre-sample h = 1 and news E[min(e^2, c)], so h(0) = 1.
    """
    news_mean = _capped_t_moment(_T_DF, _NEWS_CAP)
    news = np.vstack([np.full(e.shape[1], news_mean), np.minimum(e[:-1] ** 2, _NEWS_CAP)])
    omega = 1.0 - beta - alpha * news_mean
    return _affine_scan(alpha * news + beta, np.broadcast_to(omega, e.shape), np.ones(e.shape[1]))


def _affine_scan(a: np.ndarray, b: np.ndarray, x_prev: np.ndarray) -> np.ndarray:
    """x(t) = a(t) x(t-1) + b(t) for t = 0..T-1, x(-1) = x_prev; arrays T x C (sequential in t)."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    x = x_prev
    for t in range(out.shape[0]):
        x = a[t] * x + b[t]
        out[t] = x
    return out


def _ewma(u: np.ndarray, half_life_h: float, init: np.ndarray) -> np.ndarray:
    lam = 0.5 ** (1.0 / half_life_h)
    return _affine_scan(np.broadcast_to(lam, u.shape), (1.0 - lam) * u, init)


def _turbulence(n_hours: int) -> tuple[np.ndarray, np.ndarray]:
    """Vol multiplier m(t) = 1 + (3 - 1) w(t) and the 0..1 ramp w(t) per bar."""
    tau = np.arange(n_hours)
    u = (tau - _TURB_FIRST) % _TURB_EVERY
    inside = (tau >= _TURB_FIRST) & (u < _TURB_LEN)
    edge = np.minimum(u, _TURB_LEN - u)
    w = np.where(edge >= _TURB_RAMP, 1.0, 0.5 * (1.0 - np.cos(np.pi * edge / _TURB_RAMP)))
    w = np.where(inside, w, 0.0)
    return 1.0 + (_TURB_MULT - 1.0) * w, w


def _episode_starts(n_hours: int) -> range:
    return range(_TURB_FIRST, n_hours, _TURB_EVERY)


def _crash_bars(start: datetime, n_hours: int) -> list[int]:
    """Bar of 14:00 UTC on the second calendar day of each episode (only bars before end)."""
    bars = []
    for ep in _episode_starts(n_hours):
        ep_start = start + timedelta(hours=ep)
        crash = ep_start.replace(hour=14) + timedelta(days=1)
        bar = int((crash - start) / timedelta(hours=1))
        if bar < n_hours:
            bars.append(bar)
    return bars


def _ts_series(name: str, start: datetime, offsets_h: np.ndarray) -> pl.Series:
    base = np.datetime64(start.replace(tzinfo=None), "us")
    return pl.Series(name, base + offsets_h.astype("timedelta64[h]")).dt.replace_time_zone("UTC")


def _symbol_series(name: str, syms: list[str], index: np.ndarray) -> pl.Series:
    return pl.Series(name, syms, dtype=pl.String).gather(index)


@dataclass(frozen=True)
class _Bars:
    """Hours x symbols arrays of the perp bars: open, close, and the intra-bar excursion factors
    ``up = high / max(open, close) >= 1`` and ``down = low / min(open, close) <= 1``."""

    open: np.ndarray
    close: np.ndarray
    up: np.ndarray
    down: np.ndarray


def _bars(syms, params, r, s_h, mult, seed) -> _Bars:
    n_hours = r.shape[0]
    price0 = np.array([p.price0 for p in params])
    close = price0 * np.exp(np.cumsum(r, axis=0))
    open_ = np.vstack([price0, close[:-1]])
    rng_range = _per_symbol(syms, seed, _RANGE, lambda g: g.standard_normal((n_hours, 2)).ravel())
    span = 0.6 * mult[:, None] * s_h
    return _Bars(open_, close, np.exp(span * np.abs(rng_range[0::2])), np.exp(-span * np.abs(rng_range[1::2])))


def _ohlc_frame(start, syms, open_, high, low, close) -> pl.DataFrame:
    """ts, symbol, open, high, low, close of hours x symbols arrays, sorted by symbol, ts."""
    n_hours, n = close.shape
    return pl.DataFrame(
        [
            _ts_series("ts", start, np.tile(np.arange(n_hours), n)),
            _symbol_series("symbol", syms, np.repeat(np.arange(n), n_hours)),
            pl.Series("open", open_.T.ravel()),
            pl.Series("high", high.T.ravel()),
            pl.Series("low", low.T.ravel()),
            pl.Series("close", close.T.ravel()),
        ]
    )


def _candles(syms, params, start, r, s_h, bars: _Bars, seed, data: _DataEvents | None) -> pl.DataFrame:
    """Perp candles; with data events the bad prints' close (and high) at 10 x and hidden bars dropped."""
    n_hours = r.shape[0]
    open_, close = bars.open, bars.close
    printed = close if data is None else np.where(data.bad_print, _BAD_PRINT_FACTOR * close, close)
    high = np.maximum(open_, printed) * bars.up
    low = np.minimum(open_, close) * bars.down
    noise = _per_symbol(syms, seed, _VOLUME, lambda g: g.standard_normal(n_hours))
    notional = np.array([p.notional_per_hour for p in params])
    volume = notional / close * (0.5 + np.abs(r) / s_h) * np.exp(0.4 * noise - 0.08)
    frame = _ohlc_frame(start, syms, open_, high, low, printed).with_columns(
        volume=pl.Series(volume.T.ravel()), source=pl.lit(SOURCE)
    )
    return frame if data is None else frame.filter(_published(data.hidden))


def _published(hidden: np.ndarray) -> pl.Series:
    """Row filter of an hours x symbols frame sorted by symbol, ts (as _ohlc_frame builds it)."""
    return pl.Series(~hidden.T.ravel())


def _reference_prices(syms, params, start, bars: _Bars, rate_8h, seed, data: _DataEvents | None) -> pl.DataFrame:
    """Index and mark bars (module docstring): the basis AR(1) toward the per-8h funding rate; with
    data events the hidden bars dropped."""
    n_hours, n = bars.close.shape
    u = _per_symbol(syms, seed, _BASIS, lambda g: g.standard_normal(n_hours))
    drive = (1.0 - _BASIS_PHI) * rate_8h + _BASIS_SD * np.sqrt(1.0 - _BASIS_PHI**2) * u
    b0 = np.full(n, _FUND_MEAN)
    basis = _affine_scan(np.broadcast_to(_BASIS_PHI, drive.shape), drive, b0)
    smooth = _ewma(basis, _MARK_HL_H, b0)
    price0 = np.array([p.price0 for p in params])
    index_close = bars.close / (1.0 + basis)
    mark_close = index_close * (1.0 + smooth)
    frames = []
    for kind, close, first_open in (("index", index_close, price0 / (1.0 + b0)), ("mark", mark_close, price0)):
        open_ = np.vstack([first_open, close[:-1]])
        high = np.maximum(open_, close) * bars.up
        low = np.minimum(open_, close) * bars.down
        frame = _ohlc_frame(start, syms, open_, high, low, close).with_columns(kind=pl.lit(kind))
        frames.append(frame if data is None else frame.filter(_published(data.hidden)))
    return (
        pl.concat(frames)
        .select("ts", "symbol", "kind", "open", "high", "low", "close", source=pl.lit(SOURCE))
        .sort("symbol", "kind", "ts")
    )


def _desired_interval(tau: int, *, fast: bool, four_h: bool) -> int:
    """Funding interval wanted for the interval that starts tau hours after start."""
    if fast and tau >= _TURB_FIRST and (tau - _TURB_FIRST) % _TURB_EVERY < _FAST_FUNDING_LEN:
        return 1
    if four_h and _FOUR_H_WINDOW[0] <= tau % _FOUR_H_CYCLE < _FOUR_H_WINDOW[1]:
        return 4
    return 8


def _aligned_interval(wanted: int, hour_of_day: int) -> int:
    return next(h for h in (8, 4, 1) if h <= wanted and hour_of_day % h == 0)


def _event_schedule(start_hod: int, n_hours: int, *, fast: bool, four_h: bool):
    """Event offsets k in (0, n_hours] (hours since start) and the interval ending at each."""
    first = _desired_interval(0, fast=fast, four_h=four_h)
    last = -(start_hod % first)  # virtual previous event on the clock grid, at or before start
    ks, intervals = [], []
    while True:
        wanted = _desired_interval(max(last, 0), fast=fast, four_h=four_h)
        step = _aligned_interval(wanted, (start_hod + last) % 24)
        last += step
        if last > n_hours:
            return np.array(ks, dtype=np.int64), np.array(intervals, dtype=np.int64)
        ks.append(last)
        intervals.append(step)


def _funding_rate_8h(syms, r, s_h, ramp, crash_bars, seed) -> np.ndarray:
    """Hours x symbols: row k-1 is f(k), the per-8h funding rate at ``start + k`` hours (clipped AR(1))."""
    n_hours, n = r.shape
    cum = np.vstack([np.zeros(n), np.cumsum(r, axis=0)])  # cum[k] = log return of bars < k
    k = np.arange(1, n_hours + 1)
    z = (cum[k] - cum[np.maximum(k - 24, 0)]) / (s_h * np.sqrt(24.0))
    stress = ramp.copy()
    for bar in crash_bars:
        after = np.arange(bar, n_hours)
        stress[after] += np.exp(-(after - bar) / _FUND_CRASH_DECAY_H)
    target = _FUND_MEAN + _FUND_UP * np.maximum(z - _FUND_UP_Z, 0.0) - _FUND_STRESS * stress[:, None]
    eps = _per_symbol(syms, seed, _FUNDING, lambda g: g.standard_normal(n_hours))
    drive = (1.0 - _FUND_PHI) * target + _FUND_NOISE * eps
    return np.clip(
        _affine_scan(np.broadcast_to(_FUND_PHI, drive.shape), drive, np.full(n, _FUND_MEAN)),
        -_FUND_CLIP,
        _FUND_CLIP,
    )


def _funding(syms, params, start, start_hod, rate_8h, data: _DataEvents | None) -> pl.DataFrame:
    """Funding events of every symbol on its interval schedule; ``rate = f(k) interval / 8``. With data
    events the dropped ones are left out (``interval_hours`` stays the schedule's interval)."""
    n_hours = rate_8h.shape[0]
    frames = []
    schedules: dict[tuple[bool, bool], tuple[np.ndarray, np.ndarray]] = {}
    for j, (sym, p) in enumerate(zip(syms, params)):
        flags = (sym != "BTCUSDT", p.vol_ann >= _FOUR_H_MIN_VOL)
        if flags not in schedules:
            schedules[flags] = _event_schedule(start_hod, n_hours, fast=flags[0], four_h=flags[1])
        ks, intervals = schedules[flags]
        if data is not None:
            kept = ~data.funding_dropped[ks - 1, j]
            ks, intervals = ks[kept], intervals[kept]
        frames.append((j, ks, intervals, rate_8h[ks - 1, j] * intervals / 8.0))
    sym_idx = np.concatenate([np.full(len(f[1]), f[0]) for f in frames])
    ks = np.concatenate([f[1] for f in frames])
    return pl.DataFrame(
        [
            _ts_series("ts", start, ks),
            _ts_series("bar_ts", start, ks - 1),
            _symbol_series("symbol", syms, sym_idx),
            pl.Series("rate", np.concatenate([f[3] for f in frames]), dtype=pl.Float64),
            pl.Series("interval_hours", np.concatenate([f[2] for f in frames]), dtype=pl.Int64),
        ]
    ).with_columns(source=pl.lit(SOURCE))


def _implied_vol(syms, params, start, h_m, h_i, mult, seed) -> pl.DataFrame:
    n_hours = h_m.shape[0]
    cols = [j for j, s in enumerate(syms) if s in _IV_SYMBOLS]
    if not cols:
        return pl.DataFrame(
            schema={"ts": _TS, "underlying": pl.String, "iv": pl.Float64, "source": pl.String}
        )
    iv_syms = [syms[j] for j in cols]
    var_ann = np.array([params[j].vol_ann for j in cols]) ** 2
    rho = np.array([params[j].rho for j in cols])
    calm_var = var_ann * (rho**2 * h_m + (1.0 - rho**2) * h_i[:, cols])
    fast = _ewma(calm_var, _IV_FAST_HL_H, var_ann)
    turb = _ewma(np.broadcast_to(mult[:, None] ** 2, calm_var.shape), _IV_TURB_HL_H, np.ones(len(cols)))
    iv_var = _IV_PREMIUM**2 * fast * (1.0 + _IV_EVENT_PREMIUM + _IV_TURB_SHARE * (turb - 1.0))
    eps = _per_symbol(iv_syms, seed, _IV_NOISE, lambda g: g.standard_normal(n_hours))
    noise_sd = _IV_NOISE_SD * np.sqrt(1.0 - _IV_NOISE_PHI**2)
    x = _affine_scan(np.broadcast_to(_IV_NOISE_PHI, eps.shape), noise_sd * eps, np.zeros(len(cols)))
    iv = np.sqrt(iv_var) * np.exp(x)
    underlyings = [s.removesuffix("USDT") for s in iv_syms]
    return pl.DataFrame(
        [
            _ts_series("ts", start, np.tile(np.arange(n_hours), len(cols))),
            _symbol_series("underlying", underlyings, np.repeat(np.arange(len(cols)), n_hours)),
            pl.Series("iv", iv.T.ravel()),
        ]
    ).with_columns(source=pl.lit(SOURCE))


def _events(syms, params, start, n_hours, crash_bars, data_rows) -> pl.DataFrame:
    hour = timedelta(hours=1)
    rows: list[tuple[str, str | None, datetime, datetime]] = list(data_rows)
    for ep in _episode_starts(n_hours):
        rows.append(("turbulent", None, start + ep * hour, start + (ep + _TURB_LEN) * hour))
        fast_end = start + (ep + _FAST_FUNDING_LEN) * hour
        rows += [("funding_1h", s, start + ep * hour, fast_end) for s in syms if s != "BTCUSDT"]
    rows += [("crash", None, start + b * hour, start + (b + 1) * hour) for b in crash_bars]
    for cycle in range(0, n_hours, _FOUR_H_CYCLE):
        lo, hi = cycle + _FOUR_H_WINDOW[0], cycle + _FOUR_H_WINDOW[1]
        if lo < n_hours:
            rows += [
                ("funding_4h", s, start + lo * hour, start + hi * hour)
                for s, p in zip(syms, params)
                if p.vol_ann >= _FOUR_H_MIN_VOL
            ]
    schema = {"kind": pl.String, "symbol": pl.String, "start": _TS, "end": _TS}
    return pl.DataFrame(rows, schema=schema, orient="row").sort(
        ["start", "kind", "symbol"], nulls_last=False
    )


def _drawn_plan(symbol: str, seed: int, n_hours: int, n_days: int) -> _Plan:
    """Data events of a symbol that is not planted, from its own streams (module docstring rates).

    Four life draws, then one (outage start, length) pair and one bad-print draw per hour and one
    funding-gap draw per UTC day, in time order, so a later end only appends events.
    """
    key = _key(symbol)
    late, listing_u, delisted, delisting_u = _rng(seed, key, _LIFE).random(4)
    listing = _LATE_HOURS[0] + int(listing_u * (_LATE_HOURS[1] - _LATE_HOURS[0])) if late < _LATE_PROB else 0
    delisting = None
    if delisted < _DELIST_PROB:
        lo, hi = _DELIST_AFTER_HOURS
        delisting = listing + lo + int(delisting_u * (hi - lo))
    u = _rng(seed, key, _OUTAGE).random((n_hours, 2))
    starts = np.flatnonzero(u[:, 0] < _OUTAGE_PROB_H)
    lengths = _OUTAGE_HOURS[0] + (u[starts, 1] * (_OUTAGE_HOURS[1] - _OUTAGE_HOURS[0] + 1)).astype(np.int64)
    bad = np.flatnonzero(_rng(seed, key, _BAD_PRINT).random(n_hours) < _BAD_PRINT_PROB_H)
    days = np.flatnonzero(_rng(seed, key, _FUNDING_GAP).random(n_days) < _FUNDING_GAP_PROB_D)
    return _Plan(listing, delisting, tuple(zip(starts.tolist(), lengths.tolist())), tuple(bad.tolist()),
                 tuple(days.tolist()))


def _data_events(syms: list[str], seed: int, start: datetime, n_hours: int) -> _DataEvents:
    """Masks and event rows of every symbol's plan (planted or drawn) over the bars [0, n_hours).

    hidden = not listed (t < L or t >= D) or inside an outage (own or exchange-wide); an outage or bad
    print counts only when it starts while the symbol is listed, a bad print only on a published bar,
    a missing funding day only when it starts while the symbol is listed. Funding events are indexed
    by their bar_ts (event at start + k h settles bar k - 1), so the funding of hidden bars is dropped.
    """
    hour = timedelta(hours=1)
    first_midnight = -start.hour % 24
    n_days = max((n_hours - first_midnight) // 24 + 1, 0)  # days whose first funding event is <= end
    plans = [_PLANTED[s] if s in _PLANTED else _drawn_plan(s, seed, n_hours, n_days) for s in syms]
    tau = np.arange(n_hours)[:, None]
    listing = np.array([p.listing for p in plans], dtype=np.int64)
    never = np.iinfo(np.int64).max
    delisting = np.array([never if p.delisting is None else p.delisting for p in plans], dtype=np.int64)
    outage_end = np.full((n_hours, len(syms)), -1, dtype=np.int64)  # end of the outage starting at t
    bad = np.zeros((n_hours, len(syms)), dtype=bool)
    day_gone = np.zeros((n_hours, len(syms)), dtype=bool)
    rows: list[tuple[str, str | None, datetime, datetime]] = []
    for j, (sym, plan) in enumerate(zip(syms, plans)):
        lo, hi = listing[j], delisting[j]  # listed on bars [lo, hi)
        if 0 < plan.listing < n_hours:
            rows.append(("listing", sym, start + plan.listing * hour, start + plan.listing * hour))
        if plan.delisting is not None and plan.delisting < n_hours:
            rows.append(("delisting", sym, start + plan.delisting * hour, start + plan.delisting * hour))
        for a, length in plan.outages:
            if lo <= a < min(hi, n_hours):
                outage_end[a, j] = a + length
                rows.append(("outage", sym, start + a * hour, start + (a + length) * hour))
        bad[[t for t in plan.bad_prints if lo <= t < min(hi, n_hours)], j] = True
        for day in plan.funding_days:
            midnight = first_midnight + 24 * day
            if lo <= midnight <= n_hours and midnight < hi:
                day_gone[max(midnight - 1, 0) : midnight + 23, j] = True  # events with ts in [midnight, +24 h)
                if midnight < n_hours:
                    rows.append(("funding_missing", sym, start + midnight * hour, start + (midnight + 24) * hour))
    a, length = _EXCHANGE_OUTAGE
    if a < n_hours:
        rows.append(("outage", None, start + a * hour, start + (a + length) * hour))
    in_outage = (np.maximum.accumulate(outage_end, axis=0) > tau) | ((tau >= a) & (tau < a + length))
    hidden = (tau < listing) | (tau >= delisting) | in_outage
    bad &= ~hidden
    for t, j in zip(*np.nonzero(bad)):
        rows.append(("bad_print", syms[j], start + int(t) * hour, start + (int(t) + 1) * hour))
    return _DataEvents(listing, hidden, bad, hidden | day_gone, rows)


def _listed_at_price0(bars: _Bars, params: list[_Params], listing: np.ndarray) -> _Bars:
    """Rescale the prices of each symbol listed late (inside the bars) so its listing bar opens at price0.

    ``open, close <- open, close x price0 / open(L)``; excursion factors, returns, funding and basis
    are ratios and stay; a symbol listed from the start (or after the last bar) keeps factor 1.
    """
    n_hours, n = bars.close.shape
    late = np.flatnonzero((listing > 0) & (listing < n_hours))
    scale = np.ones(n)
    scale[late] = np.array([params[j].price0 for j in late]) / bars.open[listing[late], late]
    return _Bars(bars.open * scale, bars.close * scale, bars.up, bars.down)
