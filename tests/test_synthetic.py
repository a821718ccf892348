"""Tests of the synthetic market source against independent numpy computations."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError
from perpfolio.sources.synthetic import SyntheticMarket, generate_market

UTC = timezone.utc
START = datetime(2025, 1, 1, tzinfo=UTC)
END = datetime(2025, 7, 30, tzinfo=UTC)
MAJORS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
HOUR = timedelta(hours=1)
PLUS_2 = timezone(timedelta(hours=2))
N_HOURS = int((END - START) / HOUR)
# Planted schedule, derived by hand from the spec: episodes on days [70, 78) and [190, 198),
# crash on the second calendar day of each episode at 14:00 UTC.
EPISODES = [(70 * 24, 78 * 24), (190 * 24, 198 * 24)]
CRASH_TS = [datetime(2025, 3, 13, 14, tzinfo=UTC), datetime(2025, 7, 11, 14, tzinfo=UTC)]
CRASH_BARS = [int((ts - START) / HOUR) for ts in CRASH_TS]


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return generate_market(MAJORS, START, END)


def log_returns(candles: pl.DataFrame, symbol: str) -> np.ndarray:
    bars = candles.filter(pl.col("symbol") == symbol).sort("ts")
    return np.log(bars["close"].to_numpy() / bars["open"].to_numpy())


def realized_var_30d(r: np.ndarray) -> np.ndarray:
    """Annualized 30-day realized variance of the 720 bars ending at each bar (NaN before)."""
    out = np.full(r.size, np.nan)
    for t in range(719, r.size):
        out[t] = np.sum(r[t - 719 : t + 1] ** 2) * 8760 / 720
    return out


class TestSchema:
    def test_candles(self, market):
        c = market.candles
        assert c.schema == pl.Schema(
            {
                "ts": pl.Datetime("us", "UTC"),
                "symbol": pl.String,
                "open": pl.Float64,
                "high": pl.Float64,
                "low": pl.Float64,
                "close": pl.Float64,
                "volume": pl.Float64,
                "source": pl.String,
            }
        )
        assert c.height == 3 * N_HOURS
        assert c["source"].unique().to_list() == ["synthetic"]
        for sym in MAJORS:
            ts = c.filter(pl.col("symbol") == sym)["ts"].to_list()
            assert ts == [START + k * HOUR for k in range(N_HOURS)]
        assert c.null_count().sum_horizontal().item() == 0

    def test_funding(self, market):
        f = market.funding
        assert f.schema == pl.Schema(
            {
                "ts": pl.Datetime("us", "UTC"),
                "bar_ts": pl.Datetime("us", "UTC"),
                "symbol": pl.String,
                "rate": pl.Float64,
                "interval_hours": pl.Int64,
                "source": pl.String,
            }
        )
        assert f["ts"].min() > START and f["ts"].max() == END
        assert (f["bar_ts"] == f["ts"] - HOUR).all()
        assert sorted(f["symbol"].unique().to_list()) == MAJORS

    def test_implied_vol_and_events(self, market):
        iv = market.implied_vol
        ts_type = pl.Datetime("us", "UTC")
        assert iv.schema == pl.Schema(
            {"ts": ts_type, "underlying": pl.String, "iv": pl.Float64, "source": pl.String}
        )
        assert iv.height == 2 * N_HOURS
        ev = market.events
        assert ev.schema == pl.Schema(
            {"kind": pl.String, "symbol": pl.String, "start": ts_type, "end": ts_type}
        )
        turb = ev.filter(pl.col("kind") == "turbulent")
        assert turb["start"].to_list() == [START + a * HOUR for a, _ in EPISODES]
        assert turb["end"].to_list() == [START + b * HOUR for _, b in EPISODES]
        assert turb["symbol"].null_count() == 2
        assert ev.filter(pl.col("kind") == "crash")["start"].to_list() == CRASH_TS
        assert (ev["start"] < END).all()


class TestDeterminism:
    def test_same_seed_same_frames(self, market):
        again = generate_market(MAJORS, START, END)
        for name in ("candles", "funding", "implied_vol", "events", "reference_prices"):
            assert getattr(again, name).equals(getattr(market, name)), name

    def test_other_seed_differs(self, market):
        other = generate_market(MAJORS, START, END, seed=8)
        a, b = market.candles["close"].to_numpy(), other.candles["close"].to_numpy()
        assert np.mean(a != b) > 0.99
        assert not other.funding["rate"].equals(market.funding["rate"])

    def test_symbol_order_irrelevant(self, market):
        shuffled = generate_market(["SOLUSDT", "BTCUSDT", "ETHUSDT"], START, END)
        assert shuffled.candles.equals(market.candles)


class TestPrefixStability:
    """Backfills per daily partition must not rewrite history."""

    def assert_prefix(self, short: SyntheticMarket, long: SyntheticMarket, symbol: str, cut: datetime):
        """Bars (candles, mark and index) of `symbol` with ts < cut and its funding events with ts <= cut are identical."""
        candles = short.candles.filter(pl.col("symbol") == symbol)
        funding = short.funding.filter(pl.col("symbol") == symbol)
        reference = short.reference_prices.filter(pl.col("symbol") == symbol)
        assert candles.height > 0 and funding.height > 0 and reference.height == 2 * candles.height
        assert candles.equals(long.candles.filter((pl.col("symbol") == symbol) & (pl.col("ts") < cut)))
        assert funding.equals(long.funding.filter((pl.col("symbol") == symbol) & (pl.col("ts") <= cut)))
        assert reference.equals(long.reference_prices.filter((pl.col("symbol") == symbol) & (pl.col("ts") < cut)))

    def test_end_extended(self):
        cut = datetime(2025, 3, 13, 17, tzinfo=UTC)  # inside the first episode, after its crash
        short = generate_market(MAJORS + ["ABCUSDT"], START, cut)
        long = generate_market(MAJORS + ["ABCUSDT"], START, END + timedelta(days=30))
        for sym in MAJORS + ["ABCUSDT"]:
            self.assert_prefix(short, long, sym, cut)
        assert short.implied_vol.equals(long.implied_vol.filter(pl.col("ts") < cut))
        assert short.events.equals(long.events.filter(pl.col("start") < cut))

    def test_symbols_added(self, market):
        alone = generate_market(["ETHUSDT"], START, END)
        crowd = generate_market(MAJORS + ["XYZUSDT", "ABCUSDT"], START, END)
        for sym_market in (market, crowd):
            self.assert_prefix(alone, sym_market, "ETHUSDT", END)
        assert alone.implied_vol.equals(market.implied_vol.filter(pl.col("underlying") == "ETH"))
        abc = generate_market(["ABCUSDT"], START, END)
        self.assert_prefix(abc, crowd, "ABCUSDT", END)


class TestCandles:
    def test_ohlc_invariants(self, market):
        c = market.candles
        o, h, lo, cl, v = (c[k].to_numpy() for k in ("open", "high", "low", "close", "volume"))
        assert np.all(h >= np.maximum(o, cl))
        assert np.all(lo <= np.minimum(o, cl))
        assert np.all(lo > 0) and np.all(v > 0)
        for sym, p0 in (("BTCUSDT", 95_000.0), ("ETHUSDT", 3_300.0), ("SOLUSDT", 190.0)):
            bars = c.filter(pl.col("symbol") == sym).sort("ts")
            assert bars["open"][0] == p0
            np.testing.assert_array_equal(bars["open"].to_numpy()[1:], bars["close"].to_numpy()[:-1])

    def test_unknown_symbol_parameters_in_range(self):
        c = generate_market(["FOOUSDT", "BARUSDT", "BAZUSDT"], START, END).candles
        for sym in ("FOOUSDT", "BARUSDT", "BAZUSDT"):
            bars = c.filter(pl.col("symbol") == sym)
            assert 0.05 <= bars["open"][0] <= 500.0
            r = log_returns(c, sym)
            calm = np.ones(r.size, bool)
            for a, b in EPISODES:
                calm[a:b] = False
            # calm realized vol near the drawn base vol (60-120 %), GARCH noise allowed
            assert 0.45 < r[calm].std() * np.sqrt(8760) < 1.5

    def test_fat_tails(self, market):
        r = log_returns(market.candles, "BTCUSDT")
        keep = np.delete(r, CRASH_BARS)  # excluding the planted crash: tails come from the model
        for x in (r, keep):
            z = x - x.mean()
            assert np.mean(z**4) / np.mean(z**2) ** 2 - 3.0 > 1.0

    def test_volatility_clustering(self, market):
        """Lag-1 autocorrelation of squared BTC returns is far above its value for shuffled returns.

        The two planted crash bars are left out: one -11 % bar swamps the denominator.
        """
        r = np.delete(log_returns(market.candles, "BTCUSDT"), CRASH_BARS)

        def acf1(x):
            x = x - x.mean()
            return np.sum(x[1:] * x[:-1]) / np.sum(x * x)

        rng = np.random.default_rng(0)
        shuffled = [rng.permutation(r) for _ in range(200)]
        assert acf1(r**2) > 0.05
        assert acf1(r**2) > np.quantile([acf1(x**2) for x in shuffled], 0.99)
        assert acf1(np.abs(r)) > max(acf1(np.abs(x)) for x in shuffled)

    def test_cross_correlations(self, market):
        r = np.column_stack([log_returns(market.candles, s) for s in MAJORS])
        corr = np.corrcoef(r, rowvar=False)
        off = corr[np.triu_indices(3, k=1)]
        assert np.all((off > 0.6) & (off < 0.85)), off

    def test_turbulent_episodes_two_to_four_times_calm_vol(self, market):
        for sym in MAJORS:
            r = log_returns(market.candles, sym)
            calm = np.ones(r.size, bool)
            for a, b in EPISODES:
                calm[a:b] = False
            for a, b in EPISODES:
                ratio = r[a:b].std() / r[calm].std()
                assert 2.0 <= ratio <= 4.0, (sym, a, ratio)

    def test_crash_hour(self, market):
        c = market.candles.with_columns(ret=pl.col("close") / pl.col("open") - 1.0)
        for ts in CRASH_TS:
            at = c.filter(pl.col("ts") == ts)
            btc = at.filter(pl.col("symbol") == "BTCUSDT")["ret"].item()
            eth = at.filter(pl.col("symbol") == "ETHUSDT")["ret"].item()
            sol = at.filter(pl.col("symbol") == "SOLUSDT")["ret"].item()
            assert btc <= -0.10
            assert btc == pytest.approx(-0.11, abs=1e-12)
            assert eth == pytest.approx(-0.11 * (0.88 * 0.65) / (0.92 * 0.50), abs=1e-12)
            assert sol == pytest.approx(-0.11 * (0.82 * 0.85) / (0.92 * 0.50), abs=1e-12)

    def test_crash_hits_every_symbol(self):
        """Loadings of unknown symbols give crash returns of 11 % x (0.3..1.02)/0.46, within the 35 % cap."""
        syms = [f"S{i:02d}USDT" for i in range(40)]
        c = generate_market(syms, START, START + timedelta(days=75)).candles
        ret = c.filter(pl.col("ts") == CRASH_TS[0]).select(pl.col("close") / pl.col("open") - 1.0)["close"]
        assert ret.len() == 40
        assert ret.min() >= -0.11 * 1.02 / 0.46 - 1e-12
        assert ret.max() <= -0.11 * 0.30 / 0.46 + 1e-12


class TestFunding:
    def test_intervals_and_spacing(self, market):
        f = market.funding
        assert sorted(f["interval_hours"].unique().to_list()) == [1, 4, 8]
        assert f.filter(pl.col("symbol") == "BTCUSDT")["interval_hours"].unique().to_list() == [8]
        for sym in ("ETHUSDT", "SOLUSDT"):
            assert sorted(f.filter(pl.col("symbol") == sym)["interval_hours"].unique().to_list()) == [1, 4, 8]
        for sym in MAJORS:
            ev = f.filter(pl.col("symbol") == sym).sort("ts")
            ts = ev["ts"].to_numpy()
            gaps = np.diff(ts).astype("timedelta64[h]").astype(int)
            np.testing.assert_array_equal(gaps, ev["interval_hours"].to_numpy()[1:])
            hours = ev["ts"].dt.hour().to_numpy()
            assert np.all(hours % ev["interval_hours"].to_numpy() == 0)

    def test_regimes_follow_schedule(self, market):
        eth = market.funding.filter(pl.col("symbol") == "ETHUSDT")
        day = 24 * HOUR

        def intervals(first_day: int, last_day: int) -> list[int]:
            ts = pl.col("ts")
            rows = eth.filter((ts > START + first_day * day) & (ts <= START + last_day * day))
            return rows["interval_hours"].unique().to_list()

        assert intervals(0, 70) == [8]
        assert intervals(70, 80) == [1]  # episode plus two days
        assert intervals(110, 140) == [4]
        assert intervals(190, 200) == [1]

    def test_rate_levels(self, market):
        f = market.funding.with_columns(rate_8h=pl.col("rate") * 8 / pl.col("interval_hours"))
        for sym in MAJORS:
            rate = f.filter(pl.col("symbol") == sym)["rate"].to_numpy()
            mean_per_8h = rate.sum() / N_HOURS * 8  # time-weighted
            assert 0.5e-4 <= mean_per_8h <= 2e-4, (sym, mean_per_8h)
        r8 = f["rate_8h"].to_numpy()
        assert np.sum(r8 < 0) > 0 and np.sum(r8 > 5e-4) > 0
        assert np.all(np.abs(r8) <= 0.0075 + 1e-15)

    def test_negative_after_crash(self, market):
        f = market.funding.with_columns(rate_8h=pl.col("rate") * 8 / pl.col("interval_hours"))
        after = f.filter((pl.col("ts") > CRASH_TS[0]) & (pl.col("ts") <= CRASH_TS[0] + timedelta(days=2)))
        assert after["rate_8h"].mean() < 0


class TestImpliedVol:
    def test_only_btc_and_eth(self, market):
        assert sorted(market.implied_vol["underlying"].unique().to_list()) == ["BTC", "ETH"]
        assert generate_market(["SOLUSDT", "ABCUSDT"], START, END).implied_vol.height == 0
        assert (market.implied_vol["iv"] > 0).all()

    @pytest.mark.parametrize("underlying", ["BTC", "ETH"])
    def test_above_realized_on_average(self, market, underlying):
        iv = market.implied_vol.filter(pl.col("underlying") == underlying).sort("ts")["iv"].to_numpy()
        rv = realized_var_30d(log_returns(market.candles, underlying + "USDT"))
        ok = ~np.isnan(rv)
        assert np.mean(iv[ok] ** 2) > np.mean(rv[ok])

    def test_below_realized_after_crash(self, market):
        iv = market.implied_vol.filter(pl.col("underlying") == "BTC").sort("ts")["iv"].to_numpy()
        rv = realized_var_30d(log_returns(market.candles, "BTCUSDT"))
        window = slice(CRASH_BARS[0], CRASH_BARS[0] + 240)
        assert np.mean(iv[window] ** 2 < rv[window]) > 0.5


class TestReferencePrices:
    """Index (spot composite) and mark prices: basis over the index tied to funding, mark close to the perp."""

    @staticmethod
    def kind(market: SyntheticMarket, kind: str, symbol: str) -> pl.DataFrame:
        return market.reference_prices.filter((pl.col("kind") == kind) & (pl.col("symbol") == symbol)).sort("ts")

    def test_schema_and_contract(self, market):
        from assets.schemas import ReferencePrices

        r = market.reference_prices
        assert r.schema == pl.Schema({"ts": pl.Datetime("us", "UTC"), "symbol": pl.String, "kind": pl.String,
                                      "open": pl.Float64, "high": pl.Float64, "low": pl.Float64, "close": pl.Float64,
                                      "source": pl.String})
        assert r.height == 2 * 3 * N_HOURS and r["source"].unique().to_list() == ["synthetic"]
        ReferencePrices.validate(r)  # prices > 0, OHLC consistent, unique (ts, symbol, kind)
        assert r.sort("symbol", "kind", "ts").equals(r)

    def test_bars_open_at_the_previous_close(self, market):
        for sym, p0 in (("BTCUSDT", 95_000.0), ("SOLUSDT", 190.0)):
            for kind, first in (("index", p0 / (1 + 1e-4)), ("mark", p0)):
                bars = self.kind(market, kind, sym)
                assert bars["open"][0] == pytest.approx(first, rel=1e-15)
                np.testing.assert_array_equal(bars["open"].to_numpy()[1:], bars["close"].to_numpy()[:-1])

    def test_basis_follows_funding(self, market):
        """basis = perp close / index close - 1 against the per-8h funding rate at the bar's close: positive
        funding goes with a premium and negative with a discount (the AR(1) target is the rate itself)."""
        f = market.funding.select("bar_ts", "symbol", rate_8h=pl.col("rate") * 8 / pl.col("interval_hours"))
        index = market.reference_prices.filter(pl.col("kind") == "index").select("ts", "symbol", index=pl.col("close"))
        joined = market.candles.join(index, on=["ts", "symbol"]).with_columns(basis=pl.col("close") / pl.col("index") - 1)
        joined = joined.join(f, left_on=["ts", "symbol"], right_on=["bar_ts", "symbol"])
        basis, rate = joined["basis"].to_numpy(), joined["rate_8h"].to_numpy()
        assert np.corrcoef(basis, rate)[0, 1] > 0.3
        assert 0.5 < np.cov(basis, rate)[0, 1] / np.var(rate, ddof=1) < 1.5  # slope ~1: premium ~ rate per 8h
        assert basis[rate < 0].mean() < 0 < basis[rate > 5e-4].mean()
        assert basis[rate > 5e-4].mean() > 3e-4
        assert np.abs(basis).max() < 0.01  # small: spot and perp move together

    def test_mark_tracks_the_perp_more_closely_than_the_index(self, market):
        perp = market.candles.filter(pl.col("symbol") == "ETHUSDT").sort("ts")["close"].to_numpy()
        mark = self.kind(market, "mark", "ETHUSDT")["close"].to_numpy()
        index = self.kind(market, "index", "ETHUSDT")["close"].to_numpy()
        mark_gap, index_gap = np.abs(mark / perp - 1), np.abs(index / perp - 1)
        assert mark_gap.max() < 2e-3 and mark_gap.mean() < 1e-4 < index_gap.mean()

    def test_existing_series_unchanged(self, market):
        """Regression (issue 6): adding mark and index prices drew from a NEW random stream; the candles,
        funding and implied vol of the built-in market are the values generated before they existed."""
        c = market.candles
        assert c.filter(pl.col("symbol") == "BTCUSDT")["close"][-1] == pytest.approx(51903.85276905333, rel=1e-9)
        assert c.filter(pl.col("symbol") == "SOLUSDT")["high"][3000] == pytest.approx(62.5120891481225, rel=1e-9)
        assert c["volume"].sum() == pytest.approx(14138944959.769857, rel=1e-9)
        assert market.funding["rate"].sum() == pytest.approx(0.18927046117778198, rel=1e-9)
        assert market.funding.filter(pl.col("symbol") == "ETHUSDT")["rate"][500] == pytest.approx(0.0001152084862396182, rel=1e-9)
        assert market.implied_vol["iv"].sum() == pytest.approx(8153.018582005672, rel=1e-9)


class TestBadArguments:
    @pytest.mark.parametrize(
        ("symbols", "start", "end", "seed", "match"),
        [
            ([], START, END, 7, "symbols must not be empty"),
            (["BTCUSDT", "BTCUSDT"], START, END, 7, r"duplicates: \['BTCUSDT'\]"),
            ("BTCUSDT", START, END, 7, "sequence of exchange ids"),
            (["BTCUSDT", ""], START, END, 7, "non-empty strings"),
            (["BTCUSDT"], datetime(2025, 1, 1), END, 7, "start must be a tz-aware UTC"),
            (["BTCUSDT"], START, END.astimezone(PLUS_2), 7, "end must be a tz-aware UTC"),
            (["BTCUSDT"], START + timedelta(minutes=30), END, 7, "start must be aligned to the hour"),
            (["BTCUSDT"], END, START, 7, "end must be after start"),
            (["BTCUSDT"], START, START, 7, "end must be after start"),
            (["BTCUSDT"], START, END, -1, "seed must be a non-negative int"),
        ],
    )
    def test_raises_config_error(self, symbols, start, end, seed, match):
        with pytest.raises(ConfigError, match=match):
            generate_market(symbols, start, end, seed=seed)


class TestOddStart:
    def test_start_not_at_midnight(self):
        """Funding events stay on the UTC clock grid when start is mid-day."""
        start = datetime(2025, 1, 1, 5, tzinfo=UTC)
        f = generate_market(["ETHUSDT"], start, start + timedelta(days=100)).funding.sort("ts")
        hours = f["ts"].dt.hour().to_numpy()
        iv = f["interval_hours"].to_numpy()
        assert np.all(hours % iv == 0)
        assert f["ts"][0] == datetime(2025, 1, 1, 8, tzinfo=UTC)
        gaps = np.diff(f["ts"].to_numpy()).astype("timedelta64[h]").astype(int)
        np.testing.assert_array_equal(gaps, iv[1:])


def test_performance_smoke():
    symbols = MAJORS + [f"X{i:02d}USDT" for i in range(17)]
    t0 = time.perf_counter()
    m = generate_market(symbols, START, START + timedelta(days=365))
    assert time.perf_counter() - t0 < 3.0
    assert m.candles.height == 20 * 8760
