"""A local replay server that speaks the public market-data APIs of Binance USD-M, Bybit, OKX and
Deribit (DVOL) over HTTP on 127.0.0.1, serving the built-in synthetic market, with injectable faults.

It lets the exchange source (perpfolio.sources.exchange) run offline: in the tests, in the
benchmark, and for a user who wants to try ``PERPFOLIO_SOURCE=exchange`` without network access::

    python -m tools.replay --port 8765 --symbols BTC,ETH,SOL --start 2025-01-01 --end 2025-07-30
    PERPFOLIO_SOURCE=exchange PERPFOLIO_EXCHANGE_URL=http://127.0.0.1:8765 make run

Each endpoint answers in its exchange's format and with its paging rules (both bounds inclusive
on Binance, Bybit and Deribit, exclusive ``before``/``after`` on OKX; ascending rows on Binance and
Deribit, newest first on Bybit and OKX; the newest page first when a range holds more than a page,
except Binance, which returns the oldest). Numbers are strings where the exchange sends strings, written
with every digit (repr) so that what the client reads is bit for bit what the market holds.

Leverage tiers: Bybit's ``/v5/market/risk-limit`` (caps in USDT, ``mmDeduction``, pages of
:data:`RISK_LIMIT_PAGE` rows linked by ``nextPageCursor``) and OKX's ``/api/v5/public/position-tiers``
(sizes in contracts of ``ctVal`` 0.01 base at the mark price of ``/api/v5/public/mark-price``, the
symbol's last mark close) serve the brackets :func:`replay_tiers` generates for each symbol.

Faults (:class:`Fault`) fire on the n-th request whose path contains a text: ``429`` (rate limited,
with ``Retry-After``, in the exchange's error format), ``500``, ``timeout`` (the answer comes after
``delay_s``), ``truncated`` (the body cut in half). ``holes`` remove a time range of a symbol from
every series (an exchange outage: pages there are empty); ``delisted`` ends a symbol's history at
a time and marks the instrument closed.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import polars as pl

from perpfolio.sources.synthetic import generate_market

HOUR_MS = 3_600_000
RISK_LIMIT_PAGE = 4  # Bybit risk-limit rows per page here, so a symbol's brackets take two pages
OKX_CONTRACT = 0.01  # ctVal of every replayed OKX swap (base currency per contract)


def replay_tiers(index: int) -> list[tuple[float, float, float]]:
    """Generated brackets of the ``index``-th symbol of a replay market, as (max notional USDT, mmr,
    max leverage): six brackets with caps ``100,000 (index + 1) x 2^k`` and rates ``0.004 (k + 1)``."""
    return [(100_000.0 * (index + 1) * 2**k, 0.004 * (k + 1), 1.0 / (0.008 * (k + 1))) for k in range(6)]


@dataclass
class Fault:
    """Answer the ``nth`` request (1-based) whose path contains ``path``, and the ``count - 1`` such
    requests after it, with ``kind``: "429" | "500" | "timeout" | "truncated"."""

    kind: str
    nth: int = 1
    path: str = ""
    count: int = 1
    seen: int = 0


@dataclass
class Series:
    """One series sorted by time: epoch-ms times and a row of values per time."""

    ts: np.ndarray
    values: np.ndarray  # (n, k) floats

    def between(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows with lo <= ts <= hi (epoch ms, inclusive)."""
        i, j = np.searchsorted(self.ts, lo, "left"), np.searchsorted(self.ts, hi, "right")
        return self.ts[i:j], self.values[i:j]


@dataclass
class ReplayMarket:
    """The data served: per symbol (e.g. BTCUSDT) the trade, mark and index klines and funding;
    per currency (BTC, ETH) DVOL; each symbol's delisting time (epoch ms) if any; and each symbol's
    leverage brackets (max notional USDT, mmr, max leverage), as :func:`replay_tiers` makes them."""

    klines: dict[tuple[str, str], Series]  # (kind, symbol) -> open, high, low, close, volume
    funding: dict[str, Series]  # symbol -> rate
    dvol: dict[str, Series]  # currency -> open, high, low, close (DVOL points, candle open time)
    delisted: dict[str, int] = field(default_factory=dict)
    tiers: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    @property
    def symbols(self) -> list[str]:
        return sorted(self.funding)


def synthetic_market(symbols: Sequence[str], start: datetime, end: datetime, *, seed: int = 1,
                     holes: dict[str, list[tuple[datetime, datetime]]] | None = None,
                     delisted: dict[str, datetime] | None = None) -> ReplayMarket:
    """The synthetic market of ``symbols`` over ``[start, end)`` (perpfolio.sources.synthetic), minus
    the ``holes`` ([from, to) per symbol) and everything from a symbol's ``delisted`` time on."""
    market = generate_market(list(symbols), start, end, seed=seed)
    cut = {s: [(_ms(a), _ms(b)) for a, b in (holes or {}).get(s, [])] for s in symbols}
    for s, t in (delisted or {}).items():
        cut[s].append((_ms(t), _ms(end) + 365 * 24 * HOUR_MS))

    def keep(frame: pl.DataFrame, symbol: str, col: str = "ts") -> pl.DataFrame:
        t = pl.col(col).dt.epoch("ms")
        for a, b in cut.get(symbol, []):
            frame = frame.filter((t < a) | (t >= b))
        return frame

    klines, funding = {}, {}
    for s in symbols:
        c = keep(market.candles.filter(pl.col("symbol") == s).sort("ts"), s)
        klines["trade", s] = _series(c, ["open", "high", "low", "close", "volume"])
        refs = market.reference_prices.filter(pl.col("symbol") == s)
        for kind in ("mark", "index"):
            r = keep(refs.filter(pl.col("kind") == kind).sort("ts"), s)
            klines[kind, s] = _series(r.with_columns(volume=pl.lit(0.0)), ["open", "high", "low", "close", "volume"])
        funding[s] = _series(keep(market.funding.filter(pl.col("symbol") == s).sort("ts"), s, "bar_ts"), ["rate"])
    dvol = {}
    for u in ("BTC", "ETH"):
        iv = market.implied_vol.filter(pl.col("underlying") == u).sort("ts")
        # the index's candle that opened an hour before the synthetic observation closes at it
        iv = iv.with_columns(ts=pl.col("ts") - pl.duration(hours=1), p=pl.col("iv") * 100)
        dvol[u] = Series(iv["ts"].dt.epoch("ms").to_numpy(), np.repeat(iv["p"].to_numpy()[:, None], 4, axis=1))
    tiers = {s: replay_tiers(i) for i, s in enumerate(symbols)}
    return ReplayMarket(klines, funding, dvol, {s: _ms(t) for s, t in (delisted or {}).items()}, tiers)


class ReplayServer:
    """Serve ``market`` on 127.0.0.1 (``port`` 0 = any free port) in a background thread.

    ``requests`` logs every request as (monotonic time, path, query, fault or ""). Use as a
    context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, market: ReplayMarket, *, port: int = 0, faults: Sequence[Fault] = (),
                 retry_after_s: float = 1.0, delay_s: float = 2.0):
        self.market, self.faults = market, list(faults)
        self.retry_after_s, self.delay_s = retry_after_s, delay_s
        self.requests: list[tuple[float, str, dict, str]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> ReplayServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def data_requests(self) -> int:
        """Requests for history (instrument lists and the current leverage tiers excluded)."""
        return sum(1 for _, path, _, _ in self.requests if path not in _NOT_HISTORY)

    def fault_for(self, path: str) -> str:
        with self._lock:
            for f in self.faults:
                if f.path in path:
                    f.seen += 1
                    if f.nth <= f.seen < f.nth + f.count:
                        return f.kind
        return ""

    def answer(self, path: str, q: dict[str, str]) -> tuple[int, object]:
        """(HTTP status, JSON body) of one GET."""
        route = _ROUTES.get(path)
        if route is None:
            return 404, {"error": f"no route {path}"}
        try:
            return 200, route(self.market, q)
        except KeyError as exc:  # an unknown symbol, in the exchange's own words
            return _unknown(path, str(exc))


# --- endpoints ----------------------------------------------------------------------------------

def _binance_info(m: ReplayMarket, q):
    return {"timezone": "UTC", "serverTime": int(time.time() * 1000), "symbols": [
        {"symbol": s, "pair": s, "contractType": "PERPETUAL", "status": "SETTLING" if s in m.delisted else "TRADING",
         "baseAsset": s[:-4], "quoteAsset": "USDT", "marginAsset": "USDT"} for s in m.symbols]}


def _binance_klines(kind):
    def answer(m: ReplayMarket, q):
        symbol = q.get("pair") if kind == "index" else q.get("symbol")
        s = m.klines[kind, symbol]
        limit = min(int(q.get("limit", 500)), 1500)
        t, v = s.between(int(q.get("startTime", 0)), int(q.get("endTime", 2**62)))
        if "startTime" not in q:
            t, v = t[-limit:], v[-limit:]
        t, v = t[:limit], v[:limit]
        vol = (lambda r: _f(r[4])) if kind == "trade" else (lambda r: "0")
        return [[int(a), _f(r[0]), _f(r[1]), _f(r[2]), _f(r[3]), vol(r), int(a) + HOUR_MS - 1,
                 _f(r[4] * r[3]) if kind == "trade" else "0", 100, "0", "0", "0"] for a, r in zip(t, v)]
    return answer


def _binance_funding(m: ReplayMarket, q):
    s = m.funding[q["symbol"]]
    t, v = s.between(int(q.get("startTime", 0)), int(q.get("endTime", 2**62)))
    limit = min(int(q.get("limit", 100)), 1000)
    return [{"symbol": q["symbol"], "fundingTime": int(a), "fundingRate": _f(r[0]), "markPrice": ""}
            for a, r in zip(t[:limit], v[:limit])]


def _bybit(result):
    return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": int(time.time() * 1000)}


def _bybit_info(m: ReplayMarket, q):
    return _bybit({"category": "linear", "nextPageCursor": "", "list": [
        {"symbol": s, "contractType": "LinearPerpetual", "status": "Closed" if s in m.delisted else "Trading",
         "baseCoin": s[:-4], "quoteCoin": "USDT", "settleCoin": "USDT", "fundingInterval": 480} for s in m.symbols]})


def _bybit_klines(kind):
    def answer(m: ReplayMarket, q):
        s = m.klines[kind, q["symbol"]]
        t, v = s.between(int(q.get("start", 0)), int(q.get("end", 2**62)))
        limit = min(int(q.get("limit", 200)), 1000)
        t, v = t[-limit:][::-1], v[-limit:][::-1]
        cols = 5 if kind == "trade" else 4
        rows = [[str(int(a)), *(_f(x) for x in r[:cols]), *([_f(r[4] * r[3])] if kind == "trade" else [])]
                for a, r in zip(t, v)]
        return _bybit({"symbol": q["symbol"], "category": "linear", "list": rows})
    return answer


def _bybit_funding(m: ReplayMarket, q):
    s = m.funding[q["symbol"]]
    t, v = s.between(int(q.get("startTime", 0)), int(q.get("endTime", 2**62)))
    limit = min(int(q.get("limit", 200)), 200)
    return _bybit({"category": "linear", "list": [
        {"symbol": q["symbol"], "fundingRate": _f(r[0]), "fundingRateTimestamp": str(int(a))}
        for a, r in zip(t[-limit:][::-1], v[-limit:][::-1])]})


def _bybit_risk_limit(m: ReplayMarket, q):
    brackets = m.tiers[q["symbol"]]
    start = int(q.get("cursor") or 0)
    rows, cum, prev = [], 0.0, (0.0, 0.0)
    for k, (cap, mmr, lev) in enumerate(brackets):
        cum += prev[0] * (mmr - prev[1])  # continuous deduction, as Bybit's mmDeduction
        rows.append({"id": k + 1, "symbol": q["symbol"], "riskLimitValue": _f(cap), "maintenanceMargin": _f(mmr),
                     "initialMargin": _f(2 * mmr), "isLowestRisk": int(k == 0), "maxLeverage": _f(lev),
                     "mmDeduction": _f(cum) if k else ""})
        prev = (cap, mmr)
    page = rows[start:start + RISK_LIMIT_PAGE]
    more = start + RISK_LIMIT_PAGE < len(rows)
    return _bybit({"category": "linear", "list": page, "nextPageCursor": str(start + RISK_LIMIT_PAGE) if more else ""})


def _okx(data):
    return {"code": "0", "msg": "", "data": data}


def _okx_mark(m: ReplayMarket, symbol: str) -> float:
    """The mark price the replayed OKX quotes now: the symbol's last mark close."""
    return float(m.klines["mark", symbol].values[-1, 3])


def _okx_mark_price(m: ReplayMarket, q):
    symbol = _okx_symbol(q["instId"])
    return _okx([{"instType": "SWAP", "instId": q["instId"], "markPx": _f(_okx_mark(m, symbol)),
                  "ts": str(int(m.klines["mark", symbol].ts[-1]))}])


def _okx_position_tiers(m: ReplayMarket, q):
    symbol = _okx_symbol(q["instFamily"])
    contract_usdt = OKX_CONTRACT * _okx_mark(m, symbol)
    rows, low = [], 0
    for k, (cap, mmr, lev) in enumerate(m.tiers[symbol]):
        high = round(cap / contract_usdt)
        rows.append({"uly": q["instFamily"], "instFamily": q["instFamily"], "instId": "", "tier": str(k + 1),
                     "minSz": str(low), "maxSz": str(high), "mmr": _f(mmr), "imr": _f(2 * mmr), "maxLever": _f(lev),
                     "optMgnFactor": "0", "quoteMaxLoan": "", "baseMaxLoan": ""})
        low = high + 1
    return _okx(rows)


def _okx_info(m: ReplayMarket, q):
    return _okx([{"instType": "SWAP", "instId": f"{s[:-4]}-USDT-SWAP", "uly": f"{s[:-4]}-USDT", "settleCcy": "USDT",
                  "ctValCcy": s[:-4], "ctVal": _f(OKX_CONTRACT), "ctType": "linear",
                  "state": "suspend" if s in m.delisted else "live"} for s in m.symbols])


def _okx_window(s: Series, q, max_limit: int):
    lo = int(q["before"]) + 1 if "before" in q else 0
    hi = int(q["after"]) - 1 if "after" in q else 2**62
    t, v = s.between(lo, hi)
    limit = min(int(q.get("limit", 100)), max_limit)
    return t[-limit:][::-1], v[-limit:][::-1]


def _okx_symbol(inst_id: str) -> str:
    base, quote = inst_id.split("-")[:2]
    return base + quote


def _okx_klines(kind, max_limit):
    def answer(m: ReplayMarket, q):
        t, v = _okx_window(m.klines[kind, _okx_symbol(q["instId"])], q, max_limit)
        if kind == "trade":  # ts, o, h, l, c, vol (contracts of 0.01), volCcy (base), volCcyQuote, confirm
            return _okx([[str(int(a)), *(_f(x) for x in r[:4]), _f(r[4] * 100), _f(r[4]), _f(r[4] * r[3]), "1"]
                         for a, r in zip(t, v)])
        return _okx([[str(int(a)), *(_f(x) for x in r[:4]), "1"] for a, r in zip(t, v)])
    return answer


def _okx_funding(m: ReplayMarket, q):
    t, v = _okx_window(m.funding[_okx_symbol(q["instId"])], q, 100)
    return _okx([{"instType": "SWAP", "instId": q["instId"], "fundingRate": _f(r[0]),
                  "realizedRate": _f(r[0]), "fundingTime": str(int(a)), "method": "current_period"}
                 for a, r in zip(t, v)])


def _deribit_dvol(m: ReplayMarket, q):
    s = m.dvol[q["currency"]]
    t, v = s.between(int(q["start_timestamp"]), int(q["end_timestamp"]))
    more = None
    if len(t) > 1000:  # the newest 1000 points; `continuation` asks for the older ones
        t, v, more = t[-1000:], v[-1000:], int(t[-1000])
    return {"jsonrpc": "2.0", "result": {"data": [[int(a), *map(float, r)] for a, r in zip(t, v)],
                                         "continuation": more}, "usIn": 0, "usOut": 0, "usDiff": 0, "testnet": False}


_ROUTES = {
    "/fapi/v1/exchangeInfo": _binance_info,
    "/fapi/v1/klines": _binance_klines("trade"),
    "/fapi/v1/markPriceKlines": _binance_klines("mark"),
    "/fapi/v1/indexPriceKlines": _binance_klines("index"),
    "/fapi/v1/fundingRate": _binance_funding,
    "/v5/market/instruments-info": _bybit_info,
    "/v5/market/kline": _bybit_klines("trade"),
    "/v5/market/mark-price-kline": _bybit_klines("mark"),
    "/v5/market/index-price-kline": _bybit_klines("index"),
    "/v5/market/funding/history": _bybit_funding,
    "/v5/market/risk-limit": _bybit_risk_limit,
    "/api/v5/public/instruments": _okx_info,
    "/api/v5/market/history-candles": _okx_klines("trade", 300),
    "/api/v5/market/history-mark-price-candles": _okx_klines("mark", 100),
    "/api/v5/market/history-index-candles": _okx_klines("index", 100),
    "/api/v5/public/funding-rate-history": _okx_funding,
    "/api/v5/public/mark-price": _okx_mark_price,
    "/api/v5/public/position-tiers": _okx_position_tiers,
    "/api/v2/public/get_volatility_index_data": _deribit_dvol,
}


_NOT_HISTORY = frozenset({"/fapi/v1/exchangeInfo", "/v5/market/instruments-info", "/api/v5/public/instruments",
                          "/v5/market/risk-limit", "/api/v5/public/mark-price", "/api/v5/public/position-tiers"})


def _unknown(path: str, what: str) -> tuple[int, object]:
    if path.startswith("/fapi"):
        return 400, {"code": -1121, "msg": "Invalid symbol."}
    if path.startswith("/v5"):
        return 200, {"retCode": 10001, "retMsg": f"params error: symbol invalid {what}", "result": {}, "retExtInfo": {}}
    if path.startswith("/api/v5"):
        return 200, {"code": "51001", "msg": f"Instrument ID does not exist {what}", "data": []}
    return 400, {"jsonrpc": "2.0", "error": {"code": 10001, "message": f"unknown currency {what}"}}


def _rate_limited(path: str) -> object:
    if path.startswith("/fapi"):
        return {"code": -1003, "msg": "Too many requests; current limit is 2400 request weight per 1 MINUTE."}
    if path.startswith("/v5"):
        return {"retCode": 10006, "retMsg": "Too many visits!", "result": {}, "retExtInfo": {}}
    if path.startswith("/api/v5"):
        return {"code": "50011", "msg": "Too Many Requests", "data": []}
    return {"jsonrpc": "2.0", "error": {"code": 10028, "message": "too_many_requests"}}


def _handler(server: ReplayServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms delayed-ACK stall

        def do_GET(self):  # noqa: N802 (http.server's name)
            parts = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            fault = server.fault_for(parts.path)
            with server._lock:
                server.requests.append((time.monotonic(), parts.path, q, fault))
            if fault == "429":
                return self._send(429, json.dumps(_rate_limited(parts.path)), {"Retry-After": f"{server.retry_after_s:g}"})
            if fault == "500":
                return self._send(500, "<html><body>500 Internal Server Error</body></html>", content_type="text/html")
            if fault == "timeout":
                time.sleep(server.delay_s)
            status, body = server.answer(parts.path, q)
            text = json.dumps(body)
            self._send(status, text[: len(text) // 2] if fault == "truncated" else text)

        def _send(self, status: int, text: str, headers: dict | None = None, content_type: str = "application/json"):
            data = text.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout fault)

        def log_message(self, *args):  # keep test output clean
            pass

    return Handler


def _series(frame: pl.DataFrame, cols: list[str]) -> Series:
    return Series(frame["ts"].dt.epoch("ms").to_numpy(), frame.select(cols).to_numpy().astype(float))


def _f(x: float) -> str:
    return repr(float(x))


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the synthetic market as Binance/Bybit/OKX/Deribit APIs on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--symbols", default="BTC,ETH,SOL", help="comma-separated, e.g. BTC,ETH or BTCUSDT")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2025, 1, 1))
    parser.add_argument("--end", type=date.fromisoformat, default=date(2025, 7, 30), help="first day NOT served")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    symbols = [s.strip().upper().removesuffix("USDT") + "USDT" for s in args.symbols.split(",") if s.strip()]
    to_utc = lambda d: datetime(d.year, d.month, d.day, tzinfo=timezone.utc)  # noqa: E731
    market = synthetic_market(symbols, to_utc(args.start), to_utc(args.end), seed=args.seed)
    server = ReplayServer(market, port=args.port)
    print(f"replaying {', '.join(symbols)} {args.start}..{args.end - timedelta(days=1)} (seed {args.seed}) at {server.url}",
          flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
