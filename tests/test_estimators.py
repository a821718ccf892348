"""perpfolio.estimators: rolling moments vs per-window numpy, by-hand semicovariance, PSD,
status cases, annualization, long-format round trip, no look-ahead."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError, DataError
from perpfolio.estimators import (
    Moments,
    annualize,
    moments_from_long,
    moments_to_long,
    rolling_moments,
    to_datetime64,
    window_ends,
)

TS0 = np.datetime64("2024-01-01T00:00", "us")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


@pytest.fixture
def returns(rng) -> np.ndarray:
    """300 hourly bars x 4 symbols of correlated per-bar returns."""
    mix = rng.normal(size=(4, 4)) * 0.004
    return rng.normal(size=(300, 4)) @ mix + 1e-4


def hourly(t: int) -> np.ndarray:
    return TS0 + np.arange(t) * np.timedelta64(1, "h")


class TestAgainstNumpyPerWindow:
    @pytest.mark.parametrize("ddof", [0, 1])
    def test_mean_cov_downside_semicov(self, returns, ddof):
        window, tau = 48, 2e-4
        ends = np.arange(window - 1, returns.shape[0])  # 253 windows: several chunks
        m = rolling_moments(returns, ends, window=window, ddof=ddof, tau=tau)
        assert (m.status == "ok").all() and (m.n_obs == window).all()
        for k, e in enumerate(ends):
            w = returns[e - window + 1 : e + 1]
            z = np.minimum(w - tau, 0.0)
            np.testing.assert_allclose(m.mean[k], np.mean(w, axis=0), rtol=1e-12, atol=0)
            np.testing.assert_allclose(m.cov[k], np.cov(w, rowvar=False, ddof=ddof), rtol=1e-10, atol=1e-20)
            np.testing.assert_allclose(m.downside[k], np.mean(z**2, axis=0), rtol=1e-12, atol=0)
            np.testing.assert_allclose(m.semicov[k], sum(np.outer(r, r) for r in z) / window, rtol=1e-10, atol=1e-20)
        assert np.array_equal(m.cov, m.cov.transpose(0, 2, 1))
        assert np.array_equal(m.semicov, m.semicov.transpose(0, 2, 1))

    def test_semicov_by_hand(self):
        r = np.array([[0.01, -0.02], [-0.03, 0.01], [0.02, -0.01], [-0.01, -0.04]])
        m = rolling_moments(r, np.array([3]), window=4, tau=0.0)
        # z = min(0, r): [[0, -.02], [-.03, 0], [0, -.01], [-.01, -.04]]
        # sum z1^2 = .0009 + .0001 = .0010; z1 z2 = .0004; z2^2 = .0004 + .0001 + .0016 = .0021
        np.testing.assert_allclose(m.semicov[0], np.array([[0.0010, 0.0004], [0.0004, 0.0021]]) / 4, rtol=1e-12)
        np.testing.assert_allclose(m.downside[0], [0.0010 / 4, 0.0021 / 4], rtol=1e-12)
        np.testing.assert_allclose(m.mean[0], [-0.0025, -0.015], rtol=1e-12)
        # cov by hand, ddof=1: deviations of column 1 from -0.0025
        d1 = np.array([0.0125, -0.0275, 0.0225, -0.0075])
        d2 = np.array([-0.005, 0.025, 0.005, -0.025])
        np.testing.assert_allclose(m.cov[0], [[d1 @ d1 / 3, d1 @ d2 / 3], [d1 @ d2 / 3, d2 @ d2 / 3]], rtol=1e-12)

    def test_tau_shifts_the_threshold(self):
        r = np.array([[0.01], [0.02], [0.03]])
        m = rolling_moments(r, np.array([2]), window=3, tau=0.025)
        # z = [-0.015, -0.005, 0]: D = (0.000225 + 0.000025) / 3
        np.testing.assert_allclose(m.downside[0], [0.00025 / 3], rtol=1e-12)


class TestPositiveSemidefinite:
    @pytest.mark.parametrize(("n", "window"), [(4, 48), (12, 6)])  # (12, 6): N > T, rank-deficient
    def test_eigenvalues(self, rng, n, window):
        r = rng.standard_t(3, size=(120, n)) * 0.01
        m = rolling_moments(r, np.arange(window - 1, 120), window=window)
        for mats in (m.cov, m.semicov):
            eig = np.linalg.eigvalsh(mats)
            scale = np.abs(mats).max(axis=(1, 2))
            assert (eig.min(axis=1) >= -1e-12 * scale).all()


class TestStatus:
    def test_each_status_and_nan_arrays(self, returns):
        r = returns[:60].copy()
        r[30, 2] = np.nan  # a missing bar in symbol 2
        r[40:52, 1] = 0.001  # symbol 1 constant over bars 40..51
        ends = np.array([5, 19, 29, 35, 51, 59])
        m = rolling_moments(r, ends, window=12)
        assert m.status.tolist() == ["insufficient_history", "ok", "ok", "missing_data", "degenerate", "ok"]
        assert m.n_obs.tolist() == [6, 12, 12, 11, 12, 12]
        bad = m.status != "ok"
        for arr in (m.mean, m.cov, m.downside, m.semicov):
            assert np.isnan(arr[bad]).all() and np.isfinite(arr[~bad]).all()
        assert repr(m) == "Moments(windows=6, symbols=4, status={'degenerate': 1, 'insufficient_history': 1, 'missing_data': 1, 'ok': 3})"

    def test_window_longer_than_data(self, returns):
        m = rolling_moments(returns[:10], np.array([9]), window=20)
        assert m.status.tolist() == ["insufficient_history"] and np.isnan(m.cov).all()

    def test_no_bar_before_asof(self, returns):
        """ends = -1 (an asof before the first bar, as a searchsorted lookup yields) is insufficient history."""
        m = rolling_moments(returns, np.array([-1, 99]), window=20)
        assert m.status.tolist() == ["insufficient_history", "ok"] and m.n_obs.tolist() == [0, 20]
        assert np.isnan(m.mean[0]).all()

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"window": 1}, ConfigError, "window must be an integer >= 2, got 1"),
            ({"window": 10, "ddof": 10}, ConfigError, r"ddof must be an integer in \[0, window\), got 10"),
            ({"window": 10, "tau": np.nan}, ConfigError, "tau must be finite"),
        ],
    )
    def test_bad_parameters(self, returns, kwargs, error, match):
        with pytest.raises(error, match=match):
            rolling_moments(returns, np.array([50]), **kwargs)

    def test_bad_data(self, returns):
        r = returns.copy()
        r[7, 3] = np.inf
        with pytest.raises(DataError, match="infinite value at row 7, column 3"):
            rolling_moments(r, np.array([50]), window=10)
        with pytest.raises(DataError, match=r"row 300 outside \[-1, 300\)"):
            rolling_moments(returns, np.array([50, 300]), window=10)


class TestNoLookAhead:
    def test_perturbing_the_future_leaves_past_windows_unchanged(self, returns, rng):
        ends = np.arange(47, 300, 7)
        base = rolling_moments(returns, ends, window=48)
        for k in (0, 10, 20, len(ends) - 2):
            future = returns.copy()
            future[ends[k] + 1 :] += rng.normal(size=future[ends[k] + 1 :].shape)
            future[ends[k] + 1 :: 5, 0] = np.nan
            moved = rolling_moments(future, ends, window=48)
            for name in ("mean", "cov", "downside", "semicov", "n_obs", "status"):
                np.testing.assert_array_equal(getattr(moved, name)[: k + 1], getattr(base, name)[: k + 1])
            assert not np.array_equal(moved.mean[k + 1 :], base.mean[k + 1 :], equal_nan=True)


class TestWindowEnds:
    def test_indices(self):
        ts = hourly(48)
        asofs = np.array(["2024-01-01T23:00", "2024-01-02T23:00"], dtype="datetime64[us]")
        np.testing.assert_array_equal(window_ends(ts, asofs), [23, 47])

    def test_missing_asof(self):
        ts = np.delete(hourly(48), 23)
        with pytest.raises(DataError, match="asof 2024-01-01T23:00:00.000000 is not a bar ts"):
            window_ends(ts, np.array(["2024-01-01T23:00"], dtype="datetime64[us]"))
        with pytest.raises(DataError, match="asof 2024-01-03T00:00:00.000000 is not a bar ts"):
            window_ends(ts, np.array(["2024-01-03T00:00"], dtype="datetime64[us]"))

    def test_timezone_aware_datetimes(self):
        ts = hourly(48)
        berlin = timezone(timedelta(hours=1))
        asofs = [datetime(2024, 1, 1, 23, tzinfo=timezone.utc), datetime(2024, 1, 3, 0, tzinfo=berlin)]
        np.testing.assert_array_equal(window_ends(ts, asofs), [23, 47])
        np.testing.assert_array_equal(window_ends(pl.Series(ts[:24]).dt.replace_time_zone("UTC"), asofs[:1]), [23])
        np.testing.assert_array_equal(to_datetime64(pl.Series(asofs).dt.convert_time_zone("Asia/Tokyo")), ts[[23, 47]])

    def test_unsorted_ts(self):
        ts = hourly(5)[[0, 2, 1, 3, 4]]
        with pytest.raises(DataError, match="strictly increasing; row 2"):
            window_ends(ts, ts[:1])


class TestAnnualize:
    def test_scales_moments_not_counts(self, returns):
        m = rolling_moments(returns, np.array([5, 100, 200]), window=48)
        a = annualize(m, 8760.0)
        for name in ("mean", "cov", "downside", "semicov"):
            np.testing.assert_array_equal(getattr(a, name), getattr(m, name) * 8760.0)
        np.testing.assert_array_equal(a.n_obs, m.n_obs)
        np.testing.assert_array_equal(a.status, m.status)

    @pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
    def test_bad_factor(self, returns, bad):
        m = rolling_moments(returns, np.array([100]), window=48)
        with pytest.raises(ConfigError, match="periods_per_year"):
            annualize(m, bad)


class TestLongFormat:
    @pytest.fixture
    def moments(self, returns):
        r = returns.copy()
        r[120, 0] = np.nan
        ends = np.array([10, 71, 95, 130, 299])  # insufficient, ok, ok, missing, ok
        return hourly(300)[ends], ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"], annualize(rolling_moments(r, ends, window=48), 8760.0)

    def test_layout(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_long(asofs, symbols, m, window_bars=48)
        assert frame.columns == ["as_of", "estimator", "quantity", "symbol", "symbol_j", "value", "window_bars", "n_obs", "status"]
        assert frame.schema["as_of"] == pl.Datetime("us", "UTC") and frame.schema["n_obs"] == pl.Int64
        assert frame.height == 5 * (2 * 4 + 2 * 16)
        one = frame.filter(pl.col("as_of") == pl.lit(asofs[1]).dt.replace_time_zone("UTC"))
        cell = one.filter((pl.col("quantity") == "cov") & (pl.col("symbol") == "ETHUSDT") & (pl.col("symbol_j") == "SOLUSDT"))
        assert cell["value"].to_list() == [m.cov[1, 1, 2]]
        assert one.filter(pl.col("quantity") == "downside")["value"].to_list() == m.downside[1].tolist()
        assert one.filter(pl.col("quantity") == "mean")["symbol_j"].null_count() == 4
        by_status = frame.group_by("status").agg(pl.col("value").null_count(), pl.len()).sort("status")
        assert by_status.rows() == [("insufficient_history", 40, 40), ("missing_data", 40, 40), ("ok", 0, 120)]

    def test_round_trip_bit_exact(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_long(asofs, symbols, m, estimator="sample", window_bars=48)
        shuffled = pl.concat([frame.sample(fraction=1.0, shuffle=True, seed=1), frame.with_columns(estimator=pl.lit("ewma"))])
        back_asofs, back_symbols, back = moments_from_long(shuffled, estimator="sample")
        np.testing.assert_array_equal(back_asofs, asofs)
        assert back_symbols == symbols
        for name in ("mean", "cov", "downside", "semicov", "n_obs", "status"):
            assert np.array_equal(getattr(back, name), getattr(m, name), equal_nan=name not in ("n_obs", "status")), name

    def test_missing_cell_and_unknown_estimator(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_long(asofs, symbols, m, window_bars=48)
        with pytest.raises(DataError, match="quantity='mean' has 19 rows, expected 20"):
            moments_from_long(frame.slice(1))
        with pytest.raises(DataError, match="no rows for estimator='lw'"):
            moments_from_long(frame, estimator="lw")
        stray = frame.with_columns(symbol_j=pl.when(pl.col("symbol_j") == "XRPUSDT").then(pl.lit("DOGEUSDT")).otherwise("symbol_j"))
        with pytest.raises(DataError, match="symbol_j='DOGEUSDT' .*not among the symbols"):
            moments_from_long(stray)
        mixed = frame.with_columns(status=pl.when(pl.col("quantity") == "cov").then(pl.lit("ok")).otherwise("status"))
        with pytest.raises(DataError, match="status or n_obs differs within asof=2024-01-01 10:00"):
            moments_from_long(mixed)
        with pytest.raises(DataError, match="null value with status 'ok'"):
            moments_from_long(frame.with_columns(value=pl.when(pl.col("quantity") == "mean").then(None).otherwise("value")))

    def test_shape_checks(self, moments):
        asofs, symbols, m = moments
        with pytest.raises(DataError, match="3 symbols for moments of shape"):
            moments_to_long(asofs, symbols[:3], m, window_bars=48)
        with pytest.raises(DataError, match=r"Moments.cov has shape \(5, 4, 4\), expected \(5, 3, 3\)"):
            Moments(mean=m.mean[:, :3], cov=m.cov, downside=m.downside[:, :3], semicov=m.semicov, n_obs=m.n_obs, status=m.status)
