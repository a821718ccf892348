"""perpfolio.signals: realized variance by hand, VRP from an index, the BTC proxy, stale and
future index rows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError, DataError
from perpfolio.signals import realized_variance, vrp_signals

UTC = timezone.utc
ASOFS = np.array(["2024-01-02T23:00", "2024-01-03T23:00"], dtype="datetime64[us]")
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
RV = np.array([[0.25, 0.49, 1.00], [0.16, 0.36, 0.64]])  # annualized realized variances


def iv_frame(rows: list[tuple[str, datetime, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"ts": [r[1] for r in rows], "underlying": [r[0] for r in rows], "iv": [r[2] for r in rows], "source": "test"},
        schema={"ts": pl.Datetime("us", "UTC"), "underlying": pl.String, "iv": pl.Float64, "source": pl.String},
    )


def at(day: int, hour: int) -> datetime:
    return datetime(2024, 1, day, hour, tzinfo=UTC)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(5)


class TestRealizedVariance:
    def test_by_hand(self):
        r = np.array([[0.01, 0.02], [-0.02, 0.0], [0.03, -0.01], [0.0, 0.01]])
        rv = realized_variance(r, np.array([2, 3]), window=3, periods_per_year=8760.0)
        # window rows 0..2: (1e-4 + 4e-4 + 9e-4)/3, (4e-4 + 0 + 1e-4)/3; rows 1..3: (4e-4+9e-4+0)/3, (0+1e-4+1e-4)/3
        expected = np.array([[14e-4 / 3, 5e-4 / 3], [13e-4 / 3, 2e-4 / 3]]) * 8760.0
        np.testing.assert_allclose(rv, expected, rtol=1e-12)

    def test_against_loop_with_nan_per_symbol(self, rng):
        r = rng.normal(0, 0.01, size=(400, 3))
        r[200, 1] = np.nan
        ends = np.arange(0, 400, 3)
        rv = realized_variance(r, ends, window=72, periods_per_year=2190.0)
        for k, e in enumerate(ends):
            if e < 71:
                assert np.isnan(rv[k]).all()
                continue
            w = r[e - 71 : e + 1]
            expected = np.array([np.mean(w[:, i] ** 2) * 2190.0 for i in range(3)])
            np.testing.assert_allclose(rv[k], expected, rtol=1e-12)  # NaN only where symbol 1 saw the gap
            assert np.isnan(rv[k, 1]) == (e - 71 <= 200 <= e)
            assert np.isfinite(rv[k, [0, 2]]).all()

    def test_no_look_ahead(self, rng):
        r = rng.normal(0, 0.01, size=(200, 2))
        ends = np.array([50, 100, 150])
        base = realized_variance(r, ends, window=24, periods_per_year=8760.0)
        r[101:] *= 10
        moved = realized_variance(r, ends, window=24, periods_per_year=8760.0)
        np.testing.assert_array_equal(moved[:2], base[:2])
        assert (moved[2] > base[2]).all()

    @pytest.mark.parametrize(("kwargs", "match"), [({"window": 0, "periods_per_year": 1.0}, "window"), ({"window": 3, "periods_per_year": 0.0}, "periods_per_year")])
    def test_bad_parameters(self, kwargs, match):
        with pytest.raises(ConfigError, match=match):
            realized_variance(np.zeros((5, 1)), np.array([4]), **kwargs)


class TestVrpFromIndex:
    def test_by_hand(self):
        iv = iv_frame([("BTC", at(2, 0), 0.60), ("ETH", at(2, 22), 0.70), ("BTC", at(3, 12), 0.50), ("ETH", at(3, 23), 0.80)])
        out = vrp_signals(ASOFS, SYMBOLS[:2], RV[:, :2], iv)
        assert out.schema == pl.Schema(
            {"as_of": pl.Datetime("us", "UTC"), "symbol": pl.String, "implied_var": pl.Float64,
             "realized_var": pl.Float64, "vrp": pl.Float64, "iv_source": pl.String, "vrp_with_proxy": pl.Float64}
        )
        assert out["as_of"].to_list() == [at(2, 23), at(2, 23), at(3, 23), at(3, 23)]
        assert out["symbol"].to_list() == ["BTCUSDT", "ETHUSDT"] * 2
        np.testing.assert_allclose(out["implied_var"].to_numpy(), [0.36, 0.49, 0.25, 0.64], rtol=1e-14)
        np.testing.assert_allclose(out["realized_var"].to_numpy(), [0.25, 0.49, 0.16, 0.36])
        np.testing.assert_allclose(out["vrp"].to_numpy(), [0.11, 0.0, 0.09, 0.28], atol=1e-15)
        assert out["iv_source"].to_list() == ["index"] * 4

    def test_asofs_as_timezone_aware_datetimes(self):
        iv = iv_frame([("BTC", at(2, 0), 0.60), ("ETH", at(2, 22), 0.70)])
        expected = vrp_signals(ASOFS, SYMBOLS, RV, iv)
        cet = timezone(timedelta(hours=1))
        assert vrp_signals([at(2, 23), datetime(2024, 1, 4, 0, tzinfo=cet)], SYMBOLS, RV, iv).equals(expected)

    def test_future_rows_are_ignored(self):
        rows = [("BTC", at(2, 20), 0.60)]
        base = vrp_signals(ASOFS[:1], SYMBOLS[:1], RV[:1, :1], iv_frame(rows))
        later = vrp_signals(ASOFS[:1], SYMBOLS[:1], RV[:1, :1], iv_frame(rows + [("BTC", at(2, 23) + timedelta(microseconds=1), 3.0), ("BTC", at(3, 0), 2.0)]))
        assert later.equals(base)
        assert base["implied_var"][0] == pytest.approx(0.36, rel=1e-14)
        exact = vrp_signals(ASOFS[:1], SYMBOLS[:1], RV[:1, :1], iv_frame(rows + [("BTC", at(2, 23), 0.9)]))
        assert exact["implied_var"][0] == pytest.approx(0.81, rel=1e-14)  # a row at ts == asof is usable

    def test_stale_index(self):
        asof = at(2, 23)
        fresh = iv_frame([("BTC", asof - timedelta(hours=48), 0.6)])
        stale = iv_frame([("BTC", asof - timedelta(hours=48, seconds=1), 0.6)])
        assert vrp_signals(ASOFS[:1], SYMBOLS[:1], RV[:1, :1], fresh)["iv_source"].to_list() == ["index"]
        out = vrp_signals(ASOFS[:1], SYMBOLS[:1], RV[:1, :1], stale)
        assert out.select("implied_var", "vrp", "iv_source").row(0) == (None, None, "unavailable")
        assert out["realized_var"][0] == 0.25
        tight = vrp_signals(ASOFS[:1], SYMBOLS[:1], RV[:1, :1], fresh, max_iv_age_hours=47)
        assert tight["iv_source"].to_list() == ["unavailable"]


class TestProxy:
    def test_off_by_default_a_symbol_without_its_own_index_has_no_vrp(self):
        """Regression (issue 12): the BTC-scaled proxy, RV_i (IV_btc^2 / RV_btc - 1), tilted every
        strategy toward the most volatile coins whenever BTC's VRP was positive, and it was on by default.
        It stays available beside: vrp_with_proxy (for a strategy with vrp_source = "with_proxy")."""
        iv = iv_frame([("BTC", at(2, 12), 0.60)])
        out = vrp_signals(ASOFS[:1], SYMBOLS, RV[:1], iv)
        assert out["iv_source"].to_list() == ["index", "unavailable", "unavailable"]
        assert out["vrp"].to_list()[1:] == [None, None]
        assert out["vrp"][0] == pytest.approx(0.36 - RV[0, 0], rel=1e-13)
        proxied = vrp_signals(ASOFS[:1], SYMBOLS, RV[:1], iv, use_proxy=True)["vrp"].to_numpy()
        np.testing.assert_allclose(out["vrp_with_proxy"].to_numpy(), proxied, rtol=1e-15)
        assert out["vrp_with_proxy"][0] == out["vrp"][0]

    def test_scaled_from_btc_by_relative_realized_variance(self):
        iv = iv_frame([("BTC", at(2, 12), 0.60), ("ETH", at(2, 12), 0.70), ("BTC", at(3, 12), 0.50)])
        out = vrp_signals(ASOFS, SYMBOLS, RV, iv, proxy_reference="BTC", use_proxy=True)
        got = {(r["as_of"].day, r["symbol"]): r for r in out.iter_rows(named=True)}
        # SOL on day 2: 0.36 * 1.00 / 0.25 = 1.44; vrp = 1.44 - 1.00 = 0.44
        assert got[(2, "SOLUSDT")]["implied_var"] == pytest.approx(1.44, rel=1e-14)
        assert got[(2, "SOLUSDT")]["vrp"] == pytest.approx(0.44, rel=1e-13)
        assert got[(2, "SOLUSDT")]["iv_source"] == "proxy:BTC"
        # day 3: ETH's index (day 2, 12:00) is 35h old, still usable; SOL: 0.25 * 0.64 / 0.16 = 1.0
        assert got[(3, "ETHUSDT")]["iv_source"] == "index"
        assert got[(3, "SOLUSDT")]["implied_var"] == pytest.approx(1.0, rel=1e-14)
        assert got[(3, "SOLUSDT")]["vrp"] == pytest.approx(0.36, rel=1e-13)

    def test_proxy_keeps_implied_vol_ratio_equal_to_realized_vol_ratio(self, rng):
        rv = rng.uniform(0.1, 2.0, size=(2, 3))
        out = vrp_signals(ASOFS, SYMBOLS, rv, iv_frame([("BTC", at(2, 0), 0.6), ("BTC", at(3, 0), 0.7)]),
                          proxy_reference="BTC", use_proxy=True)
        iv = np.sqrt(out["implied_var"].to_numpy().reshape(2, 3))
        np.testing.assert_allclose(iv / iv[:, :1], np.sqrt(rv / rv[:, :1]), rtol=1e-13)

    def test_unavailable_without_reference(self):
        iv = iv_frame([("ETH", at(2, 12), 0.70)])
        out = vrp_signals(ASOFS[:1], SYMBOLS, RV[:1], iv)
        assert out["iv_source"].to_list() == ["unavailable", "index", "unavailable"]
        assert out["implied_var"].to_list()[0] is None and out["vrp"].null_count() == 2

    def test_unavailable_when_realized_variance_unknown(self):
        rv = RV[:1].copy()
        rv[0, 2] = np.nan
        out = vrp_signals(ASOFS[:1], SYMBOLS, rv, iv_frame([("BTC", at(2, 12), 0.6)]), proxy_reference="BTC", use_proxy=True)
        assert out["iv_source"].to_list() == ["index", "proxy:BTC", "unavailable"]
        assert out.row(2) == (at(2, 23), "SOLUSDT", None, None, None, "unavailable", None)

    def test_other_reference(self):
        out = vrp_signals(ASOFS[:1], SYMBOLS, RV[:1], iv_frame([("ETH", at(2, 12), 0.7)]), proxy_reference="ETH", use_proxy=True)
        assert out["iv_source"].to_list() == ["proxy:ETH", "index", "proxy:ETH"]
        assert out["implied_var"][0] == pytest.approx(0.49 * 0.25 / 0.49, rel=1e-14)


class TestValidation:
    @pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), None])
    def test_bad_iv(self, bad):
        with pytest.raises(DataError, match="iv must be finite and > 0 at underlying='BTC' ts=2024-01-02 12:00"):
            vrp_signals(ASOFS, SYMBOLS, RV, iv_frame([("BTC", at(2, 12), bad)]))

    def test_duplicate_row(self):
        with pytest.raises(DataError, match="duplicate"):
            vrp_signals(ASOFS, SYMBOLS, RV, iv_frame([("BTC", at(2, 12), 0.5), ("BTC", at(2, 12), 0.6)]))

    def test_shapes_and_age(self):
        iv = iv_frame([("BTC", at(2, 12), 0.5)])
        with pytest.raises(DataError, match=r"realized_var has shape \(2, 2\), expected \(2, 3\)"):
            vrp_signals(ASOFS, SYMBOLS, RV[:, :2], iv)
        with pytest.raises(ConfigError, match="max_iv_age_hours"):
            vrp_signals(ASOFS, SYMBOLS, RV, iv, max_iv_age_hours=-1)


# ----------------------------------------------------------------------------------------------
# Funding-adjusted VRP, z-score, funding forecast, momentum, predicted volatility
# ----------------------------------------------------------------------------------------------

from perpfolio.estimators import ewma_weights  # noqa: E402
from perpfolio.signals import (  # noqa: E402
    daily_funding_rate,
    evaluate_funding_forecast,
    ewma_predicted_vol,
    forecast_funding,
    funding_adjusted_vrp,
    garch_predicted_vol,
    momentum,
    trailing_zscore,
)


class TestFundingAdjustedVrp:
    def test_by_hand(self):
        # vrp 0.05 (annual variance) + 1e-5 per hour x 8760 = 0.0876 annual carry of a short -> 0.1376
        out = funding_adjusted_vrp(np.array([[0.05, -0.02]]), np.array([[1e-5, -2e-6]]))
        np.testing.assert_allclose(out, [[0.05 + 0.0876, -0.02 - 0.01752]], rtol=1e-13)
        assert np.isnan(funding_adjusted_vrp(np.array([np.nan]), np.array([1e-5]))).all()
        with pytest.raises(DataError, match="shape"):
            funding_adjusted_vrp(np.zeros(2), np.zeros(3))


class TestTrailingZscore:
    def test_against_loop(self, rng):
        v = rng.normal(size=(40, 3))
        v[7, 1] = np.nan
        z = trailing_zscore(v, lookback=10, min_obs=5)
        for k in range(40):
            for i in range(3):
                win = v[max(0, k - 9) : k + 1, i]
                win = win[np.isfinite(win)]
                if win.size < 5 or np.isnan(v[k, i]):
                    assert np.isnan(z[k, i])
                else:
                    assert z[k, i] == pytest.approx((v[k, i] - win.mean()) / win.std(ddof=1), rel=1e-12)

    def test_constant_series_and_bad_lookback(self):
        assert np.isnan(trailing_zscore(np.ones((10, 1)), lookback=5)).all()
        with pytest.raises(ConfigError, match="lookback"):
            trailing_zscore(np.ones((10, 1)), lookback=2)


class TestDailyFundingRate:
    def test_interval_schedule_does_not_change_the_hourly_rate(self):
        """8h events of 8e-4, 4h events of 4e-4 and 1h events of 1e-4 are all 1e-4 per hour."""
        t = 72
        f = np.zeros((t, 3))
        f[7::8, 0] = -8e-4  # funding_return of a long = -rate, at the bar settling the event
        f[3::4, 1] = -4e-4
        f[:, 2] = -1e-4
        out = daily_funding_rate(f, bar_hours=1)
        assert np.isnan(out[:23]).all()
        np.testing.assert_allclose(out[23:], 1e-4, rtol=1e-12)

    def test_interval_change_mid_day_and_gap(self):
        f = np.zeros((48, 1))
        f[7, 0], f[15, 0] = -8e-4, -8e-4  # two 8h events ...
        f[16:24, 0] = -2e-4  # ... then eight 1h events
        out = daily_funding_rate(f, bar_hours=1)
        assert out[23, 0] == pytest.approx((16e-4 + 16e-4) / 24, rel=1e-12)
        f[30, 0] = np.nan
        out = daily_funding_rate(f, bar_hours=1)
        assert np.isnan(out[30:48, 0]).all() and np.isfinite(out[23:30, 0]).all()

    def test_coarse_bars(self):
        f = np.full((12, 1), -4e-4)  # 4h bars, each settling 4e-4
        np.testing.assert_allclose(daily_funding_rate(f, bar_hours=4)[5:], 1e-4, rtol=1e-12)
        with pytest.raises(ConfigError, match="bar_hours"):
            daily_funding_rate(f, bar_hours=5)


class TestFundingForecast:
    def test_naive_and_ewma_by_hand(self):
        x = np.array([[1.0], [2.0], [np.nan], [4.0]])
        np.testing.assert_array_equal(forecast_funding(x, method="naive"), x)
        lam = 0.5
        out = forecast_funding(x, method="ewma", half_life_days=1.0)
        assert out[1, 0] == pytest.approx((2 + lam * 1) / (1 + lam))
        assert np.isnan(out[2, 0])
        assert out[3, 0] == pytest.approx((4 + lam**2 * 2 + lam**3 * 1) / (1 + lam**2 + lam**3))

    def test_ar1_against_polyfit_and_recovers_phi(self, rng):
        n = 400
        x = np.zeros((n, 1))
        for k in range(1, n):
            x[k] = 2e-5 + 0.6 * x[k - 1] + 1e-5 * rng.normal()
        out = forecast_funding(x, method="ar1", fit_days=30)
        k = 200
        phi, c = np.polyfit(x[k - 29 : k, 0], x[k - 28 : k + 1, 0], 1)  # pairs (j, j+1), j in [k-29, k-1]
        assert out[k, 0] == pytest.approx(c + phi * x[k, 0], rel=1e-9)
        full = forecast_funding(x, method="ar1", fit_days=400)
        phi_all = np.polyfit(x[:-1, 0], x[1:, 0], 1)[0]
        assert abs(phi_all - 0.6) < 0.1
        assert full[-1, 0] == pytest.approx(np.polyval(np.polyfit(x[:-1, 0], x[1:, 0], 1), x[-1, 0]), rel=1e-9)
        ev = evaluate_funding_forecast(x, out)
        assert ev["rmse_ratio"] < 1.0  # on a mean-reverting series AR(1) beats the last value

    def test_evaluation_by_hand(self):
        x = np.array([[1.0], [3.0], [2.0]])
        f = np.array([[2.0], [2.5], [9.0]])
        ev = evaluate_funding_forecast(x, f)
        # model errors: 2-3, 2.5-2 -> -1, 0.5; naive: 1-3, 3-2 -> -2, 1
        assert ev["n"] == 2
        assert ev["rmse_model"] == pytest.approx(np.sqrt(1.25 / 2))
        assert ev["rmse_naive"] == pytest.approx(np.sqrt(5 / 2))
        assert ev["mae_model"] == pytest.approx(0.75) and ev["mae_naive"] == pytest.approx(1.5)
        assert ev["rmse_ratio"] == pytest.approx(np.sqrt(1.25 / 5))

    def test_bad_method(self):
        with pytest.raises(ConfigError, match="method"):
            forecast_funding(np.zeros((3, 1)), method="arima")


class TestMomentumAndPredictedVol:
    def test_momentum_against_loop(self, rng):
        r = rng.normal(0, 0.01, size=(100, 2))
        r[50, 1] = np.nan
        ends = np.array([5, 30, 60, 99])
        m = momentum(r, ends, lookback=20)
        assert np.isnan(m[0]).all()
        for k, e in enumerate(ends[1:], start=1):
            w = r[e - 19 : e + 1]
            np.testing.assert_allclose(m[k], w.sum(axis=0), rtol=1e-12)  # NaN where symbol 1 has the gap

    def test_ewma_vol_against_loop(self, rng):
        r = rng.normal(0, 0.01, size=(200, 2))
        ends = np.array([10, 99, 199])
        v = ewma_predicted_vol(r, ends, window=50, half_life=10.0, periods_per_year=8760.0)
        assert np.isnan(v[0]).all()
        a = ewma_weights(50, 10.0)
        for k, e in enumerate(ends[1:], start=1):
            np.testing.assert_allclose(v[k], np.sqrt(8760.0 * (a @ r[e - 49 : e + 1] ** 2)), rtol=1e-12)

    def test_garch_first_window_equals_a_direct_arch_fit(self, rng):
        from arch import arch_model

        r = rng.standard_t(5, size=(400, 1)) * 0.01
        ends = np.array([50, 299, 323])
        vol, stats = garch_predicted_vol(r, ends, window=300, horizon=24, periods_per_year=8760.0)
        assert np.isnan(vol[0, 0]) and stats["garch_fits"] == 2 and stats["garch_failures"] == 0
        y = r[:300, 0]
        scale = 1 / np.std(y)
        res = arch_model(y * scale, mean="Zero", vol="GARCH", p=1, q=1, rescale=False).fit(disp="off", options={"maxiter": 50})
        var = res.forecast(horizon=24, reindex=False).variance.to_numpy()[-1]
        assert vol[1, 0] == pytest.approx(np.sqrt(var.mean() / scale**2 * 8760.0), rel=1e-6)
        assert 0.2 < vol[2, 0] < 2.0  # a t(5) of 1%/h scale is ~ 1.1 annualized
