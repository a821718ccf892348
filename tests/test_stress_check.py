"""Tests of perpfolio.stress_check (stress prediction vs what happened) and its assets: wick liquidations
that closes hide, shorts marked at highs, tiered margin and funding by hand, the holding-window alignment,
outages and delistings against a plain-loop reimplementation, the prediction from risk.stress, the
confusion counts, the plot, and the assets end to end over the synthetic market's planted crash."""

from datetime import UTC, date, datetime

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest

from assets.evaluation import STRESS, STRESS_CONFUSION, STRESS_VS_REALIZED
from perpfolio.errors import DataError
from perpfolio.report import plot_stress_vs_realized
from perpfolio.stress_check import confusion, predicted_verdicts, realized_outcomes
from perpfolio.tiers import Tier
from pipelines.definitions import build_definitions
from pipelines.run import materialize_range
from pipelines.resources import as_utc
from pipelines.settings import Settings

# two brackets, continuous (cum = 1e6 x (2% - 1%)): MM(n) = 1% n below 1M USDT, 2% n - 10,000 above
TIERS = (Tier(0.0, 1e6, 0.01, 50.0, 0.0), Tier(1e6, 1e9, 0.02, 20.0, 10_000.0))
T0 = np.datetime64("2025-01-01T00:00", "us")


def grid(n_bars: int) -> np.ndarray:
    return T0 + np.arange(n_bars) * np.timedelta64(1, "h")


def flat_market(n_bars: int, n_sym: int = 1, price: float = 100.0):
    """close = price every bar, high = low = close, no funding."""
    close = np.full((n_bars, n_sym), price)
    return close, close.copy(), close.copy(), np.zeros((n_bars, n_sym))


def run(close, high, low, funding, asofs, weights, *, leverage=10.0, symbols=("BTCUSDT",), modes=("cross",), **kw):
    frame, _ = realized_outcomes(grid(len(close)), close, high, low, funding, np.array(asofs), np.array(weights, float),
                                 symbols=list(symbols), leverages=[leverage], tiers=dict.fromkeys(symbols, TIERS),
                                 account_usdt=100_000.0, margin_modes=modes, **kw)
    return frame


def mm_by_hand(notional: float) -> float:
    for t in TIERS:
        if t.min_notional <= notional < t.max_notional:
            return notional * t.mmr - t.cum
    return notional * TIERS[-1].mmr - TIERS[-1].cum


class TestWicks:
    def test_an_intrabar_low_liquidates_a_levered_long_its_close_does_not(self):
        """10x long of 1M USDT at 100 (asof bar 1, entry at the close of bar 2): bar 4 dips to 90.5 and
        closes at 95. At the low: equity 100k - 1M x 9.5% = 5,000 <= MM(905k) = 9,050 (ratio 1.81).
        At the close: equity 50,000 > MM(950k) = 9,500: a close-only check sees nothing."""
        close, high, low, funding = flat_market(8)
        low[4], close[4:], high[4:], low[5:] = 90.5, 95.0, 95.0, 95.0
        row = run(close, high, low, funding, [1], [[1.0]]).row(0, named=True)
        assert row["realized_liquidated"] and not row["close_only_liquidated"]
        assert row["realized_liquidated_ts"] == row["realized_worst_ts"] == datetime(2025, 1, 1, 4, tzinfo=UTC)
        assert row["realized_worst_margin_ratio"] == pytest.approx(9_050 / 5_000)
        assert row["realized_worst_symbol"] == "BTCUSDT"
        assert row["realized_worst_move"] == row["realized_max_adverse_move"] == pytest.approx(0.095)
        assert row["realized_positions_liquidated"] == 1 and row["bars_held"] == 5

    def test_a_short_is_marked_at_the_highs_in_the_second_bracket(self):
        """10x short of 1M at 100: bar 3 spikes to 109.5 (a low of 50 would be a gain): equity 5,000,
        notional 1.095M in the 2% bracket, MM = 21,900 - 10,000 = 11,900 (ratio 2.38); the close of
        105 leaves 50,000 against MM(1.05M) = 11,000."""
        close, high, low, funding = flat_market(6)
        high[3], close[3], low[3] = 109.5, 105.0, 50.0
        row = run(close, high, low, funding, [1], [[-1.0]]).row(0, named=True)
        assert row["realized_liquidated"] and not row["close_only_liquidated"]
        assert row["realized_worst_margin_ratio"] == pytest.approx(11_900 / 5_000)
        assert row["realized_worst_move"] == pytest.approx(0.095)

    def test_below_the_margin_neither_liquidates(self):
        """The same dip at 3x (300k): equity 100k - 28.5k = 71.5k against MM(271.5k) = 2,715."""
        close, high, low, funding = flat_market(8)
        low[4] = 90.5
        row = run(close, high, low, funding, [1], [[1.0]], leverage=3.0).row(0, named=True)
        assert not row["realized_liquidated"] and row["realized_liquidated_ts"] is None
        assert row["realized_worst_margin_ratio"] == pytest.approx(2_715 / 71_500)

    def test_isolated_margin_liquidates_one_position_and_the_other_goes_on(self):
        """10x, half BTC long and half SOL long (500k each, margin 50k each). SOL's bar-3 low at 89:
        50k - 55k < 0 -> liquidated (no equity: ratio null); cross: 100k - 55k = 45k vs MM 4,450 + 5,000."""
        close, high, low, funding = flat_market(6, 2)
        low[3, 1] = 89.0
        frame = run(close, high, low, funding, [1], [[0.5, 0.5]], leverage=10.0, symbols=("BTCUSDT", "SOLUSDT"),
                    modes=("cross", "isolated"))
        cross, isolated = frame.row(0, named=True), frame.row(1, named=True)
        assert not cross["realized_liquidated"]
        assert cross["realized_worst_margin_ratio"] == pytest.approx((4_450 + 5_000) / 45_000)
        assert isolated["realized_liquidated"] and isolated["realized_positions_liquidated"] == 1
        assert isolated["realized_worst_margin_ratio"] is None and isolated["realized_worst_symbol"] == "SOLUSDT"


class TestFundingAndAlignment:
    def test_funding_is_paid_by_a_long_and_received_by_a_short(self):
        """Flat price, funding return -1% per bar (a +1% rate: longs pay). 10x (1M): after the 2 bars
        of the window a long has 100k - 20k = 80k against MM 10,000; a short's worst bar is the first,
        100k + 10k = 110k."""
        close, high, low, funding = flat_market(5)
        funding[:] = -0.01
        long = run(close, high, low, funding, [1], [[1.0]]).row(0, named=True)
        short = run(close, high, low, funding, [1], [[-1.0]]).row(0, named=True)
        assert long["bars_held"] == short["bars_held"] == 2  # bars 3 and 4
        assert long["realized_worst_margin_ratio"] == pytest.approx(10_000 / 80_000)
        assert long["realized_worst_ts"] == datetime(2025, 1, 1, 4, tzinfo=UTC)
        assert short["realized_worst_margin_ratio"] == pytest.approx(10_000 / 110_000)
        assert short["realized_worst_ts"] == datetime(2025, 1, 1, 3, tzinfo=UTC)

    def test_funding_is_charged_on_the_notional_at_the_bar_open(self):
        """Price 100 -> 200 at bar 3's close (no wick), -1% funding at bar 4: a 1x long of 100k (1,000
        units) pays 1% of 200k = 2,000; equity at bar 4 = 100k + 100k - 2k = 198k, MM = 1% x 200k."""
        close, high, low, funding = flat_market(5)
        close[3:], high[3:], low[3:] = 200.0, 200.0, 200.0
        low[3] = 100.0  # bar 3 opens at 100: its low is the old price
        funding[4] = -0.01
        row = run(close, high, low, funding, [1], [[1.0]], leverage=1.0).row(0, named=True)
        ratios = {3: 1_000 / 100_000, 4: 2_000 / 198_000}
        assert row["realized_worst_margin_ratio"] == pytest.approx(max(ratios.values()))
        assert row["realized_worst_ts"] == datetime(2025, 1, 1, 4, tzinfo=UTC)

    def test_the_window_runs_after_the_execution_bar_through_the_next_one(self):
        """Asofs at bars 1, 5 and 9 of 10: executions at 2 and 6 (9's would be bar 10: no row). Wicks to
        50 at the asof bar 1 and the execution bar 2 happen before the entry (close of 2) and do not
        count; the wick to 90 at bar 6 (the next execution bar) is the last bar of decision 0 and
        liquidates its 10x long, while decision 1 enters at bar 6's close and holds bars 7..9."""
        close, high, low, funding = flat_market(10)
        low[1], low[2], low[6] = 50.0, 50.0, 90.0
        frame = run(close, high, low, funding, [1, 5, 9], [[1.0], [1.0], [1.0]])
        assert frame["as_of"].to_list() == [datetime(2025, 1, 1, h, tzinfo=UTC) for h in (1, 5)]
        assert frame["bars_held"].to_list() == [4, 3]
        assert frame["realized_liquidated"].to_list() == [True, False]
        assert frame["realized_liquidated_ts"][0] == datetime(2025, 1, 1, 6, tzinfo=UTC)
        assert frame["realized_max_adverse_move"].to_list() == pytest.approx([0.10, 0.0])

    def test_a_funding_gap_where_a_held_symbol_has_a_bar_is_a_data_error(self):
        close, high, low, funding = flat_market(5)
        funding[3] = np.nan
        with pytest.raises(DataError, match="no funding return for BTCUSDT"):
            run(close, high, low, funding, [1], [[1.0]])


def path_by_hand(close, high, low, funding, asofs, weights, *, leverage, mode, delisted_after):
    """Plain loops over decisions, bars and positions (module docstring of perpfolio.stress_check):
    {asof: (liquidated, worst ratio or None, worst bar, first liquidation bar or None, max adverse move)}."""
    n_bars, n = close.shape
    acct = 100_000.0
    last = [max(t for t in range(n_bars) if np.isfinite(close[t, i])) for i in range(n)]
    delist = [last[i] if n_bars - 1 - last[i] >= delisted_after else n_bars for i in range(n)]

    def last_close(t, i):
        seen = [close[s, i] for s in range(t + 1) if np.isfinite(close[s, i])]
        return seen[-1] if seen else np.nan

    out = {}
    for k, a in enumerate(asofs):
        e = a + 1
        end = min(asofs[k + 1] + 1, n_bars - 1) if k + 1 < len(asofs) else n_bars - 1
        if end <= e:
            continue
        entry = [last_close(e, i) for i in range(n)]
        pos = [leverage * acct * weights[k][i] if abs(weights[k][i]) > 1e-6 and np.isfinite(entry[i]) and delist[i] > e
               else 0.0 for i in range(n)]
        gross = sum(abs(p) for p in pos)
        margin = [acct * abs(p) / gross if gross else 0.0 for p in pos]
        fund, dead = [0.0] * n, [False] * n
        worst, worst_bar, first_liq, liquidated, adverse = -1.0, None, None, False, -np.inf
        for t in range(e + 1, end + 1):
            gains, mms = [], []
            for i in range(n):
                if pos[i] == 0:
                    gains.append(0.0)
                    mms.append(0.0)
                    continue
                live = t <= delist[i]
                bar = np.isfinite(close[t, i])
                mark = (low[t, i] if pos[i] > 0 else high[t, i]) if bar else last_close(t, i)
                if bar and live:
                    fund[i] += pos[i] * last_close(t - 1, i) / entry[i] * funding[t, i]
                gains.append(pos[i] * (mark / entry[i] - 1) + fund[i])
                mms.append(mm_by_hand(abs(pos[i]) * mark / entry[i]) if live else 0.0)
                if live:
                    adverse = max(adverse, -np.sign(pos[i]) * (mark / entry[i] - 1))
            if mode == "cross":
                if liquidated:
                    continue
                equity = acct + sum(gains)
                ratio = sum(mms) / equity if equity > 0 else np.inf
                if equity <= sum(mms):
                    liquidated, first_liq = True, t
            else:
                ratio = 0.0
                for i in range(n):
                    if pos[i] == 0 or dead[i] or t > delist[i]:
                        continue
                    own = margin[i] + gains[i]
                    ratio = max(ratio, mms[i] / own if own > 0 else np.inf)
                    if own <= mms[i]:
                        dead[i], liquidated = True, True
                        first_liq = t if first_liq is None else first_liq
            if ratio > worst:
                worst, worst_bar = ratio, t
        out[a] = (liquidated, None if np.isinf(worst) else worst, worst_bar, first_liq,
                  None if np.isinf(adverse) else adverse)
    return out


class TestAgainstLoops:
    @pytest.fixture
    def market(self):
        """30 bars of BTC and SOL random walks with wicks; SOL has an outage (bars 12-13, held by decision
        1) and is delisted after bar 21 (8 bars before the end, delisted_after = 3: closed within decision
        2's window, never opened by decision 4); decision 3 is flat; funding of a few bp either way."""
        rng = np.random.default_rng(5)
        n_bars = 30
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.03, (n_bars, 2)), axis=0))
        high = close * np.exp(np.abs(rng.normal(0, 0.02, close.shape)))
        low = close * np.exp(-np.abs(rng.normal(0, 0.02, close.shape)))
        funding = rng.normal(0, 3e-4, close.shape)
        for a in (close, high, low, funding):
            a[[12, 13], 1] = np.nan
            a[22:, 1] = np.nan
        asofs = [2, 10, 18, 22, 26]
        weights = [[0.7, -0.5], [0.3, 0.8], [-0.4, 0.9], [0.0, 0.0], [0.5, 0.5]]
        return close, high, low, funding, asofs, weights

    @pytest.mark.parametrize("mode", ["cross", "isolated"])
    @pytest.mark.parametrize("leverage", [3.0, 9.0])
    def test_every_row_matches_a_plain_loop(self, market, mode, leverage):
        close, high, low, funding, asofs, weights = market
        frame = run(close, high, low, funding, asofs, weights, leverage=leverage, symbols=("BTCUSDT", "SOLUSDT"),
                    modes=(mode,), delisted_after=3)
        expected = path_by_hand(close, high, low, funding, asofs, weights, leverage=leverage, mode=mode,
                                delisted_after=3)
        assert len(frame) == len(expected) == 5
        as_ts = lambda t: None if t is None else datetime(2025, 1, 1, tzinfo=UTC) + (grid(30)[t] - T0).item()
        for row, (a, (liq, worst, worst_bar, first_liq, adverse)) in zip(frame.iter_rows(named=True), expected.items()):
            assert row["as_of"] == as_ts(a)
            assert row["realized_liquidated"] == liq
            assert row["realized_worst_ts"] == as_ts(worst_bar)
            assert row["realized_liquidated_ts"] == as_ts(first_liq)
            if worst is None:
                assert row["realized_worst_margin_ratio"] is None
            else:
                assert row["realized_worst_margin_ratio"] == pytest.approx(worst, rel=1e-12, abs=1e-15)
            if adverse is None:
                assert row["realized_max_adverse_move"] is None and row["realized_worst_symbol"] is None
            else:
                assert row["realized_max_adverse_move"] == pytest.approx(adverse, rel=1e-12)
        assert frame["realized_liquidated"].any() == (leverage == 9.0)  # the loop agrees on both sides of the line


def stress_rows(rows: list[tuple]) -> pl.DataFrame:
    t = datetime(2025, 1, 2, 23, tzinfo=UTC)
    return pl.DataFrame(rows, schema=["strategy", "scenario", "kind", "margin_ratio", "liquidated"], orient="row").with_columns(
        as_of=pl.lit(t), leverage=pl.lit(5.0), margin_mode=pl.lit("cross"))


class TestPrediction:
    def test_replays_are_left_out_and_a_wiped_out_scenario_is_the_worst(self):
        frame = stress_rows([
            ("a", "btc_-10pct_1h", "price", 0.4, False), ("a", "funding", "funding", 0.1, False),
            ("a", "replay:2025-01-02T05:00Z/PT1H", "replay", None, True),
            ("b", "btc_-10pct_1h", "price", None, True), ("b", "vol", "volatility", 2.0, True),
        ])
        out = predicted_verdicts(frame).sort("strategy")
        assert out["predicted_liquidated"].to_list() == [False, True]
        assert out["predicted_margin_ratio"].to_list() == [0.4, None]
        assert out["predicted_worst_scenario"].to_list() == ["btc_-10pct_1h", "btc_-10pct_1h"]


def outcome_rows() -> pl.DataFrame:
    """Six rebalances of one book: (predicted, realized) = TT, TT, TF, FT, FF, FF; the second TT was
    liquidated only at the wicks; ratios 2.0, wiped, 0.5, 1.2, 0.1, 0.05."""
    ts = [datetime(2025, 1, d, 5, tzinfo=UTC) for d in range(1, 7)]
    return pl.DataFrame({
        "as_of": [datetime(2025, 1, d, 0, tzinfo=UTC) for d in range(1, 7)], "strategy": ["x"] * 6,
        "leverage": [10.0] * 6, "margin_mode": ["cross"] * 6,
        "predicted_liquidated": [True, True, True, False, False, False],
        "realized_liquidated": [True, True, False, True, False, False],
        "close_only_liquidated": [True, False, False, True, False, False],
        "realized_worst_margin_ratio": [2.0, None, 0.5, 1.2, 0.1, 0.05],
        "realized_worst_ts": ts, "realized_worst_symbol": ["BTCUSDT", "SOLUSDT", "BTCUSDT", "ETHUSDT", "BTCUSDT", None],
    })


class TestConfusion:
    def test_counts_rates_and_worst_hours_by_hand(self):
        row = confusion(outcome_rows()).row(0, named=True)
        assert (row["rebalances"], row["true_alarms"], row["false_alarms"], row["missed"], row["true_calms"]) == (6, 2, 1, 1, 2)
        assert row["hit_rate"] == pytest.approx(2 / 3) and row["miss_rate"] == pytest.approx(1 / 3)
        assert row["false_alarm_rate"] == pytest.approx(1 / 3) and row["wick_only"] == 1
        assert row["worst_margin_ratio"] is None and row["worst_symbol"] == "SOLUSDT"
        assert row["worst_ts"] == datetime(2025, 1, 2, 5, tzinfo=UTC) and row["worst_as_of"] == datetime(2025, 1, 2, tzinfo=UTC)
        assert row["worst_hours"] == ("2025-01-02T05:00Z SOLUSDT wiped; 2025-01-01T05:00Z BTCUSDT 2.0; "
                                      "2025-01-04T05:00Z ETHUSDT 1.2")

    def test_rates_are_null_without_a_liquidation(self):
        row = confusion(outcome_rows().tail(2)).row(0, named=True)
        assert (row["true_alarms"], row["missed"], row["true_calms"]) == (0, 0, 2)
        assert row["hit_rate"] is None and row["miss_rate"] is None and row["false_alarm_rate"] == 0.0


def test_plot_is_a_png_and_needs_its_margin_mode():
    rows = outcome_rows().with_columns(predicted_margin_ratio=pl.Series([1.5, None, 1.1, 0.3, 0.2, 0.0]))
    assert plot_stress_vs_realized(rows).startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match="no rows with margin_mode 'isolated'"):
        plot_stress_vs_realized(rows, margin_mode="isolated")


@pytest.mark.slow
def test_assets_end_to_end_over_the_planted_crash(tmp_path):
    """The synthetic market crashes BTC by 11 % at 2025-03-13 14:00 (day 70 of a history from 2025-01-01),
    with wicks. Only days 70-72 are materialized (24-bar window: 03-11 is warm-up, 03-12 and 03-13 trade):
    the btc_only book's decision of 03-12 23:00 holds through the crash; at 10x it is liquidated there
    and at 1x it is not. Predictions equal risk.stress aggregated by hand, counts equal the rows'."""
    strategies = tmp_path / "strategies.toml"
    strategies.write_text('[[strategy]]\nname = "min_variance"\nobjective = "min_variance"\nsolver = "OSQP"\n'
                          "[strategy.constraints]\nbudget = 1.0\nmin_weight = 0.0\nmax_weight = 0.5\n")
    settings = Settings(start=date(2025, 1, 1), end=date(2025, 3, 13), window_bars=24, warehouse=tmp_path / "w.duckdb",
                        reports_dir=tmp_path / "reports", stress_leverages=(1.0, 10.0), baselines=("btc_only",),
                        strategies_file=strategies)
    defs = build_definitions(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(defs, date(2025, 3, 11), date(2025, 3, 13), instance, evaluate=False)
        job = defs.resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, asset_selection=[STRESS, STRESS_VS_REALIZED, STRESS_CONFUSION]).success
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        rows, counts, stress, candles = (as_utc(con.sql(f"SELECT * FROM {t}").pl()) for t in
                                         ("risk.stress_vs_realized", "risk.stress_confusion", "risk.stress", "raw.candles"))
    crash = datetime(2025, 3, 13, 14, tzinfo=UTC)
    btc = rows.filter((pl.col("strategy") == "baseline:btc_only") & (pl.col("as_of") == datetime(2025, 3, 12, 23, tzinfo=UTC)))
    assert btc.height == 4 and (btc["bars_held"] == 23).all()  # bars 03-13 01:00 .. 23:00 (the last bar loaded)
    at10 = btc.filter(pl.col("leverage") == 10.0)
    assert at10["realized_liquidated"].all() and (at10["realized_liquidated_ts"] == crash).all()
    assert not btc.filter(pl.col("leverage") == 1.0)["realized_liquidated"].any()
    # the worst adverse move, from the stored candles: 1 - min low over the window / entry close (03-13 00:00)
    bars = candles.filter(pl.col("symbol") == "BTCUSDT").sort("ts")
    entry = bars.filter(pl.col("ts") == datetime(2025, 3, 13, tzinfo=UTC))["close"].item()
    lows = bars.filter(pl.col("ts") > datetime(2025, 3, 13, tzinfo=UTC))["low"]
    assert at10["realized_max_adverse_move"].to_list() == pytest.approx([1 - lows.min() / entry] * 2, rel=1e-12)
    assert 1 - lows.min() / entry > 0.11  # the crash with its wick
    # the prediction, by hand from risk.stress
    keys = ["as_of", "strategy", "leverage", "margin_mode"]
    by_hand = stress.filter(pl.col("kind") != "replay").group_by(keys).agg(pl.col("liquidated").any().alias("expected"))
    joined = rows.join(by_hand, on=keys, how="left")
    assert joined.height == rows.height and (joined["expected"] == joined["predicted_liquidated"]).all()
    assert rows.select(keys).unique().height == stress.select(keys).unique().height - 8  # the last asof: no window
    # the confusion table counts the rows
    tally = rows.group_by(keys[1:]).agg(
        tt=(pl.col("predicted_liquidated") & pl.col("realized_liquidated")).sum(),
        ft=(~pl.col("predicted_liquidated") & pl.col("realized_liquidated")).sum(), n=pl.len())
    check = counts.join(tally, on=keys[1:])
    assert check.height == counts.height == 8
    assert (check["true_alarms"] == check["tt"]).all() and (check["missed"] == check["ft"]).all()
    assert (check["rebalances"] == check["n"]).all()
