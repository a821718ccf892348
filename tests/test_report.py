"""Tests of perpfolio.report: PNGs decode and are not blank; the HTML is self-contained."""

import base64
import io
from datetime import datetime
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from perpfolio import report
from perpfolio.errors import ConfigError, DataError
from perpfolio.report import (
    nearest_to_liquidation,
    plot_drawdown,
    plot_equity,
    plot_frontier,
    plot_funding,
    plot_liquidation,
    plot_risk_contributions,
    plot_stress,
    plot_vrp,
    plot_weights,
    stacked_bands,
    write_report,
)

STRATEGIES = ["classical", "downside", "vrp", "hybrid"]
SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(3)
    ts = pl.datetime_range(pl.datetime(2025, 1, 1, time_zone="UTC"), pl.datetime(2025, 1, 31, time_zone="UTC"),
                           "1h", eager=True)
    asof = pl.datetime_range(pl.datetime(2025, 1, 1, 23, time_zone="UTC"), pl.datetime(2025, 1, 30, 23, time_zone="UTC"),
                             "1d", eager=True)
    equity, weights, signals, stress = [], [], [], []
    for s in STRATEGIES:
        eq = np.cumprod(1 + rng.normal(1e-4, 0.005, len(ts)))
        dd = eq / np.maximum.accumulate(eq) - 1
        equity.append(pl.DataFrame({"ts": ts, "strategy": s, "equity": eq, "drawdown": dd,
                                    "funding_pnl": rng.normal(-1e-5, 2e-5, len(ts))}))
        w = rng.dirichlet(np.ones(3), len(asof))
        for i, sym in enumerate(SYMBOLS):
            weights.append(pl.DataFrame({"as_of": asof, "strategy": s, "symbol": sym, "weight": w[:, i]}))
        for sc, loss in (("btc_-5pct_1h", 0.05), ("btc_-10pct_1h", 0.1), ("all_-10pct", 0.1)):
            stress.append(pl.DataFrame({"as_of": asof, "strategy": s, "scenario": sc,
                                        "equity_after_frac": 1 - loss * rng.uniform(1, 3, len(asof))}))
    for sym in SYMBOLS:
        vrp = rng.normal(0.05, 0.03, len(asof))
        vrp[5] = np.nan  # unknown implied variance: a gap
        signals.append(pl.DataFrame({"as_of": asof, "symbol": sym, "vrp": vrp}))
    return {"equity": pl.concat(equity), "weights": pl.concat(weights), "signals": pl.concat(signals),
            "stress": pl.concat(stress)}


@pytest.fixture(scope="module")
def figures(frames):
    short = frames["weights"].with_columns(
        pl.when(pl.col("symbol") == "SOLUSDT").then(-pl.col("weight")).otherwise(pl.col("weight")).alias("weight"))
    regimes = frames["signals"].with_columns(
        regime=pl.when(pl.col("as_of").dt.day().is_between(10, 15)).then(pl.lit("turbulent")).otherwise(pl.lit("calm")))
    levels = pl.DataFrame([{"strategy": s, "symbol": sym, "leverage": 5.0, "margin_mode": mode,
                            "distance": None if (s, sym) == ("vrp", "SOLUSDT") else 0.1 + 0.05 * k}
                           for s in STRATEGIES for k, sym in enumerate(SYMBOLS) for mode in ("cross", "isolated")])
    return {
        "funding": plot_funding(frames["equity"]),
        "vrp_regimes": plot_vrp(regimes),
        "liquidation": plot_liquidation(levels, leverage=5.0),
        "frontier": plot_frontier(np.linspace(0.4, 0.9, 10), np.linspace(0.1, 0.6, 10),
                                  {"classical": (0.5, 0.2), "hybrid": (0.7, 0.4)}, as_of="2025-01-30 23:00 UTC",
                                  assets={"BTCUSDT": (0.6, 0.3)}),
        "equity": plot_equity(frames["equity"]),
        "drawdown": plot_drawdown(frames["equity"]),
        "weights": plot_weights(frames["weights"]),
        "weights_hybrid": plot_weights(frames["weights"], ["hybrid"]),
        "weights_long_short": plot_weights(short, ["classical", "hybrid"]),
        "vrp": plot_vrp(frames["signals"]),
        "stress": plot_stress(frames["stress"]),
    }


class TestFigures:
    def test_pngs_decode_and_are_not_blank(self, figures):
        for name, png in figures.items():
            assert png[:8] == b"\x89PNG\r\n\x1a\n", name
            pixels = imread(io.BytesIO(png), format="png")
            assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600, name
            assert pixels[..., :3].std() > 0.05, name

    def test_missing_column_is_named(self, frames):
        with pytest.raises(DataError, match=r"plot_drawdown: frame lacks columns \['drawdown'\]"):
            plot_drawdown(frames["equity"].drop("drawdown"))

    def test_regime_shading_only_when_the_column_exists(self, frames, figures):
        plain = imread(io.BytesIO(figures["vrp"]), format="png")[..., :3]
        shaded = imread(io.BytesIO(figures["vrp_regimes"]), format="png")[..., :3]
        assert plain.shape == shaded.shape and np.abs(plain - shaded).mean() > 1e-3

    def test_frontier_rejects_a_single_point(self):
        with pytest.raises(DataError, match="need >= 2 finite"):
            plot_frontier(np.array([0.1]), np.array([0.2]), {}, as_of="x")

    def test_liquidation_unknown_leverage(self):
        levels = pl.DataFrame({"strategy": ["a"], "symbol": ["BTCUSDT"], "leverage": [1.0], "margin_mode": ["cross"],
                               "distance": [0.5]})
        with pytest.raises(DataError, match="no rows at leverage 3"):
            plot_liquidation(levels, leverage=3.0)

    def test_stacked_bands_keep_the_shown_symbols_and_sum_the_rest_by_side(self):
        held = ["A", "B", "C", "D"]
        w = np.array([[0.5, -0.2, 0.3, 0.4], [0.1, 0.2, -0.6, 0.3]])
        labels, longs, shorts = stacked_bands(held, w, ["B", "A"])
        assert labels == ["B", "A", "other"]
        np.testing.assert_allclose(longs, [[0.0, 0.2], [0.5, 0.1], [0.7, 0.3]])
        np.testing.assert_allclose(shorts, [[-0.2, 0.0], [0.0, 0.0], [0.0, -0.6]])
        np.testing.assert_allclose(longs.sum(axis=0) + shorts.sum(axis=0), w.sum(axis=1), atol=1e-15)  # the net book
        labels, longs, _ = stacked_bands(held, w, held)
        assert labels == held and longs.shape == (4, 2)  # nothing left over: no "other" band

    def test_a_hundred_symbols_draw_ten_bands(self, frames):
        """100 symbols: the figure still decodes and is not blank (9 bands + "other")."""
        base = frames["weights"]
        many = pl.concat([base.with_columns(symbol=pl.col("symbol") + f"_{k}", weight=pl.col("weight") / 34)
                          for k in range(34)])
        assert many["symbol"].n_unique() >= 100
        pixels = imread(io.BytesIO(plot_weights(many)), format="png")
        assert pixels[..., :3].std() > 0.05

    def test_many_symbols_liquidation_and_contributions_stay_readable(self):
        """30 symbols: the liquidation bars keep the 10 nearest to liquidation, and both figures draw."""
        symbols = [f"S{i:02d}" for i in range(30)]
        levels = pl.DataFrame([{"strategy": s, "symbol": sym, "leverage": 5.0, "margin_mode": mode,
                                "distance": None if i == 0 else 0.01 * ((i * 7) % 30 + 1) + (0.001 if s == "a" else 0.0)}
                               for s in ("a", "b") for i, sym in enumerate(symbols) for mode in ("cross", "isolated")])
        expected = sorted(symbols[i] for i in range(1, 30) if (i * 7) % 30 + 1 <= 11)  # i = 0 (value 1) has no price
        assert nearest_to_liquidation(levels, 10) == expected and len(expected) == 10
        assert nearest_to_liquidation(levels, 40) == sorted(symbols)  # the one without a price comes last
        contributions = pl.DataFrame([{"as_of": datetime(2025, 1, 30, 23), "strategy": s, "symbol": sym,
                                       "share": (1.0 if s == "a" else -0.5) / 30, "book_vol": 0.3}
                                      for s in ("a", "b") for sym in symbols])
        for png in (plot_liquidation(levels, leverage=5.0), plot_risk_contributions(contributions)):
            assert imread(io.BytesIO(png), format="png")[..., :3].std() > 0.05

    def test_unknown_strategy(self, frames):
        with pytest.raises(DataError, match="no rows for strategy 'nope'"):
            plot_weights(frames["weights"], ["hybrid", "nope"])


class TestWriteReport:
    @pytest.fixture
    def metrics(self):
        return pl.DataFrame({"strategy": STRATEGIES, "sharpe": [1.2345678, 0.5, -0.25, 2.0],
                             "max_drawdown": [0.1, 0.2, 0.3, 0.05]})

    def test_self_contained_html(self, tmp_path, figures, metrics):
        path = write_report(tmp_path / "out", title="Strategy <comparison>", metrics=metrics, figures=figures)
        assert path == tmp_path / "out" / "report.html"
        page = path.read_text(encoding="utf-8")
        for name, png in figures.items():
            assert f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}" in page
            assert (tmp_path / "out" / f"{name}.png").read_bytes() == png
        assert '<table class="metrics">' in page and "<td>1.235</td>" in page and "<th>max_drawdown</th>" in page
        assert all(f"<td>{s}</td>" in page for s in STRATEGIES)
        assert "Strategy &lt;comparison&gt;" in page
        outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
        assert "http" not in outside.lower() and "//" not in outside  # nothing fetched: opens offline
        assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * len(figures)
        assert page.count("<img ") == len(figures)

    def test_extra_tables_come_first(self, tmp_path, figures, metrics):
        comparison = pl.DataFrame({"strategy": ["hybrid"], "rank": [1]})
        page = write_report(tmp_path, title="t", metrics=metrics, figures={"vrp": figures["vrp"]},
                            tables={"Comparison": comparison}).read_text()
        assert page.index("<h2>Comparison</h2>") < page.index('<table class="table">') < page.index("<h2>Metrics</h2>")

    def test_bad_figure_name(self, tmp_path, figures, metrics):
        with pytest.raises(ConfigError, match="figure name '../x'"):
            write_report(tmp_path, title="t", metrics=metrics, figures={"../x": figures["vrp"]})


def find_chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class TestBrowser:
    """The HTML report rendered by headless Chromium (Debian's chromium; `make browser` installs it)."""

    def test_screenshot_is_not_blank(self, tmp_path, figures):
        browser = find_chromium()
        if browser is None:
            print("skipping: no chromium binary on PATH (run `make browser` as root to install Debian's chromium)")
            pytest.skip("no chromium binary on PATH (make browser installs it)")
        metrics = pl.DataFrame({"strategy": STRATEGIES, "sharpe": [1.0, 0.5, -0.2, 2.0]})
        page = write_report(tmp_path / "report", title="Browser check", metrics=metrics, figures=figures)
        shot = tmp_path / "shot.png"
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
               page.resolve().as_uri()]
        subprocess.run(cmd, check=True, timeout=60, capture_output=True)
        pixels = imread(str(shot), format="png")[..., :3]
        assert pixels.shape[:2] == (2000, 1200)
        assert pixels.std() > 0.05  # not a blank page: text, the table and the first plots are drawn
        white = (pixels > 0.98).all(axis=-1).mean()
        assert 0.2 < white < 0.99, white


def test_evidence_sections_show_the_regime_bars_and_only_cross_margin():
    by_regime = pl.DataFrame({"strategy": ["b", "b", "a", "a"], "regime": ["calm", "turbulent"] * 2,
                              "sharpe": [1.0, -2.0, 3.0, -4.0], "bars": [100, 5, 100, 5]})
    confusion = pl.DataFrame({"strategy": ["a", "a"], "leverage": [5.0, 5.0], "margin_mode": ["cross", "isolated"],
                              "missed": [1, 0]})
    significance = pl.DataFrame({"strategy": ["a"], "reference": [None], "statistic": ["sharpe"], "estimate": [0.5],
                                 "lower": [-1.0], "upper": [2.0], "psr": [0.6], "dsr": [0.4], "n_bars": [105],
                                 "prob_better": [None]}, schema_overrides={"reference": pl.String, "prob_better": pl.Float64})
    sections = report.evidence_sections(significance, pl.DataFrame({"rank": [1]}), confusion, pl.DataFrame({"x": [1]}),
                                        by_regime, ablations=[])
    regimes = sections["Sharpe in calm and in turbulent markets (and the bars of each)"]
    assert regimes.columns == ["strategy", "sharpe_calm", "sharpe_turbulent", "bars_calm", "bars_turbulent"]
    assert regimes.rows() == [("a", 3.0, -4.0, 100, 5), ("b", 1.0, -2.0, 100, 5)]
    stress = sections["Stress verdicts against what the market then did (cross margin)"]
    assert stress.rows() == [("a", 5.0, 1)] and "margin_mode" not in stress.columns
