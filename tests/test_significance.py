"""Tests of perpfolio.significance (bootstrap intervals, paired differences, PSR / DSR) and of the
backtest.significance asset, against numpy written out by hand, scipy.stats and the worked example
of Bailey & Lopez de Prado, "The Deflated Sharpe Ratio" (2014)."""

import math
from dataclasses import replace
from statistics import NormalDist

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from scipy import stats

from assets import schemas
from assets.checks import check_frame
from assets.evaluation import EQUITY, SIGNIFICANCE
from perpfolio import report
from perpfolio.backtest import performance_metrics
from perpfolio.errors import ConfigError, DataError
from perpfolio.optimize import load_strategies
from perpfolio.significance import (book_returns, bootstrap_intervals, comparison_pairs, expected_max_sharpe,
                                    percentile_interval, probabilistic_sharpe, sharpe_tests, significance,
                                    stationary_bootstrap_indices, verdict, hybrid_verdicts)
from pipelines.definitions import build_definitions
from pipelines.run import materialize_range
from pipelines.resources import as_utc
from pipelines.settings import Settings

PPY = 8760.0


def hourly(n: int, start: int = 0) -> np.ndarray:
    return np.datetime64("2025-01-01T00", "us") + (start + np.arange(n)) * np.timedelta64(1, "h")


def by_hand(r: np.ndarray) -> dict[str, float]:
    """The four statistics of one series of simple bar returns, written out (as backtest.metrics defines them)."""
    wealth, peak, worst = 1.0, 1.0, 0.0
    for x in r:
        wealth *= 1 + x
        peak = max(peak, wealth)
        worst = max(worst, 1 - wealth / peak)
    return {"sharpe": r.mean() / r.std(ddof=1) * math.sqrt(PPY), "ann_return": wealth ** (PPY / len(r)) - 1,
            "max_drawdown": worst, "cvar_95": -np.sort(r)[: math.ceil(0.05 * len(r))].mean()}


def row(table: pl.DataFrame, book: str, statistic: str, reference: str | None = None) -> dict:
    ref = pl.col("reference").is_null() if reference is None else pl.col("reference") == reference
    rows = table.filter((pl.col("strategy") == book) & (pl.col("statistic") == statistic) & ref)
    assert rows.height == 1
    return rows.row(0, named=True)


class TestStationaryBootstrap:
    def test_blocks_run_on_and_wrap_around_the_end(self):
        idx = stationary_bootstrap_indices(10, block_bars=1000, n_resamples=50, seed=3)
        # a block longer than the series (p = 0.001): nearly every row is one block, read circularly
        follows = idx[:, 1:] == (idx[:, :-1] + 1) % 10
        assert follows.mean() > 0.98
        assert ((idx[:, :-1] == 9) & (idx[:, 1:] == 0)).sum() >= 40  # 9 -> 0: the wrap
        assert idx.min() == 0 and idx.max() == 9 and idx.shape == (50, 10)

    def test_block_lengths_are_geometric_with_the_mean_block_bars(self):
        n, t, block = 400, 2000, 20
        idx = stationary_bootstrap_indices(t, block_bars=block, n_resamples=n, seed=11)
        breaks = idx[:, 1:] != (idx[:, :-1] + 1) % t  # a new block whose start is not the next bar
        # P(break) = p (1 - 1/t): binomial sd over n (t - 1) bars, tolerance 4 sd
        p = 1 / block * (1 - 1 / t)
        assert abs(breaks.mean() - p) <= 4 * math.sqrt(p * (1 - p) / breaks.size)
        lengths = np.concatenate([np.diff(np.flatnonzero(b)) for b in breaks])  # complete blocks only
        # geometric mean 1/p, sd sqrt(1 - p)/p ~ 19.5 over ~38,000 blocks: sd of the mean ~ 0.1
        assert lengths.mean() == pytest.approx(block, abs=0.5)
        assert np.mean(lengths == 1) == pytest.approx(1 / block, abs=0.005)  # P(L = 1) = p

    def test_one_bar_blocks_are_the_iid_bootstrap(self):
        idx = stationary_bootstrap_indices(50, block_bars=1, n_resamples=2000, seed=5)
        follows = idx[:, 1:] == (idx[:, :-1] + 1) % 50
        assert follows.mean() == pytest.approx(1 / 50, abs=0.002)  # only by chance
        counts = np.bincount(idx.ravel(), minlength=50)
        assert stats.chisquare(counts).pvalue > 0.001  # uniform over the bars

    def test_the_seed_fixes_the_matrix(self):
        a = stationary_bootstrap_indices(300, block_bars=10, n_resamples=20, seed=7)
        assert np.array_equal(a, stationary_bootstrap_indices(300, block_bars=10, n_resamples=20, seed=7))
        assert not np.array_equal(a, stationary_bootstrap_indices(300, block_bars=10, n_resamples=20, seed=8))

    def test_rejects_a_block_shorter_than_a_bar(self):
        with pytest.raises(ConfigError, match="block_bars must be >= 1"):
            stationary_bootstrap_indices(10, block_bars=0.5, n_resamples=10, seed=0)


class TestIntervals:
    def test_own_rows_against_numpy_by_hand(self, rng):
        t, n, block = 300, 200, 12
        r = rng.normal(3e-4, 0.01, t)
        table = bootstrap_intervals({"a": (hourly(t), r)}, pairs=[], periods_per_year=PPY, block_bars=block,
                                    n_resamples=n, seed=4, level=0.9)
        idx = stationary_bootstrap_indices(t, block_bars=block, n_resamples=n, seed=4)
        resampled = [by_hand(r[i]) for i in idx]
        for s, point in by_hand(r).items():
            got = row(table, "a", s)
            draws = np.array([x[s] for x in resampled])
            assert got["estimate"] == pytest.approx(point, rel=1e-10), s
            assert (got["lower"], got["upper"]) == pytest.approx(tuple(np.quantile(draws, [0.05, 0.95])), rel=1e-10), s
            assert got["prob_better"] is None and got["n_bars"] == t and got["level"] == 0.9

    def test_estimates_are_those_of_performance_metrics(self, rng):
        n = 200
        eq = 2.0 * np.cumprod(1 + rng.normal(1e-4, 0.01, n))
        pnl = np.diff(np.concatenate([[2.0], eq]))
        zeros = np.zeros(n)
        frame = pl.DataFrame({"ts": hourly(n), "strategy": "a", "equity": eq, "pnl": pnl, "price_pnl": pnl,
                              "funding_pnl": zeros, "fees": zeros, "slippage": zeros, "turnover": zeros,
                              "gross_leverage": zeros + 1}).with_columns(pl.col("ts").dt.replace_time_zone("UTC"))
        table = bootstrap_intervals(book_returns(frame), pairs=[], periods_per_year=PPY, block_bars=5,
                                    n_resamples=100, seed=0)
        metrics = performance_metrics(frame.drop("strategy"), periods_per_year=PPY)
        for s in ("sharpe", "ann_return", "max_drawdown", "cvar_95"):
            assert row(table, "a", s)["estimate"] == pytest.approx(metrics[s], rel=1e-12), s
        assert row(table, "a", "sharpe")["from_ts"] == frame["ts"][0]

    def test_same_inputs_same_table_and_the_seed_moves_it(self, rng):
        books = {"a": (hourly(200), rng.normal(0, 0.01, 200)), "b": (hourly(200), rng.normal(0, 0.01, 200))}
        run = dict(pairs=[("a", "b")], periods_per_year=PPY, block_bars=10, n_resamples=200)
        first = significance(books, seed=1, **run)
        assert first.equals(significance(books, seed=1, **run))
        assert not first["lower"].equals(significance(books, seed=2, **run)["lower"])

    def test_sharpe_interval_covers_the_true_sharpe_95_percent_of_the_time(self):
        """400 i.i.d. normal series of 500 bars with a known Sharpe ratio (0.2 per bar), each resampled
        with its own seed (rows sharing one index matrix would not be independent trials). The coverage
        estimate has a binomial sd of sqrt(0.95 x 0.05 / 400) = 0.011: the tolerance is 3 sd = 0.033.
        The same for the paired difference of two independent series of equal Sharpe (it covers 0) over
        the first 200. Sharpe only (numpy), on the indices and percentile interval bootstrap_intervals uses."""
        rng = np.random.default_rng(2024)
        t, mu, sigma, m, n = 500, 0.002, 0.01, 400, 500
        true = mu / sigma * math.sqrt(PPY)

        def sharpe(x):
            return x.mean(axis=-1) / x.std(axis=-1, ddof=1) * math.sqrt(PPY)

        own, paired = [], []
        for k in range(m):
            x, y = rng.normal(mu, sigma, (2, t))
            idx = stationary_bootstrap_indices(t, block_bars=5, n_resamples=n, seed=k)
            lower, upper = percentile_interval(sharpe(x[idx]), level=0.95)
            own.append(lower <= true <= upper)
            if k < m // 2:
                lower, upper = percentile_interval(sharpe(x[idx]) - sharpe(y[idx]), level=0.95)
                paired.append(lower <= 0.0 <= upper)
        assert np.mean(own) == pytest.approx(0.95, abs=3 * math.sqrt(0.95 * 0.05 / m))
        assert np.mean(paired) == pytest.approx(0.95, abs=3 * math.sqrt(0.95 * 0.05 / (m // 2)))


class TestPaired:
    def test_differences_are_those_of_the_same_resamples(self, rng):
        t, n = 240, 300
        base = rng.normal(0, 0.01, t)
        a, b = base + rng.normal(2e-4, 0.002, t), base
        table = bootstrap_intervals({"a": (hourly(t), a), "b": (hourly(t), b)}, pairs=[("a", "b")],
                                    periods_per_year=PPY, block_bars=6, n_resamples=n, seed=9)
        idx = stationary_bootstrap_indices(t, block_bars=6, n_resamples=n, seed=9)
        resampled = [(by_hand(a[i]), by_hand(b[i])) for i in idx]
        for s in ("sharpe", "ann_return", "max_drawdown", "cvar_95"):
            diff = np.array([x[s] - y[s] for x, y in resampled])
            got = row(table, "a", s, reference="b")
            assert got["estimate"] == pytest.approx(by_hand(a)[s] - by_hand(b)[s], rel=1e-10, abs=1e-15)
            assert (got["lower"], got["upper"]) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])), rel=1e-10)
            tie = 1e-6 * np.std([y[s] for _, y in resampled])
            better = diff < -tie if s in ("max_drawdown", "cvar_95") else diff > tie
            assert got["prob_better"] == pytest.approx(better.mean(), abs=1e-12)
        # the pair moves together: the difference is far more precise than the book alone
        own, pair = row(table, "a", "sharpe"), row(table, "a", "sharpe", reference="b")
        assert pair["upper"] - pair["lower"] < 0.5 * (own["upper"] - own["lower"])

    def test_books_are_aligned_on_their_common_bars(self, rng):
        a, b = rng.normal(0, 0.01, 300), rng.normal(0, 0.01, 250)  # b starts trading 50 bars later
        table = bootstrap_intervals({"a": (hourly(300), a), "b": (hourly(250, start=50), b)}, pairs=[("a", "b")],
                                    periods_per_year=PPY, block_bars=10, n_resamples=100, seed=0)
        got = row(table, "a", "sharpe", reference="b")
        assert got["n_bars"] == 250 and got["from_ts"].replace(tzinfo=None) == hourly(1, start=50)[0].item()
        assert got["estimate"] == pytest.approx(by_hand(a[50:])["sharpe"] - by_hand(b)["sharpe"], rel=1e-10)
        assert row(table, "a", "sharpe")["n_bars"] == 300  # its own rows keep all its bars

    def test_a_book_that_halves_every_return_is_always_less_risky(self, rng):
        # log(1 + r/2) >= log(1 + r) / 2 on every bar: every losing stretch and tail loss is smaller
        r = rng.normal(0, 0.01, 200)
        table = bootstrap_intervals({"half": (hourly(200), r / 2), "full": (hourly(200), r)},
                                    pairs=[("half", "full")], periods_per_year=PPY, block_bars=8, n_resamples=200, seed=1)
        for s in ("max_drawdown", "cvar_95"):
            got = row(table, "half", s, reference="full")
            assert got["prob_better"] == 1.0 and got["upper"] < 0

    def test_books_equal_up_to_solver_noise_never_beat_each_other(self, rng):
        # the same weights solved twice differ by ~1e-10 per bar: a tie in every resample, not a coin flip
        r = rng.normal(0, 0.01, 200)
        noisy = r + rng.normal(0, 1e-12, 200)
        table = bootstrap_intervals({"a": (hourly(200), noisy), "b": (hourly(200), r)}, pairs=[("a", "b"), ("b", "a")],
                                    periods_per_year=PPY, block_bars=8, n_resamples=200, seed=1)
        assert table.filter(pl.col("reference").is_not_null())["prob_better"].to_list() == [0.0] * 8
        # a real edge of 1e-4 per bar is still a win in most resamples
        table = bootstrap_intervals({"a": (hourly(200), r + 1e-4), "b": (hourly(200), r)}, pairs=[("a", "b")],
                                    periods_per_year=PPY, block_bars=8, n_resamples=200, seed=1)
        assert row(table, "a", "sharpe", reference="b")["prob_better"] == 1.0

    def test_pairs_of_the_run(self):
        books = ["min_variance", "hybrid", "baseline:equal_weight", "baseline:static"]
        assert comparison_pairs(books, hybrid_baselines={"hybrid": "min_variance", "other": "min_variance"}) == [
            ("min_variance", "baseline:equal_weight"), ("hybrid", "baseline:equal_weight"),
            ("baseline:static", "baseline:equal_weight"), ("hybrid", "min_variance")]
        assert comparison_pairs(["hybrid", "min_variance"], hybrid_baselines={"hybrid": "min_variance"}) == [
            ("hybrid", "min_variance")]  # no equal-weight baseline configured

    def test_a_pair_must_name_books_with_returns(self, rng):
        with pytest.raises(DataError, match=r"pairs name \['nope'\]"):
            bootstrap_intervals({"a": (hourly(10), rng.normal(0, 0.01, 10))}, pairs=[("a", "nope")],
                                periods_per_year=PPY, block_bars=2, n_resamples=10, seed=0)


class TestSharpeTests:
    """Bailey & Lopez de Prado (2014), "A numerical example": N = 100 trials, V[SR_n] = 1/2 (annualized,
    250 observations a year), T = 1250, skewness -3, kurtosis 10, annualized SR 2.5. The paper gives
    SR0 ~ 0.1132 per observation and DSR ~ 0.9004; 0.9505 had there been N = 46 trials, and 0.9505 at
    N = 88 with normal returns (skewness 0, kurtosis 3)."""

    sr = 2.5 / math.sqrt(250)

    @pytest.mark.parametrize("trials, skew, kurtosis, dsr", [(100, -3, 10, 0.9004), (46, -3, 10, 0.9505),
                                                             (88, 0, 3, 0.9505)])
    def test_the_papers_worked_example(self, trials, skew, kurtosis, dsr):
        sr0 = expected_max_sharpe(n_trials=trials, variance=0.5 / 250)
        if trials == 100:
            assert sr0 == pytest.approx(0.1132, abs=5e-5)
        got = probabilistic_sharpe(self.sr, benchmark=sr0, n_bars=1250, skew=skew, kurtosis=kurtosis)
        assert got == pytest.approx(dsr, abs=5e-5)

    def test_every_book_against_a_direct_computation(self, rng):
        t = 500
        books = {f"b{k}": (hourly(t), rng.standard_t(5, t) * 0.01 + 4e-4 * k) for k in range(5)}
        table = sharpe_tests(books, periods_per_year=PPY)
        phi, inv = NormalDist().cdf, NormalDist().inv_cdf
        srs = {b: r.mean() / r.std(ddof=1) for b, (_, r) in books.items()}
        gamma, n = 0.5772156649015329, len(books)
        sr0 = math.sqrt(np.var(list(srs.values()), ddof=1)) * ((1 - gamma) * inv(1 - 1 / n)
                                                                + gamma * inv(1 - 1 / (n * math.e)))
        for b, (_, r) in books.items():
            g3, g4 = stats.skew(r), stats.kurtosis(r, fisher=False)
            spread = math.sqrt(1 - g3 * srs[b] + (g4 - 1) / 4 * srs[b] ** 2)
            got = table.filter(pl.col("strategy") == b).row(0, named=True)
            assert got["psr"] == pytest.approx(phi(srs[b] * math.sqrt(t - 1) / spread), rel=1e-9)
            assert got["dsr"] == pytest.approx(phi((srs[b] - sr0) * math.sqrt(t - 1) / spread), rel=1e-9)
            assert got["dsr_benchmark"] == pytest.approx(sr0 * math.sqrt(PPY), rel=1e-9)
            assert got["dsr"] < got["psr"]  # deflating by the search lowers the probability

    def test_a_single_book_is_not_deflated(self, rng):
        table = sharpe_tests({"only": (hourly(100), rng.normal(1e-3, 0.01, 100))}, periods_per_year=PPY)
        assert table["dsr"][0] == table["psr"][0] and table["dsr_benchmark"][0] == 0.0

    def test_the_table_carries_them_on_the_own_sharpe_rows_only(self, rng):
        books = {"a": (hourly(100), rng.normal(0, 0.01, 100)), "b": (hourly(100), rng.normal(0, 0.01, 100))}
        table = significance(books, pairs=[("a", "b")], periods_per_year=PPY, block_bars=5, n_resamples=100, seed=0)
        tested = table.filter(pl.col("psr").is_not_null())
        assert sorted(tested["strategy"]) == ["a", "b"] and set(tested["statistic"]) == {"sharpe"}
        assert tested["reference"].is_null().all()
        assert table.filter(pl.col("reference").is_not_null())["dsr"].is_null().all()


class TestSettingsAndPlot:
    def test_settings_read_and_validated(self):
        s = Settings.from_env({"PERPFOLIO_BOOTSTRAP_BLOCK_BARS": "24", "PERPFOLIO_BOOTSTRAP_RESAMPLES": "500",
                               "PERPFOLIO_BOOTSTRAP_SEED": "7"})
        assert (s.bootstrap_block_bars, s.bootstrap_resamples, s.bootstrap_seed) == (24, 500, 7)
        assert (Settings().bootstrap_block_bars, Settings().bootstrap_resamples, Settings().bootstrap_seed) == (168, 1000, 0)
        for name, value in (("BLOCK_BARS", "0"), ("RESAMPLES", "99"), ("SEED", "-1")):
            with pytest.raises(ConfigError, match=f"PERPFOLIO_BOOTSTRAP_{name} must be an integer"):
                Settings.from_env({f"PERPFOLIO_BOOTSTRAP_{name}": value})

    def test_forest_plot(self, rng):
        books = {b: (hourly(100), rng.normal(0, 0.01, 100)) for b in ("baseline:equal_weight", "x", "y")}
        table = significance(books, pairs=comparison_pairs(list(books), hybrid_baselines={}), periods_per_year=PPY,
                             block_bars=5, n_resamples=100, seed=0)
        for statistic in ("sharpe", "ann_return"):
            assert report.plot_significance(table, statistic=statistic).startswith(b"\x89PNG\r\n\x1a\n")
        with pytest.raises(DataError, match="no book has its own sharpe row"):
            report.plot_significance(table.filter(pl.col("reference").is_not_null()))


@pytest.mark.slow
def test_the_asset_through_the_pipeline(short_settings):
    """Six synthetic days (two of warm-up): the walk-forward, then backtest.equity and backtest.significance
    into the temporary warehouse; every book and pair is there, the estimates are backtest.metrics' own,
    and materializing again stores the same numbers."""
    settings = replace(short_settings, bootstrap_block_bars=12, bootstrap_resamples=200)
    defs = build_definitions(settings)
    tables = []
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_range(defs, settings.start, settings.end, instance, evaluate=False)
        for _ in range(2):
            result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance, asset_selection=[EQUITY, SIGNIFICANCE])
            assert result.success
            with duckdb.connect(str(settings.warehouse), read_only=True) as con:
                tables.append(as_utc(con.sql("SELECT * FROM backtest.significance").pl()))
                equity = as_utc(con.sql("SELECT * FROM backtest.equity").pl())
    table = tables[0]
    assert check_frame(schemas.conform(table, schemas.Significance), schemas.Significance, SIGNIFICANCE).passed
    assert table.sort("strategy", "reference", "statistic", nulls_last=True).equals(
        tables[1].sort("strategy", "reference", "statistic", nulls_last=True))
    books = sorted(equity["strategy"].unique())
    own = table.filter(pl.col("reference").is_null())
    assert sorted(own["strategy"].unique()) == books and own.height == 4 * len(books)
    pairs = set(table.filter(pl.col("reference").is_not_null()).select("strategy", "reference").unique().iter_rows())
    hybrids = {(s.name, s.parameters.baseline) for s in load_strategies(settings.strategies_file) if s.objective == "hybrid"}
    assert ("hybrid", "min_variance") in hybrids
    ablations = {("downside", "min_variance"), ("vrp_tilt_proxy", "vrp_tilt"), ("hybrid", "overlay")}
    assert pairs == {(b, "baseline:equal_weight") for b in books if b != "baseline:equal_weight"} | hybrids | ablations
    for (book,), path in equity.group_by("strategy"):
        metrics = performance_metrics(path.sort("ts"), periods_per_year=PPY)
        for s in ("sharpe", "ann_return", "max_drawdown", "cvar_95"):
            assert row(table, book, s)["estimate"] == pytest.approx(metrics[s], rel=1e-9, abs=1e-15), (book, s)
    assert (table["n_resamples"] == 200).all() and (table["block_bars"] == 12).all()


def test_verdict_sentences_state_the_difference_its_interval_and_the_share_of_wins():
    row = {"strategy": "hybrid", "statistic": "sharpe", "level": 0.95, "n_resamples": 1000, "n_bars": 3601}
    table = pl.DataFrame([
        {**row, "reference": "min_variance", "estimate": -0.49, "lower": -1.38, "upper": 0.23, "prob_better": 0.09},
        {**row, "reference": "baseline:equal_weight", "estimate": 0.8, "lower": 0.1, "upper": 1.5, "prob_better": 0.99},
        {**row, "reference": None, "estimate": 0.3, "lower": -1.0, "upper": 1.2, "prob_better": None},
    ])
    behind, ahead = verdict(table, "hybrid", ["min_variance", "baseline:equal_weight", "baseline:btc_only"])
    assert behind == ("hybrid vs min_variance: sharpe difference -0.49 (95% interval -1.38 to +0.23), hybrid behind on "
                      "the observed 3601 bars and better in 9% of 1000 resamples: the interval contains 0, no evidence "
                      "of a difference.")
    assert "hybrid ahead on the observed" in ahead and "better in 99%" in ahead and "evidence of a difference" in ahead
    assert "no evidence" not in ahead
    # every hybrid of the default file against its baseline and equal weight (overlay has no rows here: skipped)
    specs = load_strategies(Settings().strategies_file)
    assert hybrid_verdicts(table, specs) == [behind, ahead]
    # a lower drawdown is the better one
    drawdown = table.with_columns(statistic=pl.lit("max_drawdown"))
    assert "hybrid ahead on the observed" in verdict(drawdown, "hybrid", ["min_variance"], statistic="max_drawdown")[0]
