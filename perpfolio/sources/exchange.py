"""Live market data from exchange REST APIs through ccxt: Binance USD-M, Bybit and OKX linear USDT
perpetuals (hourly trade, mark-price and index-price candles, funding-rate history) and Deribit's
DVOL implied-volatility index.

Each request goes through the exchange's ccxt class (its HTTP session, rate limiter and error
classes) using the exchange's own public endpoint, so the quote-side details the unified methods
drop stay available and the replay server of the tests only has to speak each exchange's format:

============  =============================================  ==========================================  ============
exchange      candles (trade / mark / index)                 funding history                             page (rows)
============  =============================================  ==========================================  ============
binance       /fapi/v1/klines, markPriceKlines,              /fapi/v1/fundingRate                        1000 / 1000
              indexPriceKlines (``pair``); ascending
bybit         /v5/market/kline, mark-price-kline,            /v5/market/funding/history                  1000 / 200
              index-price-kline; newest first
okx           /api/v5/market/history-candles (300),          /api/v5/public/funding-rate-history         300 (100) / 100
              history-mark-price-candles, history-index-
              candles (100, ``BTC-USDT``); newest first
deribit       /api/v2/public/get_volatility_index_data (DVOL, hourly, ``continuation`` pages back)        1000
============  =============================================  ==========================================  ============

**Pagination.** Forward in time with an end bound: the window is cut into pieces of whole UTC days
that hold at most one page of rows (a funding piece assumes the shortest interval, one event per
hour), and each piece is one request bounded on both sides. A piece can therefore never be
truncated by the page size, whatever order the exchange returns rows in, and an empty page means
the exchange has no rows there (an outage, or a symbol delisted before the end): pagination goes on
to the next piece and the hole is reported as a gap, never filled.

**Leverage tiers** (:func:`read_leverage_tiers`, perpfolio.tiers): the exchange's current
maintenance-margin brackets where it serves them without an API key. Bybit:
``/v5/market/risk-limit`` (``riskLimitValue`` caps in USDT, ``mmDeduction`` the continuous
deduction; ``nextPageCursor`` pages), parsed by ccxt's own ``parse_market_leverage_tiers``. OKX:
``/api/v5/public/position-tiers`` (cross margin, by ``instFamily``), whose ``minSz``/``maxSz`` are
CONTRACTS: converted to USDT as ``maxSz x ctVal x mark price`` (``/api/v5/public/mark-price`` at the
time of the fetch), each bracket starting where the previous one ends, no deduction (OKX margins
the whole position at its tier's rate). Binance's brackets (``/fapi/v1/leverageBracket``) need a
signed request, so Binance serves none here. Both go through :func:`perpfolio.tiers.parse_ccxt`
as ccxt leverage-tier structures; a bracket that breaks the bracket rules is a DataError naming the
exchange, endpoint, symbol and bracket.

**Retries.** Rate limiting (HTTP 429/418, Bybit 10006, OKX 50011), 5xx, timeouts, dropped
connections and unreadable bodies (truncated JSON) are retried up to ``max_retries`` times, waiting
the server's ``Retry-After`` when it sends one and ``backoff_s * 2**attempt`` (capped at 30 s)
otherwise. Any other error (an unknown symbol, a bad parameter) fails at once.

**Resume.** With a :class:`~perpfolio.sources.exchange_cache.ExchangeCache`, each series (one
symbol's trade, mark or index candles or funding) is committed as soon as it is downloaded and
validated, with the closed UTC days it completes; a complete closed day is never downloaded again
unless ``refresh`` is asked for, so a run killed mid-way resumes after the last series it finished
and a re-run of a complete window makes no data request at all.

**Cleaning** happens on read, identically for fresh and cached rows: every value is validated
(an invalid one raises :class:`~perpfolio.errors.DataError` naming exchange, endpoint, symbol, bar
time and field), duplicates keep the first row the exchange sent and are counted, rows are sorted,
missing hours are reported (``quality``), and funding events get ``bar_ts`` (the bar whose interval
``(bar_ts, bar_ts + 1h]`` holds the event) and ``interval_hours`` (see :func:`funding_intervals`).
A trade candle whose open or close lies outside its own [low, high] is not an error here (it still
is in mark, index and DVOL candles): it is a bad print that :mod:`perpfolio.quality` flags, naming
the endpoint (``candle_origin``).
"""

from __future__ import annotations

import difflib
import email.utils
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from urllib.parse import urlsplit

import ccxt
import polars as pl

from perpfolio.errors import ConfigError, DataError, SourceUnavailable
from perpfolio.quality import spacing_interval
from perpfolio.sources.archive import (
    CANDLES_SCHEMA, FUNDING_SCHEMA, QUALITY_SCHEMA, REFERENCE_SCHEMA, ArchiveData, gap_report, quality_rows,
)
from perpfolio.sources.exchange_cache import ExchangeCache
from perpfolio.sources.window import check_window, day_start
from perpfolio.tiers import Tier, TierTable, parse_ccxt

SOURCE = "exchange"
DVOL_SOURCE = "dvol"
EXCHANGES = ("binance", "bybit", "okx")
KLINE_KINDS = ("trade", "mark", "index")  # trade -> raw.candles; mark, index -> raw.reference_prices
DVOL_CURRENCIES = ("BTC", "ETH")  # the underlyings Deribit publishes a DVOL index for
FUNDING_LOOKBACK = timedelta(hours=9)  # enough history before a window to see the previous event (8h + jitter)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MAX_BACKOFF_S = 30.0
_TS = pl.Datetime("us", "UTC")
_EPOCH_DAY = date(1970, 1, 1)
_RETRYABLE = (ccxt.NetworkError,)  # RateLimitExceeded, DDoSProtection, ExchangeNotAvailable, RequestTimeout


class _BadBody(Exception):
    """The response was not the JSON document the endpoint returns (e.g. truncated mid-body)."""


@dataclass(frozen=True)
class Instrument:
    """A listed USDT-margined perpetual: the project's symbol (``BTCUSDT``), the exchange's id for
    it, the id of its index (OKX names the index ``BTC-USDT``), the exchange's status text and the
    size of one contract in the base currency (OKX ``ctVal``; 1 where positions are in the base)."""

    symbol: str
    native: str
    index_native: str
    status: str
    contract_size: float = 1.0


class ExchangeClient:
    """One exchange's public market-data endpoints through its ccxt class.

    ``base_url`` replaces the scheme and host of every API URL (a mirror, or the replay server of
    the tests); ``timeout_s`` is per request; ``rate_limit`` turns ccxt's limiter on (the
    exchange's documented request weights, e.g. 5 x 50 ms for a 1000-row Binance kline page);
    ``sleep`` is how the client waits between retries (tests record it).
    """

    name: str
    ccxt_class: type
    kline_page: dict[str, int]
    funding_page: int
    _KLINES: dict[str, str]  # kline kind -> the ccxt implicit method (the endpoint)

    def __init__(self, *, base_url: str | None = None, timeout_s: float = 10.0, max_retries: int = 5,
                 backoff_s: float = 0.5, rate_limit: bool = True, sleep: Callable[[float], None] = time.sleep):
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ConfigError(f"{self.name}: need max_retries >= 0, backoff_s >= 0 and timeout_s > 0, got "
                              f"{max_retries}, {backoff_s}, {timeout_s}")
        self.api = self.ccxt_class({"enableRateLimit": rate_limit, "timeout": int(timeout_s * 1000)})
        # what the download cache files rows under: the exchange, and the host when redirected, so
        # rows from a mirror or the replay server are never served as the exchange's own
        self.origin = self.name
        if base_url:
            self.origin = f"{self.name}@{_redirect(self.api, base_url)}"
        self.max_retries, self.backoff_s, self.sleep = max_retries, backoff_s, sleep
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0
        self._instruments: dict[str, Instrument] | None = None

    # --- requests -----------------------------------------------------------------------------

    def call(self, endpoint: str, params: dict, check: Callable[[object], object]) -> object:
        """``check(response)`` of one GET ``endpoint`` (a ccxt implicit method name), retrying
        transient failures (module docstring); ``check`` raises ``_BadBody`` on an unreadable body."""
        method = getattr(self.api, endpoint)
        for attempt in range(self.max_retries + 1):
            self.api.last_response_headers = None
            self.requests += 1
            try:
                return check(method(dict(params)))
            except (*_RETRYABLE, _BadBody) as exc:
                if attempt == self.max_retries:
                    raise SourceUnavailable(
                        f"{self.name} {endpoint} {params}: still failing after {attempt + 1} attempts: "
                        f"{type(exc).__name__}: {str(exc)[:300]}"
                    ) from exc
                self.retries += 1
                self.sleep(self._wait_s(attempt))
            except ccxt.BaseError as exc:
                raise SourceUnavailable(f"{self.name} {endpoint} {params}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        raise AssertionError("unreachable")

    def _wait_s(self, attempt: int) -> float:
        """The server's Retry-After (seconds or an HTTP date) when it sent one, else exponential backoff."""
        headers = self.api.last_response_headers or {}
        retry_after = headers.get("Retry-After") or headers.get("retry-after")
        if retry_after:
            try:
                return min(MAX_BACKOFF_S * 4, max(0.0, float(retry_after)))
            except ValueError:
                pass
            try:
                when = email.utils.parsedate_to_datetime(retry_after)
                return min(MAX_BACKOFF_S * 4, max(0.0, (when - datetime.now(timezone.utc)).total_seconds()))
            except (TypeError, ValueError):
                pass  # neither seconds nor an HTTP date: back off as if it were absent
        return min(MAX_BACKOFF_S, self.backoff_s * 2**attempt)

    # --- instruments and symbols --------------------------------------------------------------

    def instruments(self) -> dict[str, Instrument]:
        """Listed USDT-margined perpetuals by project symbol (fetched once per client)."""
        if self._instruments is None:
            self._instruments = {i.symbol: i for i in self._list_instruments()}
        return self._instruments

    def instrument(self, symbol: str) -> Instrument:
        """The instrument of ``symbol`` (e.g. BTCUSDT); an unknown one raises naming close matches."""
        listed = self.instruments()
        if symbol not in listed:
            close = difflib.get_close_matches(symbol, sorted(listed), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else f"{len(listed)} USDT perpetuals are listed"
            raise ConfigError(f"PERPFOLIO_SYMBOLS: {symbol} is not a USDT perpetual on {self.name} ({hint})")
        return listed[symbol]

    # --- history ------------------------------------------------------------------------------

    def kline_endpoint(self, kind: str) -> str:
        """``"<origin> <endpoint>"`` of ``kind``'s klines (e.g. ``binance fapipublic_get_klines``), for messages."""
        return f"{self.origin} {self._KLINES[kind]}"

    def piece_days(self, dataset: str) -> int:
        """Whole UTC days per request of ``dataset`` (a kline kind or "funding"): one page's worth."""
        page = self.funding_page if dataset == "funding" else self.kline_page[dataset]
        return max(1, page // 24)

    def fetch_rows(self, dataset: str, symbol: str, start_ms: int, end_ms: int) -> list[tuple]:
        """Rows of one piece ``[start_ms, end_ms)`` (at most one page), as the exchange sent them:
        klines ``(ts_ms, open, high, low, close, volume)`` (volume None for mark and index), funding
        ``(ts_ms, rate)``. Rows outside the piece are dropped."""
        instrument = self.instrument(symbol)
        rows = (self._funding_page(instrument, start_ms, end_ms) if dataset == "funding"
                else self._kline_page(dataset, instrument, start_ms, end_ms))
        return [r for r in rows if start_ms <= r[0] < end_ms]

    def leverage_tiers(self, symbol: str) -> tuple[Tier, ...] | None:
        """The exchange's current maintenance-margin brackets of ``symbol`` in USDT notional, or
        None where it serves none without an API key or lists none for the symbol (module docstring)."""
        return None

    # --- per exchange -------------------------------------------------------------------------

    def _list_instruments(self) -> list[Instrument]:
        raise NotImplementedError

    def _kline_page(self, kind: str, instrument: Instrument, start_ms: int, end_ms: int) -> list[tuple]:
        raise NotImplementedError

    def _funding_page(self, instrument: Instrument, start_ms: int, end_ms: int) -> list[tuple]:
        raise NotImplementedError


class BinanceClient(ExchangeClient):
    name, ccxt_class = "binance", ccxt.binanceusdm
    kline_page, funding_page = {"trade": 1000, "mark": 1000, "index": 1000}, 1000
    _KLINES = {"trade": "fapipublic_get_klines", "mark": "fapipublic_get_markpriceklines",
               "index": "fapipublic_get_indexpriceklines"}

    def _list_instruments(self) -> list[Instrument]:
        info = self.call("fapipublic_get_exchangeinfo", {}, _expect(dict, "symbols"))
        return [Instrument(s["symbol"], s["symbol"], s.get("pair", s["symbol"]), s.get("status", ""))
                for s in info["symbols"]
                if s.get("contractType") == "PERPETUAL" and s.get("quoteAsset") == "USDT"]

    def _kline_page(self, kind, instrument, start_ms, end_ms):
        key = {"pair": instrument.index_native} if kind == "index" else {"symbol": instrument.native}
        rows = self.call(self._KLINES[kind], {**key, "interval": "1h", "startTime": start_ms, "endTime": end_ms - 1,
                                              "limit": self.kline_page[kind]}, _expect(list))
        return [_kline(r, volume=kind == "trade") for r in rows]

    def _funding_page(self, instrument, start_ms, end_ms):
        rows = self.call("fapipublic_get_fundingrate", {"symbol": instrument.native, "startTime": start_ms,
                                                        "endTime": end_ms - 1, "limit": self.funding_page}, _expect(list))
        return [(int(r["fundingTime"]), _num(r["fundingRate"])) for r in rows]


class BybitClient(ExchangeClient):
    name, ccxt_class = "bybit", ccxt.bybit
    kline_page, funding_page = {"trade": 1000, "mark": 1000, "index": 1000}, 200
    _KLINES = {"trade": "public_get_v5_market_kline", "mark": "public_get_v5_market_mark_price_kline",
               "index": "public_get_v5_market_index_price_kline"}

    def _list_instruments(self) -> list[Instrument]:
        found, cursor = [], ""
        while True:
            params = {"category": "linear", "limit": 1000, **({"cursor": cursor} if cursor else {})}
            result = self.call("public_get_v5_market_instruments_info", params, _bybit_result)
            found += [Instrument(s["symbol"], s["symbol"], s["symbol"], s.get("status", ""))
                      for s in result["list"]
                      if s.get("contractType") == "LinearPerpetual" and s.get("quoteCoin") == "USDT"]
            cursor = result.get("nextPageCursor") or ""
            if not cursor:
                return found

    def _kline_page(self, kind, instrument, start_ms, end_ms):
        result = self.call(self._KLINES[kind], {"category": "linear", "symbol": instrument.native, "interval": "60",
                                                "start": start_ms, "end": end_ms - 1, "limit": self.kline_page[kind]},
                           _bybit_result)
        return [_kline(r, volume=kind == "trade") for r in result["list"]]

    def _funding_page(self, instrument, start_ms, end_ms):
        result = self.call("public_get_v5_market_funding_history",
                           {"category": "linear", "symbol": instrument.native, "startTime": start_ms,
                            "endTime": end_ms - 1, "limit": self.funding_page}, _bybit_result)
        return [(int(r["fundingRateTimestamp"]), _num(r["fundingRate"])) for r in result["list"]]

    def leverage_tiers(self, symbol: str) -> tuple[Tier, ...] | None:
        instrument = self.instrument(symbol)
        rows, cursor = [], ""
        while True:
            params = {"category": "linear", "symbol": instrument.native, **({"cursor": cursor} if cursor else {})}
            result = self.call("public_get_v5_market_risk_limit", params, _bybit_result)
            rows += [r for r in result["list"] if r.get("symbol", instrument.native) == instrument.native]
            cursor = result.get("nextPageCursor") or ""
            if not cursor:
                break
        if not rows:
            return None
        rows.sort(key=lambda r: _num(r.get("riskLimitValue")))  # ccxt takes each floor from the row before
        return _parsed_tiers(self.name, "risk-limit", symbol, self.api.parse_market_leverage_tiers(rows))


class OkxClient(ExchangeClient):
    name, ccxt_class = "okx", ccxt.okx
    kline_page, funding_page = {"trade": 300, "mark": 100, "index": 100}, 100
    _KLINES = {"trade": "public_get_market_history_candles", "mark": "public_get_market_history_mark_price_candles",
               "index": "public_get_market_history_index_candles"}

    def _list_instruments(self) -> list[Instrument]:
        data = self.call("public_get_public_instruments", {"instType": "SWAP"}, _okx_data)
        found = []
        for s in data:
            base, quote, kind = (s["instId"].split("-") + ["", "", ""])[:3]
            if quote == "USDT" and kind == "SWAP" and s.get("settleCcy", "USDT") == "USDT":
                found.append(Instrument(base + "USDT", s["instId"], f"{base}-USDT", s.get("state", ""),
                                        _num(s.get("ctVal", "nan"))))
        return found

    def _kline_page(self, kind, instrument, start_ms, end_ms):
        inst = instrument.index_native if kind == "index" else instrument.native
        # OKX pages backwards: `after` = rows older than ts, `before` = newer than ts (both exclusive)
        data = self.call(self._KLINES[kind], {"instId": inst, "bar": "1H", "before": start_ms - 1, "after": end_ms,
                                              "limit": self.kline_page[kind]}, _okx_data)
        # trade rows: ts, o, h, l, c, vol (contracts), volCcy (base currency), volCcyQuote, confirm
        return [_kline(r[:5] + [r[6]], volume=True) if kind == "trade" else _kline(r, volume=False) for r in data]

    def _funding_page(self, instrument, start_ms, end_ms):
        data = self.call("public_get_public_funding_rate_history",
                         {"instId": instrument.native, "before": start_ms - 1, "after": end_ms,
                          "limit": self.funding_page}, _okx_data)
        return [(int(r["fundingTime"]), _num(r.get("realizedRate") or r["fundingRate"])) for r in data]

    def leverage_tiers(self, symbol: str) -> tuple[Tier, ...] | None:
        instrument = self.instrument(symbol)
        marks = self.call("public_get_public_mark_price", {"instType": "SWAP", "instId": instrument.native}, _okx_data)
        price = _num(marks[0].get("markPx")) if marks else math.nan
        usdt_per_contract = instrument.contract_size * price
        if not (math.isfinite(usdt_per_contract) and usdt_per_contract > 0):
            raise DataError(f"okx mark-price / instruments {symbol}: markPx {price} x ctVal {instrument.contract_size} "
                            "must be a finite USDT value > 0 per contract")
        rows = self.call("public_get_public_position_tiers", {"instType": "SWAP", "tdMode": "cross",
                                                              "instFamily": instrument.index_native}, _okx_data)
        brackets, floor = [], 0.0
        for row in sorted(rows, key=lambda r: _num(r.get("tier"))):
            cap = _num(row.get("maxSz")) * usdt_per_contract  # contracts -> USDT at today's mark price
            brackets.append({"minNotional": floor, "maxNotional": cap, "maintenanceMarginRate": _num(row.get("mmr")),
                             "maxLeverage": _num(row.get("maxLever")), "info": row})
            floor = cap
        return _parsed_tiers(self.name, "position-tiers", symbol, brackets) if brackets else None


CLIENTS: dict[str, type[ExchangeClient]] = {c.name: c for c in (BinanceClient, BybitClient, OkxClient)}


class DvolClient(ExchangeClient):
    """Deribit's DVOL (30-day implied volatility index, in %) for BTC and ETH, hourly."""

    name, ccxt_class = "deribit", ccxt.deribit
    kline_page, funding_page = {"dvol": 1000}, 0

    def fetch_rows(self, dataset: str, symbol: str, start_ms: int, end_ms: int) -> list[tuple]:
        """Hourly DVOL candles ``(ts_ms, open, high, low, close, None)`` of currency ``symbol`` in
        ``[start_ms, end_ms)``, following ``continuation`` (older rows) until the piece is covered."""
        rows, upper = [], end_ms - 1
        while True:
            result = self.call("public_get_get_volatility_index_data",
                               {"currency": symbol, "start_timestamp": start_ms, "end_timestamp": upper,
                                "resolution": "3600"}, _deribit_result)
            rows += [_kline(r, volume=False) for r in result["data"]]
            more = result.get("continuation")
            if more is None or int(more) <= start_ms or int(more) >= upper:
                return [r for r in rows if start_ms <= r[0] < end_ms]
            upper = int(more)


def client_for(exchange: str, **options) -> ExchangeClient:
    """The client of ``exchange`` (binance | bybit | okx); ``options`` as :class:`ExchangeClient`."""
    if exchange not in CLIENTS:
        raise ConfigError(f"PERPFOLIO_EXCHANGE must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
    return CLIENTS[exchange](**options)


def read_leverage_tiers(client: ExchangeClient, symbols: Sequence[str]) -> TierTable | None:
    """The live brackets of those ``symbols`` the exchange serves (source ``exchange:<name>``, or
    ``exchange:<name>@<host>`` when redirected, e.g. ``exchange:okx@127.0.0.1`` for the replay
    server; the host without its port, so a label does not change with the port a server got);
    None when it serves none of them (Binance: its brackets need an API key)."""
    found = {}
    for symbol in symbols:
        tiers = client.leverage_tiers(symbol)
        if tiers is not None:
            found[symbol] = tiers
    host = urlsplit(client.origin.partition("@")[2]).hostname
    return TierTable(found, f"exchange:{client.name}" + (f"@{host}" if host else "")) if found else None


def _parsed_tiers(exchange: str, endpoint: str, symbol: str, brackets: list[dict]) -> tuple[Tier, ...]:
    """One symbol's ccxt-structure brackets through perpfolio.tiers.parse_ccxt; a broken bracket is a DataError."""
    try:
        return parse_ccxt({f"{symbol.removesuffix('USDT')}/USDT:USDT": brackets}, where=f"{exchange} {endpoint}")[symbol]
    except ConfigError as exc:
        raise DataError(str(exc)) from exc


# --- reading a window -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExchangeRead:
    """What :func:`read_exchange` returns: the archive container (candles, funding, reference
    prices, quality) plus implied vol, and the number of requests it took."""

    data: ArchiveData
    implied_vol: pl.DataFrame
    requests: int


def read_exchange(
    client: ExchangeClient, symbols: Sequence[str], start: datetime, end: datetime, *,
    cache: ExchangeCache | None = None, refresh: bool = False, dvol: DvolClient | None = None,
    now: datetime | None = None,
) -> ExchangeRead:
    """Candles, funding, mark and index prices of ``symbols`` for bars in ``[start, end)`` (hour-aligned
    UTC), the data-quality rows, and DVOL implied vol (BTC, ETH) when ``dvol`` is given.

    Days before the current hour (``now``) that the cache holds are not downloaded (unless
    ``refresh``); the others are, piece by piece, and committed to the cache as they complete.
    """
    check_window(start, end)
    now = (now or datetime.now(timezone.utc)).replace(minute=0, second=0, microsecond=0)
    requests_before = client.requests + (dvol.requests if dvol else 0)
    candles, reference, funding, quality = [], [], [], []
    for symbol in symbols:
        client.instrument(symbol)  # fail fast, before any download, on a symbol the exchange does not list
    for symbol in symbols:
        for kind in KLINE_KINDS:
            rows = _series(client, cache, kind, symbol, start, end, now, refresh)
            frame, dupes = _klines_frame(rows, client.name, kind, symbol, start, end)
            if kind == "trade":
                candles.append(frame.select(list(CANDLES_SCHEMA)))
                quality.append(dupes)
            else:
                reference.append(frame.with_columns(kind=pl.lit(kind)).select(list(REFERENCE_SCHEMA)))
        rows = _series(client, cache, "funding", symbol, start - FUNDING_LOOKBACK, end + timedelta(hours=1), now, refresh)
        frame, dupes = _funding_frame(rows, client.name, symbol, start, end)
        funding.append(frame)
        quality.append(dupes)
    candle_frame = pl.concat(candles)
    quality_frame = pl.concat([*quality, gap_report(candle_frame, symbols, start, min(end, now))])
    iv = dvol_implied_vol(dvol, cache, start, end, now, refresh) if dvol else _empty_iv()
    data = ArchiveData(
        candles=candle_frame, funding=pl.concat(funding), quality=quality_frame.sort("symbol", "dataset", "from_ts", "issue"),
        files=(), reference_prices=pl.concat(reference),
        candle_origin=candle_frame.select("ts", "symbol", pl.lit(client.kline_endpoint("trade")).alias("origin")),
    )
    return ExchangeRead(data, iv, client.requests + (dvol.requests if dvol else 0) - requests_before)


def dvol_implied_vol(dvol: DvolClient, cache: ExchangeCache | None, start: datetime, end: datetime, now: datetime,
                     refresh: bool = False) -> pl.DataFrame:
    """raw.implied_vol rows from hourly DVOL: iv = close / 100, stamped when the hour closes
    (bar open + 1h), for observations with that stamp in ``[start, end)``."""
    frames = []
    for currency in DVOL_CURRENCIES:
        rows = _series(dvol, cache, "dvol", currency, start - timedelta(hours=1), end, now, refresh)
        frame, _ = _klines_frame(rows, dvol.name, "dvol", currency, start - timedelta(hours=1), end)
        frames.append(frame.select(
            (pl.col("ts") + pl.duration(hours=1)).alias("ts"), pl.lit(currency).alias("underlying"),
            (pl.col("close") / 100.0).alias("iv"), pl.lit(DVOL_SOURCE).alias("source"),
        ))
    return pl.concat(frames).filter(pl.col("ts").is_between(start, end, closed="left"))


def _series(client: ExchangeClient, cache: ExchangeCache | None, dataset: str, symbol: str, start: datetime,
            end: datetime, now: datetime, refresh: bool) -> list[tuple]:
    """Every row of one series for the UTC days covering ``[start, end)``, in response order:
    cached days read back, the others downloaded piece by piece, validated, and the closed ones
    committed to the cache in one transaction."""
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    closed = [d for d in days if day_start(d) + timedelta(days=1) <= now]
    have = set() if cache is None or refresh else cache.complete_days(client.origin, dataset, symbol, closed)
    # candles: bars opened before now (closed); funding: events up to and including now, since an
    # event stamped on the hour settles the bar that closes then (and "now" is floored to the hour)
    horizon = now + timedelta(milliseconds=1) if dataset == "funding" else now
    todo = [d for d in days if d not in have and day_start(d) < horizon]
    step = client.piece_days(dataset)
    fresh: list[tuple] = []
    for run in _runs(todo):
        for i in range(0, len(run), step):
            piece = run[i:i + step]
            lo, hi = day_start(piece[0]), min(horizon, day_start(piece[-1]) + timedelta(days=1))
            fresh += client.fetch_rows(dataset, symbol, _ms(lo), _ms(hi))
    if todo:  # nothing invalid reaches the cache
        _validate(client.name, dataset, symbol, fresh, day_start(todo[0]), day_start(todo[-1]) + timedelta(days=1))
    done = [d for d in todo if d in set(closed)]
    if cache is not None and done:
        done_epoch_days = {(d - _EPOCH_DAY).days for d in done}
        cache.store(client.origin, dataset, symbol, done, [r for r in fresh if r[0] // DAY_MS in done_epoch_days])
    cached = cache.rows(client.origin, dataset, symbol, sorted(have)) if cache is not None and have else []
    return cached + fresh


# --- cleaning -------------------------------------------------------------------------------------


def _validate(exchange: str, dataset: str, symbol: str, rows: list[tuple], start: datetime, end: datetime) -> None:
    """Raise DataError on the first invalid row of a piece (the checks of the frame builders)."""
    if dataset == "funding":
        _funding_frame(rows, exchange, symbol, start, end)
    else:
        _klines_frame(rows, exchange, dataset, symbol, start, end)


def _klines_frame(rows: list[tuple], exchange: str, kind: str, symbol: str, start: datetime,
                  end: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validated, de-duplicated (first sent kept), sorted bars in [start, end) and the duplicates' quality rows."""
    frame = pl.DataFrame(rows, schema={"t": pl.Int64, "open": pl.Float64, "high": pl.Float64, "low": pl.Float64,
                                       "close": pl.Float64, "volume": pl.Float64}, orient="row")
    frame = frame.with_columns(ts=(pl.col("t") * 1000).cast(_TS)).filter(pl.col("ts").is_between(start, end, closed="left"))
    where = f"{exchange} {kind} candles {symbol}"
    prices = ("open", "high", "low", "close")
    _fail(frame, pl.col("t") % HOUR_MS != 0, where, "ts", "is not on the hour")
    for p in prices:
        _fail(frame, ~pl.col(p).is_finite() | (pl.col(p) <= 0), where, p, "must be a finite price > 0")
    if kind != "trade":  # in trade candles a bad print for perpfolio.quality
        _fail(frame, pl.col("high") < pl.max_horizontal("open", "close"), where, "high", "is below max(open, close)")
        _fail(frame, pl.col("low") > pl.min_horizontal("open", "close"), where, "low", "is above min(open, close)")
    if kind == "trade":
        _fail(frame, pl.col("volume").is_null() | ~pl.col("volume").is_finite() | (pl.col("volume") < 0), where,
              "volume", "must be a finite volume >= 0")
    clean, dupes = _dedupe(frame, symbol, "candles")
    return clean.with_columns(symbol=pl.lit(symbol), source=pl.lit(SOURCE)), dupes


def _funding_frame(rows: list[tuple], exchange: str, symbol: str, start: datetime,
                   end: datetime) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Funding events with ``bar_ts`` in [start, end): validated, de-duplicated, with bar_ts and interval."""
    frame = pl.DataFrame(rows, schema={"t": pl.Int64, "rate": pl.Float64}, orient="row").with_columns(
        ts=(pl.col("t") * 1000).cast(_TS))
    _fail(frame, ~pl.col("rate").is_finite() | (pl.col("rate").abs() > 0.05), f"{exchange} funding {symbol}", "rate",
          "must be a finite rate per interval within +-5%")
    clean, dupes = _dedupe(frame, symbol, "funding")
    ceil_hour = (pl.col("t") + HOUR_MS - 1) // HOUR_MS * HOUR_MS
    clean = clean.with_columns(bar_ts=((ceil_hour - HOUR_MS) * 1000).cast(_TS),
                               interval_hours=pl.Series(funding_intervals(clean["t"].to_list()), dtype=pl.Int64))
    in_window = pl.col("bar_ts").is_between(start, end, closed="left")
    return (clean.filter(in_window).with_columns(symbol=pl.lit(symbol), source=pl.lit(SOURCE)).select(list(FUNDING_SCHEMA)),
            dupes.filter(pl.col("from_ts") < end))


def funding_intervals(event_ms: Sequence[int]) -> list[int]:
    """``interval_hours`` of each event of one symbol (sorted epoch ms): the hours since the previous
    event rounded to the hour, as the largest of 1, 2, 4, 8 that divides it (a missed event, e.g. 16 h
    on an 8 h schedule, keeps the schedule's 8); the first event takes the spacing to the next one,
    and a lone event 8."""
    if not event_ms:
        return []
    gaps = [round((b - a) / HOUR_MS) for a, b in zip(event_ms, event_ms[1:])]
    spacing = [gaps[0] if gaps else 8, *gaps]
    return [spacing_interval(h) for h in spacing]


def _dedupe(frame: pl.DataFrame, symbol: str, dataset: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Keep the first row the exchange sent for each time, sort by time; count the dropped rows per UTC day."""
    repeated = frame.filter(pl.col("ts").is_duplicated() & ~pl.col("ts").is_first_distinct())
    clean = frame.unique("ts", keep="first", maintain_order=True).sort("ts")
    if repeated.is_empty():
        return clean, pl.DataFrame(schema=QUALITY_SCHEMA)
    per_day = repeated.group_by(pl.col("ts").dt.date()).agg(from_ts=pl.col("ts").min(), to_ts=pl.col("ts").max(),
                                                            n=pl.len().cast(pl.Int64))
    return clean, quality_rows(per_day.select(
        pl.lit(symbol).alias("symbol"), pl.lit(dataset).alias("dataset"), pl.lit("duplicates").alias("issue"),
        "from_ts", "to_ts", pl.col("n").alias("duplicates_dropped"),
    ))


def _fail(frame: pl.DataFrame, bad: pl.Expr, where: str, field: str, what: str) -> None:
    hits = frame.filter(bad.fill_null(True))
    if hits.height:
        row = hits.row(0, named=True)
        raise DataError(f"{where}: bar {row['ts']:%Y-%m-%d %H:%M} UTC field {field} = {row.get(field, row.get('t'))} "
                        f"{what} ({hits.height} such rows)")


# --- response shapes ------------------------------------------------------------------------------


def _expect(kind: type, key: str | None = None) -> Callable[[object], object]:
    def check(response: object) -> object:
        if not isinstance(response, kind) or (key is not None and key not in response):
            raise _BadBody(f"expected a JSON {kind.__name__}{' with ' + key if key else ''}, got {str(response)[:120]!r}")
        return response
    return check


def _bybit_result(response: object) -> dict:
    if not isinstance(response, dict) or not isinstance(response.get("result"), dict) or "list" not in response["result"]:
        raise _BadBody(f"expected {{'retCode': 0, 'result': {{'list': [...]}}}}, got {str(response)[:120]!r}")
    return response["result"]


def _okx_data(response: object) -> list:
    if not isinstance(response, dict) or not isinstance(response.get("data"), list):
        raise _BadBody(f"expected {{'code': '0', 'data': [...]}}, got {str(response)[:120]!r}")
    return response["data"]


def _deribit_result(response: object) -> dict:
    if not isinstance(response, dict) or not isinstance(response.get("result"), dict) or "data" not in response["result"]:
        raise _BadBody(f"expected {{'result': {{'data': [...], 'continuation': ...}}}}, got {str(response)[:120]!r}")
    return response["result"]


def _kline(row: Sequence, *, volume: bool) -> tuple:
    return int(row[0]), _num(row[1]), _num(row[2]), _num(row[3]), _num(row[4]), _num(row[5]) if volume else None


def _num(value: object) -> float:
    """A number the exchange sent as a JSON number or string ('' and junk become NaN, which validation names)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# --- helpers --------------------------------------------------------------------------------------


def _redirect(api: ccxt.Exchange, base_url: str) -> str:
    """Point every API URL of ``api`` at ``base_url``'s scheme and host, keeping each URL's path;
    returns the new prefix."""
    target = urlsplit(base_url)
    if target.scheme not in ("http", "https") or not target.netloc:
        raise ConfigError(f"PERPFOLIO_EXCHANGE_URL must look like http://host:port, got {base_url!r}")
    prefix = f"{target.scheme}://{target.netloc}{target.path.rstrip('/')}"

    def point(url):
        if isinstance(url, dict):
            return {k: point(v) for k, v in url.items()}
        path = urlsplit(url.replace("{hostname}", "host")).path
        return prefix + path
    api.urls["api"] = point(api.urls["api"])
    return prefix


def _runs(days: list[date]) -> list[list[date]]:
    """Consecutive runs of days."""
    runs: list[list[date]] = []
    for d in days:
        if runs and (d - runs[-1][-1]).days == 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    return runs


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _empty_iv() -> pl.DataFrame:
    return pl.DataFrame(schema={"ts": _TS, "underlying": pl.String, "iv": pl.Float64, "source": pl.String})
