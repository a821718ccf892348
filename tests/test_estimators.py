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
    ESTIMATE_COLUMNS,
    moments_from_rows,
    moments_to_rows,
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
            ({"window": 1}, ConfigError, "window must be an integer >= 2 or one such integer per window, got 1"),
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


class TestStoredRows:
    @pytest.fixture
    def moments(self, returns):
        r = returns.copy()
        r[120, 0] = np.nan
        ends = np.array([10, 71, 95, 130, 299])  # insufficient, ok, ok, missing, ok
        return hourly(300)[ends], ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT"], annualize(rolling_moments(r, ends, window=48), 8760.0)

    def test_layout(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_rows(asofs, symbols, m, window_bars=48)
        assert frame.columns == list(ESTIMATE_COLUMNS) and frame.height == 5
        assert frame.schema["as_of"] == pl.Datetime("us", "UTC") and frame.schema["cov"] == pl.List(pl.Float64)
        one = frame.row(1, named=True)
        assert one["symbols"] == symbols and one["status"] == "ok" and one["window_bars"] == 48
        assert one["cov"][1 * 4 + 2] == m.cov[1, 1, 2] and one["semicov"][3 * 4 + 0] == m.semicov[1, 3, 0]
        assert one["downside"] == m.downside[1].tolist() and len(one["cov"]) == 16
        assert frame["status"].to_list() == ["insufficient_history", "ok", "ok", "missing_data", "ok"]
        assert frame.filter(pl.col("status") != "ok").select(pl.col("mean", "downside", "cov", "semicov").null_count()).row(0) == (2, 2, 2, 2)
        assert frame.filter(pl.col("status") != "ok")["symbols"].to_list() == [symbols, symbols]

    def test_round_trip_bit_exact(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_rows(asofs, symbols, m, estimator="sample", window_bars=48)
        shuffled = pl.concat([frame.sample(fraction=1.0, shuffle=True, seed=1), frame.with_columns(estimator=pl.lit("ewma"))])
        back_asofs, back_symbols, back = moments_from_rows(shuffled, estimator="sample")
        np.testing.assert_array_equal(back_asofs, asofs)
        assert back_symbols == symbols
        for name in ("mean", "cov", "downside", "semicov", "n_obs", "status"):
            assert np.array_equal(getattr(back, name), getattr(m, name), equal_nan=name not in ("n_obs", "status")), name

    def test_a_read_of_some_columns_leaves_the_others_nan(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_rows(asofs, symbols, m, window_bars=48).drop("mean", "downside", "semicov")
        _, _, back = moments_from_rows(frame)
        assert np.array_equal(back.cov, m.cov, equal_nan=True)
        assert np.isnan(back.mean).all() and np.isnan(back.semicov).all()

    def test_malformed_rows(self, moments):
        asofs, symbols, m = moments
        frame = moments_to_rows(asofs, symbols, m, window_bars=48)
        with pytest.raises(DataError, match="no rows for estimator='lw'"):
            moments_from_rows(frame, estimator="lw")
        with pytest.raises(DataError, match="two rows for asof=2024-01-01 10:00"):
            moments_from_rows(pl.concat([frame, frame.head(1)]))
        with pytest.raises(DataError, match=r"symbols \['DOGEUSDT'\] outside"):
            moments_from_rows(frame.with_columns(symbols=pl.lit(["BTCUSDT", "DOGEUSDT", "SOLUSDT", "XRPUSDT"])), symbols=symbols)
        with pytest.raises(DataError, match="lists a symbol twice"):
            moments_from_rows(frame.with_columns(symbols=pl.lit(["BTCUSDT", "BTCUSDT", "SOLUSDT", "XRPUSDT"])))
        short = frame.with_columns(cov=pl.col("cov").list.head(15))
        with pytest.raises(DataError, match="cov holds 15 values for 4 symbols, expected 16"):
            moments_from_rows(short)
        with pytest.raises(DataError, match="status='ok' lacks mean values"):
            moments_from_rows(frame.with_columns(mean=pl.lit(None, pl.List(pl.Float64))))

    def test_shape_checks(self, moments):
        asofs, symbols, m = moments
        with pytest.raises(DataError, match="3 symbols for moments of shape"):
            moments_to_rows(asofs, symbols[:3], m, window_bars=48)
        with pytest.raises(DataError, match=r"Moments.cov has shape \(5, 4, 4\), expected \(5, 3, 3\)"):
            Moments(mean=m.mean[:, :3], cov=m.cov, downside=m.downside[:, :3], semicov=m.semicov, n_obs=m.n_obs, status=m.status)


# ----------------------------------------------------------------------------------------------
# Named estimators (rolling_estimates): scikit-learn, weighted numpy and by-hand references
# ----------------------------------------------------------------------------------------------

from sklearn.covariance import OAS, LedoitWolf  # noqa: E402

from perpfolio.estimators import ESTIMATORS, ewma_weights, gaussian_loglik, rolling_estimates, walk_forward_cv  # noqa: E402


def near_singular(rng, t: int = 200) -> np.ndarray:
    """5 symbols where symbol 4 = symbol 0 + 1e-9 noise: the sample covariance is nearly singular."""
    r = rng.normal(size=(t, 5)) * 0.01
    r[:, 4] = r[:, 0] + rng.normal(size=t) * 1e-9
    return r


class TestShrinkageAgainstSklearn:
    @pytest.mark.parametrize(("n", "window"), [(4, 48), (12, 8), (30, 20)])  # N > T in the last two
    def test_ledoit_wolf_and_oas_per_window(self, rng, n, window):
        r = rng.standard_t(4, size=(150, n)) * 0.01 + rng.normal(size=(150, 1)) * 0.01
        ends = np.arange(window - 1, 150, 9)
        est = rolling_estimates(r, ends, window=window, estimators=("ledoit_wolf", "oas"))
        for k, e in enumerate(ends):
            w = r[e - window + 1 : e + 1]
            np.testing.assert_allclose(est["ledoit_wolf"].cov[k], LedoitWolf().fit(w).covariance_, rtol=1e-10, atol=0)
            np.testing.assert_allclose(est["oas"].cov[k], OAS().fit(w).covariance_, rtol=1e-10, atol=0)

    def test_near_singular_window(self, rng):
        r = near_singular(rng)
        est = rolling_estimates(r, np.array([99, 199]), window=100, estimators=("ledoit_wolf", "oas"))
        for k, e in enumerate((99, 199)):
            w = r[e - 99 : e + 1]
            np.testing.assert_allclose(est["ledoit_wolf"].cov[k], LedoitWolf().fit(w).covariance_, rtol=1e-10, atol=0)
            np.testing.assert_allclose(est["oas"].cov[k], OAS().fit(w).covariance_, rtol=1e-10, atol=0)
            assert np.linalg.eigvalsh(est["ledoit_wolf"].cov[k]).min() > 0  # shrinkage makes it definite

    def test_one_symbol_is_the_ddof0_variance(self, rng):
        r = rng.normal(size=(50, 1))
        est = rolling_estimates(r, np.array([49]), window=50, estimators=("ledoit_wolf", "oas"))
        for name in ("ledoit_wolf", "oas"):
            np.testing.assert_allclose(est[name].cov[0], [[np.var(r[:, 0])]], rtol=1e-12)


class TestEwma:
    def test_weights_recursion_and_half_life(self):
        a = ewma_weights(10, 3.0)
        lam = 2 ** (-1 / 3)
        assert a.sum() == pytest.approx(1.0, abs=1e-15)
        np.testing.assert_allclose(a[:-1] / a[1:], lam, rtol=1e-13)  # one bar older: x lam
        assert a[-4] / a[-1] == pytest.approx(0.5, rel=1e-13)  # half_life bars older: half the weight
        # the recursion s_t = lam s_{t-1} + (1 - lam) x_t from s_0 = x_0, renormalized, gives the same mean
        x = np.arange(10.0) ** 2
        s, norm = x[0], 1.0
        for v in x[1:]:
            s, norm = lam * s + (1 - lam) * v, lam * norm + (1 - lam)
        # unroll: s = lam^9 x_0 + sum_{j>=1} (1-lam) lam^(9-j) x_j; the weights are proportional to a except x_0
        direct = (lam**9 * x[0] + (1 - lam) * sum(lam ** (9 - j) * x[j] for j in range(1, 10))) / norm
        assert s / norm == pytest.approx(direct, rel=1e-13)
        np.testing.assert_allclose(ewma_weights(7, np.inf), np.full(7, 1 / 7), rtol=1e-15)

    def test_against_weighted_numpy(self, returns):
        window, tau, hl = 60, 1e-4, 12.0
        ends = np.arange(window - 1, 300, 13)
        est = rolling_estimates(returns, ends, window=window, estimators=("ewma",), tau=tau, half_life=hl)["ewma"]
        a = ewma_weights(window, hl)
        for k, e in enumerate(ends):
            w = returns[e - window + 1 : e + 1]
            z = np.minimum(w - tau, 0.0)
            np.testing.assert_allclose(est.mean[k], np.average(w, axis=0, weights=a), rtol=1e-12)
            np.testing.assert_allclose(est.cov[k], np.cov(w, rowvar=False, aweights=a, ddof=1), rtol=1e-10, atol=1e-20)
            np.testing.assert_allclose(est.semicov[k], np.einsum("t,ti,tj->ij", a, z, z), rtol=1e-10, atol=1e-20)
            np.testing.assert_allclose(est.downside[k], a @ z**2, rtol=1e-12)

    def test_infinite_half_life_is_the_sample_estimator(self, returns):
        ends = np.array([100, 200])
        est = rolling_estimates(returns, ends, window=50, estimators=("ewma", "sample"), half_life=np.inf)
        for name in ("mean", "cov", "semicov"):
            np.testing.assert_allclose(getattr(est["ewma"], name), getattr(est["sample"], name), rtol=1e-10)


class TestFactorModel:
    def test_mean_factor_by_hand(self, returns):
        window, e = 80, 150
        est = rolling_estimates(returns, np.array([e]), window=window, estimators=("factor",), n_factors=1)["factor"]
        w = returns[e - window + 1 : e + 1]
        x = w - w.mean(axis=0)
        f = x.mean(axis=1)
        beta = np.array([np.polyfit(f, x[:, i], 1)[0] for i in range(4)])  # OLS slope (x and f centred)
        resid = x - np.outer(f, beta)
        s_e = np.cov(resid, rowvar=False, ddof=1)
        vals, vecs = np.linalg.eigh(s_e)
        top = vals[-1] * np.outer(vecs[:, -1], vecs[:, -1])
        expected = np.var(f, ddof=1) * np.outer(beta, beta) + top + np.diag(np.diag(s_e - top))
        np.testing.assert_allclose(est.cov[0], expected, rtol=1e-9, atol=1e-22)
        np.testing.assert_allclose(np.diag(est.cov[0]), np.var(w, axis=0, ddof=1), rtol=1e-9)  # variances kept

    def test_all_components_reproduce_the_sample_covariance(self, returns):
        ends = np.array([99, 250])
        est = rolling_estimates(returns, ends, window=60, estimators=("factor", "sample"), market_factor="pca", n_factors=3)
        np.testing.assert_allclose(est["factor"].cov, est["sample"].cov, rtol=1e-9, atol=1e-20)

    def test_pca_market_alone_is_first_component_plus_diagonal(self, returns):
        est = rolling_estimates(returns, np.array([99]), window=60, estimators=("factor",), market_factor="pca", n_factors=0)
        c = est["factor"].cov[0]
        s = np.cov(returns[40:100], rowvar=False, ddof=1)
        vals, vecs = np.linalg.eigh(s)
        first = vals[-1] * np.outer(vecs[:, -1], vecs[:, -1])
        off = ~np.eye(4, dtype=bool)
        np.testing.assert_allclose(c[off], first[off], rtol=1e-9)
        np.testing.assert_allclose(np.diag(c), np.diag(s), rtol=1e-9)


class TestShrunkMean:
    def test_by_hand(self, returns):
        window, e = 48, 120
        est = rolling_estimates(returns, np.array([e]), window=window, estimators=("shrinkage",))["shrinkage"]
        w = returns[e - window + 1 : e + 1]
        m, var = w.mean(axis=0), w.var(axis=0, ddof=1)
        mbar = m.mean()
        delta = min(1.0, 6.0 / (6.0 + window * np.sum((m - mbar) ** 2 / var)))
        np.testing.assert_allclose(est.mean[0], mbar + (1 - delta) * (m - mbar), rtol=1e-12)
        assert 0 < delta < 1
        np.testing.assert_allclose(est.mean[0].mean(), mbar, rtol=1e-12)  # shrinking keeps the cross-sectional mean
        np.testing.assert_allclose(est.cov[0], LedoitWolf().fit(w).covariance_, rtol=1e-10)


class TestEveryEstimator:
    @pytest.mark.parametrize(("n", "window"), [(4, 48), (12, 6), (5, 100)])
    def test_psd_symmetric_including_n_greater_than_t_and_near_singular(self, rng, n, window):
        r = near_singular(rng) if n == 5 else rng.standard_t(3, size=(160, n)) * 0.01
        est = rolling_estimates(r, np.arange(window - 1, r.shape[0], 5), window=window, n_factors=min(2, n - 1))
        assert set(est) == set(ESTIMATORS)
        for name, m in est.items():
            for mats in (m.cov, m.semicov):
                assert np.array_equal(mats, mats.transpose(0, 2, 1)), name
                eig = np.linalg.eigvalsh(mats)
                assert (eig.min(axis=1) >= -1e-12 * np.abs(mats).max(axis=(1, 2))).all(), name
            assert np.isfinite(m.mean).all() and np.isfinite(m.cov).all(), name

    def test_sample_equals_rolling_moments(self, returns):
        ends = np.arange(47, 300, 11)
        a = rolling_estimates(returns, ends, window=48, estimators=("sample",), tau=3e-4)["sample"]
        b = rolling_moments(returns, ends, window=48, tau=3e-4)
        for name in ("mean", "cov", "downside", "semicov", "n_obs", "status"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))

    def test_per_window_lengths_equal_separate_calls(self, returns):
        ends = np.array([80, 120, 160, 200, 240])
        windows = np.array([48, 20, 20, 30, 48])
        est = rolling_estimates(returns, ends, window=windows)
        for length in (20, 30, 48):
            rows = windows == length
            alone = rolling_estimates(returns, ends[rows], window=int(length))
            for name in ESTIMATORS:
                np.testing.assert_array_equal(est[name].cov[rows], alone[name].cov)
                np.testing.assert_array_equal(est[name].mean[rows], alone[name].mean)

    def test_bad_windows_are_nan_with_status(self, returns):
        r = returns[:60].copy()
        r[30, 2] = np.nan
        r[40:52, 1] = 0.001
        est = rolling_estimates(r, np.array([5, 19, 35, 51, 59]), window=12)
        for name, m in est.items():
            assert m.status.tolist() == ["insufficient_history", "ok", "missing_data", "degenerate", "ok"], name
            bad = m.status != "ok"
            for arr in (m.mean, m.cov, m.downside, m.semicov):
                assert np.isnan(arr[bad]).all() and np.isfinite(arr[~bad]).all(), name

    def test_no_look_ahead(self, returns, rng):
        ends = np.arange(47, 300, 10)
        base = rolling_estimates(returns, ends, window=48)
        k = 12
        future = returns.copy()
        future[ends[k] + 1 :] = rng.normal(size=future[ends[k] + 1 :].shape)
        moved = rolling_estimates(future, ends, window=48)
        for name in ESTIMATORS:
            for q in ("mean", "cov", "semicov"):
                np.testing.assert_array_equal(getattr(moved[name], q)[: k + 1], getattr(base[name], q)[: k + 1])
            assert not np.allclose(moved[name].cov[k + 1 :], base[name].cov[k + 1 :])

    def test_rows_round_trip_with_per_asof_windows(self, returns):
        ends = np.array([100, 150, 200])
        windows = np.array([48, 24, 36])
        m = annualize(rolling_estimates(returns, ends, window=windows, estimators=("ledoit_wolf",))["ledoit_wolf"], 8760.0)
        frame = moments_to_rows(hourly(300)[ends], ["A", "B", "C", "D"], m, estimator="ledoit_wolf_reset", window_bars=windows)
        assert frame.sort("as_of")["window_bars"].to_list() == [48, 24, 36]
        _, _, back = moments_from_rows(frame, estimator="ledoit_wolf_reset")
        np.testing.assert_array_equal(back.cov, m.cov)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"estimators": ("lw",)}, r"unknown \['lw'\]"),
            ({"window": np.array([10, 1])}, "window must be an integer >= 2"),
            ({"n_factors": 4}, r"n_factors must be an integer in \[0, N-1\]"),
            ({"market_factor": "first"}, "market_factor must be 'mean' or 'pca'"),
            ({"half_life": 0.0}, "half_life must be a number > 0"),
            ({"tau": np.inf}, "tau must be finite"),
        ],
    )
    def test_bad_parameters(self, returns, kwargs, match):
        args = {"window": 10} | kwargs
        with pytest.raises(ConfigError, match=match):
            rolling_estimates(returns, np.array([50, 60]), **args)


class TestWalkForwardCv:
    def test_loglik_against_scipy(self, rng):
        from scipy.stats import multivariate_normal

        mean = rng.normal(size=(3, 4)) * 0.01
        a = rng.normal(size=(3, 4, 4)) * 0.01
        cov = a @ a.transpose(0, 2, 1) + 1e-5 * np.eye(4)
        future = rng.normal(size=(3, 6, 4)) * 0.01
        ll = gaussian_loglik(mean, cov, future)
        for k in range(3):
            assert ll[k] == pytest.approx(multivariate_normal(mean[k], cov[k]).logpdf(future[k]).mean(), rel=1e-10)
        singular = cov.copy()
        singular[1] = np.outer(a[1, :, 0], a[1, :, 0])
        assert np.isnan(gaussian_loglik(mean, singular, future)[1]) and np.isfinite(gaussian_loglik(mean, singular, future)[[0, 2]]).all()

    def test_prefers_short_memory_after_a_volatility_shift(self, rng):
        """Vol triples for good at bar 1000: windows/half-lives that forget fast must score higher."""
        r = rng.normal(size=(1600, 3)) * 0.01
        r[1000:] *= 3
        ends = np.arange(1100, 1570, 24)
        cv = walk_forward_cv(r, ends, windows=(48, 720), half_lives=(12.0, 336.0), ewma_window=720, horizon=24)
        got = {(p, v): (s, c) for p, v, s, n, c in cv.iter_rows()}
        assert got[("window", 48.0)][0] > got[("window", 720.0)][0] and got[("window", 48.0)][1]
        assert got[("half_life", 12.0)][0] > got[("half_life", 336.0)][0] and got[("half_life", 12.0)][1]
        assert cv["n_scored"].unique().to_list() == [ends.size]

    def test_score_is_the_mean_loglik_of_the_next_bars(self, rng):
        r = rng.normal(size=(300, 2)) * 0.01
        ends = np.array([100, 200])
        cv = walk_forward_cv(r, ends, windows=(50,), half_lives=(), horizon=10)
        m = rolling_moments(r, ends, window=50)
        expected = gaussian_loglik(m.mean, m.cov, r[ends[:, None] + 1 + np.arange(10)]).mean()
        assert cv.row(0) == ("window", 50.0, pytest.approx(expected, rel=1e-12), 2, True)
