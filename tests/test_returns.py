"""perpfolio.returns: funding netting, resampling, gaps, log vs simple, validation.

Expected values are computed independently: plain Python over dicts of closes and rates, or
numbers worked by hand in the test.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError, DataError
from perpfolio.returns import net_returns, periods_per_year, returns_matrix

T0 = datetime(2024, 3, 1, tzinfo=timezone.utc)
H = timedelta(hours=1)
TS = pl.Datetime("us", "UTC")


def hours(n: float) -> datetime:
    return T0 + n * H


def candles_frame(closes: dict[str, dict[datetime, float]]) -> pl.DataFrame:
    rows = [(ts, sym, c) for sym, series in closes.items() for ts, c in series.items()]
    return pl.DataFrame(
        {"ts": [r[0] for r in rows], "symbol": [r[1] for r in rows], "close": [r[2] for r in rows]},
        schema={"ts": TS, "symbol": pl.String, "close": pl.Float64},
    ).with_columns(open=pl.col("close"), high=pl.col("close"), low=pl.col("close"), volume=pl.lit(1.0), source=pl.lit("test"))


def funding_frame(events: list[tuple[str, datetime, float, int]]) -> pl.DataFrame:
    """events: (symbol, event ts, rate, interval_hours); bar_ts = ceil_to_hour(ts) - 1h (contract)."""

    def bar_ts(ts: datetime) -> datetime:
        floor = ts.replace(minute=0, second=0, microsecond=0)
        return (floor if floor == ts else floor + H) - H

    return pl.DataFrame(
        {
            "ts": [e[1] for e in events],
            "bar_ts": [bar_ts(e[1]) for e in events],
            "symbol": [e[0] for e in events],
            "rate": [e[2] for e in events],
            "interval_hours": [e[3] for e in events],
            "source": ["test"] * len(events),
        },
        schema={"ts": TS, "bar_ts": TS, "symbol": pl.String, "rate": pl.Float64, "interval_hours": pl.Int64, "source": pl.String},
    )


def as_dict(frame: pl.DataFrame, column: str) -> dict[tuple[str, datetime], float]:
    return {(r["symbol"], r["ts"]): r[column] for r in frame.iter_rows(named=True)}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240301)


@pytest.fixture
def market(rng):
    """Two symbols, 48 hourly bars; BTC funding switches from 8h to 1h intervals at 08:00 on day 1."""
    closes = {
        sym: {hours(h): float(p) for h, p in enumerate(start * np.exp(np.cumsum(rng.normal(0, 0.01, 48))))}
        for sym, start in (("BTCUSDT", 60000.0), ("ETHUSDT", 3000.0))
    }
    events = [
        ("BTCUSDT", hours(0), 5e-4, 8),  # bar_ts = previous day 23:00: before the candles, ignored
        ("BTCUSDT", hours(8), 1e-4, 8),  # exactly 08:00 -> bar opened 07:00
    ]
    events += [("BTCUSDT", hours(8 + i), 1e-5 * i, 1) for i in range(1, 17)]  # 09:00..24:00, hourly
    events += [("ETHUSDT", hours(h), -2e-4, 8) for h in (8, 16, 24, 32, 40, 48)]
    events += [("ETHUSDT", hours(49), 7e-4, 8)]  # bar_ts 48:00: after the last bar, ignored
    return closes, events


class TestPeriodsPerYear:
    @pytest.mark.parametrize(("bar_hours", "expected"), [(1, 8760.0), (4, 2190.0), (24, 365.0), (8, 1095.0)])
    def test_values(self, bar_hours, expected):
        assert periods_per_year(bar_hours) == expected

    @pytest.mark.parametrize("bad", [0, 5, -4, 48, 1.0, True])
    def test_rejects_non_divisors_of_24(self, bad):
        with pytest.raises(ConfigError, match="bar_hours"):
            periods_per_year(bad)


class TestHourlyNetting:
    def test_price_returns_and_first_bar(self, market):
        closes, events = market
        out = net_returns(candles_frame(closes), funding_frame(events))
        assert out.schema == pl.Schema(
            {"ts": TS, "symbol": pl.String, "price_return": pl.Float64, "funding_return": pl.Float64,
             "net_return": pl.Float64, "filled": pl.Boolean}
        )
        assert out.height == 2 * 47  # first bar of each symbol has no return
        assert out["symbol"].to_list() == ["BTCUSDT"] * 47 + ["ETHUSDT"] * 47
        got = as_dict(out, "price_return")
        for sym, series in closes.items():
            for h in range(1, 48):
                assert got[(sym, hours(h))] == pytest.approx(series[hours(h)] / series[hours(h - 1)] - 1, rel=1e-14)
        assert not out["filled"].any()

    def test_funding_across_interval_change_8h_to_1h(self, market):
        closes, events = market
        out = net_returns(candles_frame(closes), funding_frame(events))
        funding = as_dict(out, "funding_return")
        # worked by hand: the 08:00 event (8h interval) is charged in the bar opened 07:00; then
        # 1h events at 09:00, 10:00, ... (rates 1e-5, 2e-5, ...) land in bars 08:00, 09:00, ...
        assert funding[("BTCUSDT", hours(7))] == -1e-4
        assert funding[("BTCUSDT", hours(8))] == -1e-5
        assert funding[("BTCUSDT", hours(9))] == -2e-5
        assert funding[("BTCUSDT", hours(23))] == -16e-5
        assert funding[("BTCUSDT", hours(24))] == 0.0  # no event: a genuine zero
        assert funding[("BTCUSDT", hours(1))] == 0.0  # the 00:00 event belongs to the bar before the data
        assert sum(funding[("BTCUSDT", hours(h))] for h in range(1, 48)) == pytest.approx(-(1e-4 + 1e-5 * 136))
        # ETH: negative rates, longs receive; the 48:00 event lands in the last bar (47:00)
        assert funding[("ETHUSDT", hours(7))] == 2e-4
        assert funding[("ETHUSDT", hours(47))] == 2e-4
        assert sum(funding[("ETHUSDT", hours(h))] for h in range(1, 48)) == pytest.approx(6 * 2e-4)
        net = as_dict(out, "net_return")
        price = as_dict(out, "price_return")
        for key, value in net.items():
            assert value == price[key] + funding[key]

    def test_short_earns_minus_net_return(self):
        """Flat price, positive funding: the long pays the rate, a short (w = -1) receives it."""
        closes = {"SOLUSDT": {hours(h): 150.0 for h in range(4)}}
        out = net_returns(candles_frame(closes), funding_frame([("SOLUSDT", hours(3), 3e-4, 1)]))
        net = out["net_return"].to_numpy()
        np.testing.assert_array_equal(net, [0.0, -3e-4, 0.0])
        np.testing.assert_array_equal(-1.0 * net, [0.0, 3e-4, 0.0])  # short's bar pnl per unit equity
        # a short's equity over a price move: w = -1 on the simple net return, by hand
        moving = {"SOLUSDT": {hours(0): 100.0, hours(1): 110.0, hours(2): 110.0}}
        out = net_returns(candles_frame(moving), funding_frame([("SOLUSDT", hours(1.5), 1e-3, 1)]))
        assert -1.0 * out["net_return"][0] == pytest.approx(-(0.10 - 1e-3), rel=1e-14)

    def test_unsorted_input_gives_the_same_frame(self, market, rng):
        closes, events = market
        candles, funding = candles_frame(closes), funding_frame(events)
        expected = net_returns(candles, funding)
        shuffled = net_returns(candles.sample(fraction=1.0, shuffle=True, seed=3), funding.sample(fraction=1.0, shuffle=True, seed=4))
        assert shuffled.equals(expected)

    def test_funding_of_symbol_without_candles_is_ignored(self, market):
        closes, events = market
        with_extra = funding_frame(events + [("XRPUSDT", hours(5), 1e-3, 8)])
        assert net_returns(candles_frame(closes), with_extra).equals(net_returns(candles_frame(closes), funding_frame(events)))


class TestResampling:
    @pytest.mark.parametrize("bar_hours", [4, 24])
    def test_coarse_bars_by_hand(self, market, bar_hours):
        closes, events = market
        out = net_returns(candles_frame(closes), funding_frame(events), bar_hours=bar_hours)
        n_bars = 48 // bar_hours
        assert out.height == 2 * (n_bars - 1)
        assert all(ts.hour % bar_hours == 0 for ts in out["ts"])  # aligned to 00:00 UTC
        price, funding = as_dict(out, "price_return"), as_dict(out, "funding_return")
        for sym, series in closes.items():
            bar_close = {b: series[hours(b * bar_hours + bar_hours - 1)] for b in range(n_bars)}
            for b in range(1, n_bars):
                ts = hours(b * bar_hours)
                assert price[(sym, ts)] == pytest.approx(bar_close[b] / bar_close[b - 1] - 1, rel=1e-14)
                charged = [r for s, t, r, _ in events if s == sym and ts < t <= ts + bar_hours * H]
                assert funding[(sym, ts)] == pytest.approx(-sum(charged), rel=1e-12, abs=0)

    def test_4h_sums_funding_over_the_bar_by_hand(self, market):
        closes, events = market
        funding = as_dict(net_returns(candles_frame(closes), funding_frame(events), bar_hours=4), "funding_return")
        # bar 04:00 holds the 08:00 8h event; bar 08:00 holds the 1h events of 09..12:00
        assert funding[("BTCUSDT", hours(4))] == pytest.approx(-1e-4, rel=1e-15)
        assert funding[("BTCUSDT", hours(8))] == pytest.approx(-(1 + 2 + 3 + 4) * 1e-5, rel=1e-12)
        assert funding[("BTCUSDT", hours(20))] == pytest.approx(-(13 + 14 + 15 + 16) * 1e-5, rel=1e-12)
        assert funding[("BTCUSDT", hours(24))] == 0.0

    def test_1d_sums_all_events_of_the_day(self, market):
        closes, events = market
        out = net_returns(candles_frame(closes), funding_frame(events), bar_hours=24)
        assert out["ts"].to_list() == [hours(24), hours(24)]
        # day 2 (events in (24:00, 48:00]): BTC none; ETH the 32:00, 40:00, 48:00 events
        assert as_dict(out, "funding_return") == {("BTCUSDT", hours(24)): 0.0, ("ETHUSDT", hours(24)): pytest.approx(6e-4)}

    def test_incomplete_coarse_bar_is_dropped_and_next_is_filled(self, market):
        closes, events = market
        closes["BTCUSDT"].pop(hours(13))  # bar 12:00-16:00 loses an hour
        out = net_returns(candles_frame(closes), funding_frame(events), bar_hours=4).filter(pl.col("symbol") == "BTCUSDT")
        assert hours(12) not in out["ts"].to_list()
        row = out.filter(pl.col("ts") == hours(16)).row(0, named=True)
        assert row["filled"] is True
        assert row["price_return"] == pytest.approx(closes["BTCUSDT"][hours(19)] / closes["BTCUSDT"][hours(11)] - 1, rel=1e-14)
        # the dropped bar's funding (events 13..16:00 -> rates 5..8e-5) is charged with the spanning bar
        assert row["funding_return"] == pytest.approx(-(5 + 6 + 7 + 8 + 9 + 10 + 11 + 12) * 1e-5, rel=1e-12)
        assert out.filter(pl.col("ts") != hours(16))["filled"].sum() == 0


class TestGaps:
    def test_gap_spans_from_last_close_never_zero(self, market):
        closes, events = market
        series = closes["BTCUSDT"]
        for h in (10, 11):
            series.pop(hours(h))
        out = net_returns(candles_frame(closes), funding_frame(events)).filter(pl.col("symbol") == "BTCUSDT")
        assert out.height == 47 - 2
        assert {hours(10), hours(11)}.isdisjoint(out["ts"].to_list())
        row = out.filter(pl.col("ts") == hours(12)).row(0, named=True)
        assert row["filled"] is True
        assert row["price_return"] == pytest.approx(series[hours(12)] / series[hours(9)] - 1, rel=1e-14)
        # funding of the missing bars 10:00, 11:00 (events at 11:00, 12:00) plus its own (13:00)
        assert row["funding_return"] == pytest.approx(-(3 + 4 + 5) * 1e-5, rel=1e-12)
        assert out["filled"].sum() == 1

    def test_first_bar_after_listing_gap_in_other_symbol_unaffected(self, market):
        closes, events = market
        for h in range(0, 5):
            closes["ETHUSDT"].pop(hours(h))  # ETH lists at 05:00
        out = net_returns(candles_frame(closes), funding_frame(events))
        eth = out.filter(pl.col("symbol") == "ETHUSDT")
        assert eth["ts"][0] == hours(6)
        assert not eth["filled"].any()
        ts, symbols, matrix = returns_matrix(out)
        assert symbols == ["BTCUSDT", "ETHUSDT"]
        assert np.isnan(matrix[:5, 1]).all() and np.isfinite(matrix[5:, 1]).all()


class TestLogVsSimple:
    def test_log_is_log1p_of_simple_net(self, market):
        closes, events = market
        simple = net_returns(candles_frame(closes), funding_frame(events), kind="simple")
        log = net_returns(candles_frame(closes), funding_frame(events), kind="log")
        assert log.select("ts", "symbol", "price_return", "funding_return", "filled").equals(
            simple.select("ts", "symbol", "price_return", "funding_return", "filled")
        )
        for s, lg in zip(simple["net_return"], log["net_return"]):
            assert lg == pytest.approx(math.log1p(s), rel=1e-14)

    def test_log_by_hand(self):
        closes = {"BTCUSDT": {hours(0): 100.0, hours(1): 90.0}}
        out = net_returns(candles_frame(closes), funding_frame([("BTCUSDT", hours(1.5), 1e-3, 8)]), kind="log")
        assert out["net_return"][0] == pytest.approx(math.log(1 - 0.1 - 0.001), rel=1e-14)

    def test_unknown_kind(self, market):
        closes, events = market
        with pytest.raises(ConfigError, match="kind"):
            net_returns(candles_frame(closes), funding_frame(events), kind="pct")


class TestValidation:
    def test_duplicate_candle(self, market):
        closes, events = market
        candles = candles_frame(closes)
        with pytest.raises(DataError, match=r"duplicate \(symbol, ts\).*BTCUSDT.*2024-03-01 03:00.*field=ts"):
            net_returns(pl.concat([candles, candles.filter((pl.col("symbol") == "BTCUSDT") & (pl.col("ts") == hours(3)))]), funding_frame(events))

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), None])
    def test_bad_close(self, market, bad):
        closes, events = market
        candles = candles_frame(closes).with_columns(
            close=pl.when((pl.col("symbol") == "ETHUSDT") & (pl.col("ts") == hours(5))).then(pl.lit(bad, pl.Float64)).otherwise("close")
        )
        with pytest.raises(DataError, match=r"close must be finite and > 0 at symbol='ETHUSDT' ts=2024-03-01 05:00.*field=close"):
            net_returns(candles, funding_frame(events))

    @pytest.mark.parametrize("bad", [float("nan"), None])
    def test_bad_rate(self, market, bad):
        closes, events = market
        funding = funding_frame(events).with_columns(rate=pl.when(pl.col("ts") == hours(8)).then(pl.lit(bad, pl.Float64)).otherwise("rate"))
        with pytest.raises(DataError, match=r"non-finite rate at symbol='BTCUSDT' bar_ts=2024-03-01 07:00.*field=rate"):
            net_returns(candles_frame(closes), funding)

    def test_ts_not_on_the_hour(self, market):
        closes, events = market
        candles = candles_frame(closes).with_columns(
            ts=pl.when(pl.col("ts") == hours(2)).then(pl.col("ts") + timedelta(minutes=30)).otherwise("ts")
        )
        with pytest.raises(DataError, match=r"not on the hour at symbol='BTCUSDT' ts=2024-03-01 02:30.*field=ts"):
            net_returns(candles, funding_frame(events))


class TestReturnsMatrix:
    def test_pivot_by_hand(self):
        frame = pl.DataFrame(
            {"ts": [hours(1), hours(0), hours(1)], "symbol": ["B", "A", "A"], "net_return": [0.3, 0.1, 0.2]},
            schema={"ts": TS, "symbol": pl.String, "net_return": pl.Float64},
        )
        ts, symbols, matrix = returns_matrix(frame)
        assert ts.dtype == np.dtype("datetime64[us]")
        np.testing.assert_array_equal(ts, np.array(["2024-03-01T00:00", "2024-03-01T01:00"], dtype="datetime64[us]"))
        assert symbols == ["A", "B"]
        np.testing.assert_array_equal(matrix, [[0.1, np.nan], [0.2, 0.3]])

    def test_other_column_and_duplicates(self, market):
        closes, events = market
        out = net_returns(candles_frame(closes), funding_frame(events))
        _, _, price = returns_matrix(out, column="price_return")
        np.testing.assert_array_equal(price[:, 0], out.filter(pl.col("symbol") == "BTCUSDT")["price_return"].to_numpy())
        with pytest.raises(DataError, match="duplicate"):
            returns_matrix(pl.concat([out, out.head(1)]))
