"""perpfolio.signals regimes: hysteresis by hand, bounded memory, the synthetic market's planted
turbulent episodes, regime-reset windows, and build_signals agreeing with one long run."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest

from perpfolio import returns as returns_lib
from perpfolio.errors import ConfigError
from perpfolio.signals import build_signals, latest_breakpoint, regime_breakpoints, regime_states, reset_windows
from perpfolio.sources.synthetic import generate_market

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
START = datetime(2025, 1, 1, tzinfo=timezone.utc)


class TestHysteresis:
    def test_by_hand(self):
        # |r| constant per segment, both symbols equal sign -> m^2 = scale^2 exactly
        r = np.concatenate([np.full((40, 2), 0.01), np.full((4, 2), 0.03), np.full((12, 2), 0.01)])
        r[::2] *= -1
        turbulent, ratio = regime_states(r, short=2, long=20, enter=2.0, exit=1.2, memory=100)
        assert np.isnan(ratio[:19]).all() and ratio[19] == pytest.approx(1.0)
        # bar 40: short = mean(1e-4, 9e-4) = 5e-4, long = (19 x 1e-4 + 9e-4)/20 = 1.4e-4 -> ratio 1.89 < 2
        assert ratio[40] == pytest.approx(np.sqrt(5e-4 / 1.4e-4), rel=1e-12)
        # bar 41: short 9e-4, long (18 x 1e-4 + 2 x 9e-4)/20 = 1.8e-4 -> sqrt(5) = 2.24 >= 2
        assert ratio[41] == pytest.approx(np.sqrt(5.0), rel=1e-12)
        assert not turbulent[40] and turbulent[41]  # bar 41: short 9e-4 vs long 1.16e-4: enters
        # after the burst the ratio falls: short 1e-4 vs long (16e-4 + 36e-4)/20 -> 0.62 <= 1.2: calm again
        exit_bar = np.flatnonzero(ratio[44:] <= 1.2)[0] + 44
        assert turbulent[41:exit_bar].all() and not turbulent[exit_bar:].any()
        np.testing.assert_array_equal(regime_breakpoints(turbulent), [41, exit_bar])

    def test_between_thresholds_the_state_is_kept(self):
        r = np.concatenate([np.full((30, 1), 0.01), np.full((3, 1), 0.05), np.full((10, 1), 0.012)])
        r[::2] *= -1
        turbulent, ratio = regime_states(r, short=3, long=30, enter=2.0, exit=0.5, memory=100)
        middle = (ratio > 0.5) & (ratio < 2.0)
        first = np.flatnonzero(turbulent)[0]
        assert middle[first + 3 :].any() and turbulent[first:].all()  # never crossed exit: stays turbulent

    def test_bounded_memory_makes_truncated_history_agree(self, rng):
        r = rng.standard_t(4, size=(3000, 3)) * 0.01
        r[1500:1600] *= 4
        full, _ = regime_states(r, short=24, long=200, memory=200)
        cut = 900
        part, _ = regime_states(r[cut:], short=24, long=200, memory=200)
        settled = cut + 200 + 200  # long window plus memory after the cut
        np.testing.assert_array_equal(part[settled - cut :], full[settled:])

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [({"short": 30, "long": 20}, "shorter than long"), ({"enter": 1.0, "exit": 1.2}, "0 < exit < enter"), ({"memory": 0}, "memory")],
    )
    def test_bad_parameters(self, kwargs, match):
        with pytest.raises(ConfigError, match=match):
            regime_states(np.zeros((10, 1)), **kwargs)


class TestPlantedEpisodes:
    """Three seeds x one year of the synthetic market (three planted 8-day episodes each).

    Measured with the defaults (short 48, long 720, enter 2.0, exit 1.2): every episode detected
    9-37 bars after it starts (the ramp to full turbulence takes 36 bars; the crash bar is bar 38);
    1-3 false turbulent entries per seed-year in calm time (outside episode + 3 days), 0.7-2.5 % of
    calm bars flagged. The test bounds: detection <= 48 bars, <= 4 false entries, <= 4 % of calm bars.
    """

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_detection_delay_and_false_alarms(self, seed):
        market = generate_market(SYMBOLS, START, datetime(2026, 1, 1, tzinfo=timezone.utc), seed=seed)
        frame = returns_lib.net_returns(market.candles, market.funding, bar_hours=1, kind="simple")
        ts, _, matrix = returns_lib.returns_matrix(frame, column="net_return")
        turbulent, _ = regime_states(matrix)
        episodes = market.events.filter(pl.col("kind") == "turbulent")
        assert episodes.height == 3
        calm = np.ones(ts.size, dtype=bool)
        calm[:720] = False  # the long window is not full yet
        for start, end in episodes.select("start", "end").iter_rows():
            a = int(np.searchsorted(ts, np.datetime64(start.replace(tzinfo=None), "us")))
            b = int(np.searchsorted(ts, np.datetime64(end.replace(tzinfo=None), "us")))
            delay = np.flatnonzero(turbulent[a:b])
            assert delay.size and delay[0] <= 48, f"episode at {start} detected after {delay[:1]} bars"
            calm[a : b + 72] = False
        bps = regime_breakpoints(turbulent)
        false_entries = [b for b in bps if turbulent[b] and calm[b]]
        assert len(false_entries) <= 4
        assert turbulent[calm].mean() <= 0.04


class TestResetWindows:
    def test_by_hand(self):
        ends = np.array([100, 200, 250, 400, 2000])
        out = reset_windows(ends, np.array([190, 240]), window=720, reset_window=168)
        # 100: no breakpoint yet -> 720; 200: 11 bars since 190 -> 168; 250: 11 since 240 -> 168;
        # 400: 161 since 240 -> 168; 2000: 1761 since -> 720
        np.testing.assert_array_equal(out, [720, 168, 168, 168, 720])
        np.testing.assert_array_equal(reset_windows(np.array([500]), np.array([100]), window=720, reset_window=168), [401])
        np.testing.assert_array_equal(reset_windows(ends, np.array([], dtype=np.int64), window=720, reset_window=168), [720] * 5)
        with pytest.raises(ConfigError, match="reset_window"):
            reset_windows(ends, np.array([1]), window=100, reset_window=168)

    def test_latest_breakpoint_within_memory(self):
        # 5: none yet; 50 and 139: 40 is 10 and 99 bars back; 150: 110 bars back, beyond the memory
        np.testing.assert_array_equal(latest_breakpoint(np.array([5, 50, 139, 150]), np.array([10, 40]), memory=100), [-1, 40, 40, -1])
        np.testing.assert_array_equal(latest_breakpoint(np.array([141]), np.array([40]), memory=100), [-1])


class TestBuildSignals:
    def test_partitioned_history_equals_one_long_run(self):
        market = generate_market(SYMBOLS, START, datetime(2025, 4, 20, tzinfo=timezone.utc), seed=4)
        frame = returns_lib.net_returns(market.candles, market.funding, bar_hours=1, kind="simple")
        ts, found, net = returns_lib.returns_matrix(frame, column="net_return")
        _, _, funding = returns_lib.returns_matrix(frame, column="funding_return")
        params = dict(window=168, bar_hours=1, momentum_bars=168, ewma_half_life_bars=24.0, vrp_z_days=10,
                      regime_short_bars=24, regime_long_bars=240, regime_enter=2.0, regime_exit=1.2, funding_fit_days=15,
                      vrp_proxy=True)
        asofs = np.array(["2025-04-10T23:00", "2025-04-11T23:00"], dtype="datetime64[us]")
        full, meta = build_signals(ts, net, funding, asofs, found, market.implied_vol, **params)
        # history the asset would load: 7 days window + 16 days trailing grid, 20 days of regime
        cut = int(np.searchsorted(ts, np.datetime64("2025-03-10T00:00", "us")))
        part, _ = build_signals(ts[cut:], net[cut:], funding[cut:], asofs, found, market.implied_vol, **params)
        assert part.columns == full.columns and full.height == 6
        for column in full.columns:
            if full[column].dtype == pl.Float64:  # prefix sums over a different start: rounding only
                np.testing.assert_allclose(part[column].to_numpy(), full[column].to_numpy(), rtol=1e-9)
            else:
                assert part[column].to_list() == full[column].to_list(), column
        assert full["regime"].is_in(["calm", "turbulent"]).all()
        assert full.select(pl.col("funding_forecast_1h", "vrp_z", "momentum", "predicted_vol_ewma").null_count()).row(0) == (0, 0, 0, 0)
        np.testing.assert_allclose(
            full["funding_adj_vrp"].to_numpy(), full["vrp"].to_numpy() + 8760 * full["funding_forecast_1h"].to_numpy(), rtol=1e-12
        )
        assert meta["funding_forecast_n"] > 0 and meta["garch_failures"] == 0


class TestResetWindowsAgreeAcrossHistories:
    def test_loaded_history_of_two_long_windows_plus_a_window_is_enough(self, rng):
        """The estimates asset loads 2 x regime_long + window bars before each day: the reset
        windows it computes equal those of one run over the whole history."""
        r = rng.standard_t(4, size=(4000, 3)) * 0.01
        r[2600:2700] *= 4
        r[3300:3350] *= 5
        long, window = 200, 300
        ends = np.arange(2900, 4000, 24)

        def windows(cut: int) -> np.ndarray:
            turbulent, _ = regime_states(r[cut:], short=24, long=long, memory=long)
            return reset_windows(ends - cut, regime_breakpoints(turbulent), window=window, reset_window=48)

        full = windows(0)
        assert (full < window).any()  # the episodes do reset some windows
        np.testing.assert_array_equal(windows(int(ends[0]) - 2 * long - window), full)
