"""Report figures (PNG bytes) and a self-contained offline HTML report.

Plots use matplotlib's object API (``Figure`` rendered by the Agg canvas): no pyplot global state,
no seaborn, no display needed. The HTML embeds every PNG as a base64 ``data:`` URI and references
nothing outside the file, so it opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from perpfolio.errors import ConfigError, DataError

_SIZE = (9.0, 4.5)
_DPI = 100
_MAX_LEGEND = 20  # more series than this: no legend (it would cover the plot)
_BANDS = 10  # symbol bands or bars of a figure: the largest symbols, then one "other" (ten colours)


def plot_equity(equity: pl.DataFrame) -> bytes:
    """Equity (equity units) over ts, one line per strategy. Columns: ts, strategy, equity."""
    _require(equity, ("ts", "strategy", "equity"), "plot_equity")
    fig, ax = _figure("Equity", "equity")
    for strategy, part in _by(equity, "strategy", "ts"):
        ax.plot(part["ts"].to_numpy(), part["equity"].to_numpy(), label=strategy, lw=1.2)
    return _png(fig, ax)


def plot_drawdown(equity: pl.DataFrame) -> bytes:
    """Drawdown (E / running max E - 1, in %) over ts per strategy. Columns: ts, strategy, drawdown."""
    _require(equity, ("ts", "strategy", "drawdown"), "plot_drawdown")
    fig, ax = _figure("Drawdown", "drawdown (%)")
    parts = list(_by(equity, "strategy", "ts"))
    for strategy, part in parts:
        ts, dd = part["ts"].to_numpy(), 100.0 * part["drawdown"].to_numpy()
        ax.plot(ts, dd, label=strategy, lw=1.0)
        if len(parts) <= 4:  # more overlapping fills only muddy the picture
            ax.fill_between(ts, dd, 0.0, alpha=0.15)
    return _png(fig, ax)


def stacked_bands(held: Sequence[str], w: np.ndarray, shown: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The bands of a stacked figure: one per symbol of ``shown`` that ``held`` has (in ``shown``
    order), then one "other" band summing the rest. ``w``: rows (asofs, books) x ``held`` values.
    Returns (labels, positives, negatives), each band's ``max(w, 0)`` and ``min(w, 0)`` parts
    (bands x rows): the other band sums its symbols' positive and negative parts apart, so the
    upward stack and the downward stack each keep their totals (a book's gross longs and shorts)."""
    index = {sym: i for i, sym in enumerate(held)}
    cols = [index[sym] for sym in shown if sym in index]
    rest = [i for i, sym in enumerate(held) if sym not in set(shown)]
    labels = [held[i] for i in cols] + (["other"] if rest else [])
    longs = [np.clip(w[:, i], 0, None) for i in cols] + ([np.clip(w[:, rest], 0, None).sum(axis=1)] if rest else [])
    shorts = [np.clip(w[:, i], None, 0) for i in cols] + ([np.clip(w[:, rest], None, 0).sum(axis=1)] if rest else [])
    return labels, np.array(longs).reshape(len(labels), -1), np.array(shorts).reshape(len(labels), -1)


def banded_symbols(ranked: Sequence[str]) -> list[str]:
    """The symbols that get a band of their own, sorted by name: all of them up to ``_BANDS``, else
    the first ``_BANDS - 1`` of ``ranked`` (largest first); the rest share the "other" band."""
    return sorted(ranked if len(ranked) <= _BANDS else ranked[: _BANDS - 1])


def band_colors(shown: Sequence[str]) -> dict[str, str]:
    """A colour per shown symbol and grey ("C7") for "other": the symbols skip the grey while there
    is an other band (at most ``_BANDS - 1`` shown)."""
    palette = [f"C{i}" for i in range(10) if i != 7] + ["C7"]
    return {sym: palette[i] for i, sym in enumerate(shown)} | {"other": "C7"}


def plot_weights(weights: pl.DataFrame, strategies: Sequence[str] | None = None) -> bytes:
    """Stacked weights over asof, one small panel per strategy (two columns, shared axes, one legend
    of symbols with the same colour in every panel): longs stacked up from 0, shorts down from 0.
    With more than ``_BANDS`` symbols, the ``_BANDS - 1`` largest by mean |weight|
    over all rows get a band each and the others one grey "other" band (`stacked_bands`).
    ``strategies``: which and in what order (default: every strategy of the frame, as they appear).

    Columns: as_of, strategy, symbol, weight (fractions of equity).
    """
    _require(weights, ("as_of", "strategy", "symbol", "weight"), "plot_weights")
    names = weights["strategy"].unique(maintain_order=True).to_list() if strategies is None else list(strategies)
    ranked = (weights.group_by("symbol").agg(size=pl.col("weight").abs().mean())
              .sort(["size", "symbol"], descending=[True, False])["symbol"].to_list())
    shown = banded_symbols(ranked)
    colors = band_colors(shown)
    panels = []
    for strategy in names:
        part = weights.filter(pl.col("strategy") == strategy)
        if part.is_empty():
            raise DataError(f"plot_weights: no rows for strategy {strategy!r}")
        wide = part.pivot(on="symbol", index="as_of", values="weight").sort("as_of")
        held = [c for c in wide.columns if c != "as_of"]
        w = wide.select(held).to_numpy().astype(float)
        if np.isnan(w).any():
            raise DataError(f"plot_weights: strategy {strategy!r} has missing weights for some asof/symbol")
        panels.append((strategy, wide["as_of"].to_numpy(), *stacked_bands(held, w, shown)))
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(_SIZE[0], max(_SIZE[1], 2.2 * rows + 0.9)), dpi=_DPI)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (strategy, asof, labels, longs, shorts) in zip(axes, panels):
        palette = [colors[label] for label in labels]
        ax.stackplot(asof, longs, colors=palette, alpha=0.85)
        if (shorts < 0).any():
            ax.stackplot(asof, shorts, colors=palette, alpha=0.85)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(strategy, fontsize="small")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    locator = AutoDateLocator()
    axes[0].xaxis.set_major_locator(locator)
    axes[0].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    fig.suptitle("Weights (fraction of equity)")
    others = len(ranked) - len(shown)
    handles = [Patch(color=colors[sym], label=sym) for sym in shown]
    fig.legend(handles=handles + ([Patch(color=colors["other"], label=f"other ({others} symbols)")] if others else []),
               loc="upper right", fontsize="small")
    fig.subplots_adjust(left=0.07, right=0.82, top=1 - 0.6 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        hspace=0.45, wspace=0.08)  # fixed margins: no layout pass over every panel's ticks
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def plot_vrp(signals: pl.DataFrame, *, regime_symbol: str | None = None) -> bytes:
    """Variance risk premium (annualized variance units) over asof per symbol; NaN leaves a gap.

    Columns: as_of, symbol, vrp; optional ``regime`` (any type): when present, the spans where the
    regime of ``regime_symbol`` (default: BTCUSDT if present, else the first symbol) differs from
    its most common value are shaded, one colour per regime value, and labelled in the legend.
    """
    _require(signals, ("as_of", "symbol", "vrp"), "plot_vrp")
    title = "Variance risk premium (implied - realized variance, annualized)"
    has_regime = "regime" in signals.columns
    fig, ax = _figure(title + (" and regimes" if has_regime else ""), "vrp")
    for symbol, part in _by(signals, "symbol", "as_of"):
        ax.plot(part["as_of"].to_numpy(), part["vrp"].fill_null(np.nan).to_numpy(), label=symbol, lw=1.0)
    if has_regime:
        symbols = signals["symbol"].unique().sort().to_list()
        ref = regime_symbol or ("BTCUSDT" if "BTCUSDT" in symbols else symbols[0])
        part = signals.filter(pl.col("symbol") == ref).sort("as_of").drop_nulls("regime")
        if part.height:
            _shade_regimes(ax, part["as_of"].to_numpy(), [str(v) for v in part["regime"].to_list()], ref)
    ax.axhline(0.0, color="black", lw=0.6)
    return _png(fig, ax)


def plot_funding(equity: pl.DataFrame) -> bytes:
    """Cumulative funding PnL (equity units; + received, - paid) over ts per strategy.

    Columns: ts, strategy, funding_pnl (per bar).
    """
    _require(equity, ("ts", "strategy", "funding_pnl"), "plot_funding")
    fig, ax = _figure("Cumulative funding PnL (+ received, - paid)", "funding PnL (equity units)")
    for strategy, part in _by(equity, "strategy", "ts"):
        ax.plot(part["ts"].to_numpy(), np.cumsum(part["funding_pnl"].to_numpy()), label=strategy, lw=1.0)
    ax.axhline(0.0, color="black", lw=0.6)
    return _png(fig, ax)


def nearest_to_liquidation(levels: pl.DataFrame, k: int) -> list[str]:
    """The ``k`` symbols with the smallest distance to liquidation in any row (ties by name; symbols
    without a liquidation price last), sorted by name."""
    ranked = levels.group_by("symbol").agg(pl.col("distance").min()).sort(["distance", "symbol"], nulls_last=True)
    return sorted(ranked["symbol"].head(k).to_list())


def plot_liquidation(levels: pl.DataFrame, *, leverage: float) -> bytes:
    """Grouped bars: adverse move to liquidation (%) per strategy x symbol at one leverage, cross
    (solid) and isolated (hatched) margin; a position without a liquidation price shows no bar.
    Of more than ``_BANDS`` symbols, the ``_BANDS`` nearest to liquidation (smallest distance in
    any book) are drawn, and the title says so (risk.liquidation holds them all).

    Columns: strategy, symbol, leverage, margin_mode, distance (fraction, nullable).
    """
    _require(levels, ("strategy", "symbol", "leverage", "margin_mode", "distance"), "plot_liquidation")
    part = levels.filter(pl.col("leverage") == leverage)
    if part.is_empty():
        raise DataError(f"plot_liquidation: no rows at leverage {leverage}")
    strategies = sorted(part["strategy"].unique().to_list())
    symbols = nearest_to_liquidation(part, _BANDS)
    total = part["symbol"].n_unique()
    more = f", the {len(symbols)} nearest of {total} symbols" if total > len(symbols) else ""
    fig, ax = _figure(f"Distance to liquidation at {leverage:g}x (solid: cross, hatched: isolated{more})",
                      "adverse move to liquidation (%)")
    slots = [(sym, mode) for sym in symbols for mode in ("cross", "isolated")]
    width = 0.8 / len(slots)
    x = np.arange(len(strategies))
    for k, (sym, mode) in enumerate(slots):
        cell = dict(part.filter((pl.col("symbol") == sym) & (pl.col("margin_mode") == mode))
                    .select("strategy", "distance").iter_rows())
        heights = [100.0 * cell[s] if cell.get(s) is not None else np.nan for s in strategies]
        ax.bar(x + k * width, heights, width, color=f"C{symbols.index(sym)}",
               hatch="//" if mode == "isolated" else None, label=sym if mode == "cross" else None)
    ax.set_xticks(x + 0.4 - width / 2, strategies, rotation=20, fontsize="small")
    return _png(fig, ax, dates=False)


def plot_frontier(vols: np.ndarray, rets: np.ndarray, points: dict[str, tuple[float, float]], *, as_of: str,
                  assets: dict[str, tuple[float, float]] | None = None, estimator: str = "sample") -> bytes:
    """Efficient frontier (annualized vol vs annualized expected return, %) with the books at
    ``points`` and the single assets at ``assets`` ({name: (vol, return)}, annualized decimals)
    placed on the same axes; ``estimator`` names the estimates in the title."""
    vols, rets = np.asarray(vols, dtype=float), np.asarray(rets, dtype=float)
    if vols.shape != rets.shape or vols.size < 2 or not (np.isfinite(vols).all() and np.isfinite(rets).all()):
        raise DataError(f"plot_frontier: need >= 2 finite (vol, return) points, got {vols.shape}, {rets.shape}")
    fig, ax = _figure(f"Efficient frontier at {as_of} ({estimator} estimates, annualized)", "expected return (%)")
    ax.plot(100 * vols, 100 * rets, "-o", color="black", ms=3, lw=1.2, label="frontier")
    for k, (name, (v, r)) in enumerate(sorted(points.items())):
        ax.scatter([100 * v], [100 * r], s=40, color=f"C{k % 10}", label=name, zorder=3, alpha=0.8)
    for name, (v, r) in sorted((assets or {}).items()):
        ax.scatter([100 * v], [100 * r], s=60, marker="x", color="grey", zorder=3)
        ax.annotate(name, (100 * v, 100 * r), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.set_xlabel("volatility (%)")
    return _png(fig, ax, dates=False)


def plot_stress(stress: pl.DataFrame, *, title: str = "Stress: worst equity after shock") -> bytes:
    """Grouped bars: WORST (minimum over rows, e.g. over asofs) equity after shock per strategy x scenario.

    Columns: strategy, scenario, equity_after_frac (post-shock equity / pre-shock equity).
    """
    _require(stress, ("strategy", "scenario", "equity_after_frac"), "plot_stress")
    worst = stress.group_by("strategy", "scenario").agg(pl.col("equity_after_frac").min())
    scenarios = sorted(worst["scenario"].unique().to_list())
    strategies = sorted(worst["strategy"].unique().to_list())
    fig, ax = _figure(title, "equity after / equity before")
    width = 0.8 / len(strategies)
    x = np.arange(len(scenarios))
    for k, strategy in enumerate(strategies):
        mine = dict(worst.filter(pl.col("strategy") == strategy).select("scenario", "equity_after_frac").iter_rows())
        ax.bar(x + k * width, [mine.get(s, np.nan) for s in scenarios], width, label=strategy)
    ax.set_xticks(x + 0.4 - width / 2, scenarios, rotation=15, fontsize="small")
    ax.axhline(1.0, color="black", lw=0.6)
    top = float(np.nanmax(worst["equity_after_frac"].to_numpy())) if worst.height else 1.0
    ax.set_ylim(min(0.0, float(np.nanmin(worst["equity_after_frac"].to_numpy()))), max(1.0, top) + 0.45)  # room for the legend
    return _png(fig, ax, dates=False)


def write_report(out_dir: Path, *, title: str, metrics: pl.DataFrame, figures: dict[str, bytes],
                 tables: dict[str, pl.DataFrame] | None = None, summary: Sequence[str] = ()) -> Path:
    """Write ``out_dir/report.html`` (the ``summary`` paragraphs, the ``tables`` by heading, then the
    metrics table, then every figure as a base64 PNG data URI) and each figure as
    ``out_dir/<name>.png``. Figure names: letters, digits, ``_`` and ``-``. Returns the HTML path.
    """
    for name, png in figures.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(f"write_report: figure name {name!r} must match [A-Za-z0-9_-]+")
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise DataError(f"write_report: figure {name!r} is not PNG data")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, png in figures.items():
        (out_dir / f"{name}.png").write_bytes(png)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        sections.append(f'<h2>{html.escape(name)}</h2>\n<img alt="{html.escape(name)}" src="{uri}">')
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}img{max-width:100%}</style>",
        "</head>", "<body>", f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(line)}</p>" for line in summary),
        *(f"<h2>{html.escape(name)}</h2>\n{_html_table(frame, 'table')}" for name, frame in (tables or {}).items()),
        "<h2>Metrics</h2>", _html_table(metrics), *sections, "</body>", "</html>", "",
    ])
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def markdown_image(png: bytes, alt: str = "plot") -> str:
    """A PNG as an inline markdown image (base64 data URI), e.g. for Dagster asset metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _html_table(frame: pl.DataFrame, css: str = "metrics") -> str:
    def cell(v) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f'<table class="{css}">\n<tr>{head}</tr>\n{body}\n</table>'


def _require(frame: pl.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: frame lacks columns {missing} (has {frame.columns})")
    if frame.is_empty():
        raise DataError(f"{where}: frame is empty")


def _by(frame: pl.DataFrame, key: str, order: str):
    for (value,), part in sorted(frame.partition_by(key, as_dict=True).items()):
        yield str(value), part.sort(order)


def _shade_regimes(ax, asof: np.ndarray, regimes: list[str], symbol: str) -> None:
    """Shade [asof_k, asof_{k+1}) wherever the regime differs from the most common one."""
    values, counts = np.unique(regimes, return_counts=True)
    usual = values[counts.argmax()]
    colors = {v: f"C{(k + 3) % 10}" for k, v in enumerate(v for v in values if v != usual)}
    step = asof[-1] - asof[-2] if len(asof) > 1 else np.timedelta64(1, "D")
    ends = np.append(asof[1:], asof[-1] + step)
    labelled = set()
    for start, end, value in zip(asof, ends, regimes):
        if value == usual:
            continue
        label = None if value in labelled else f"regime {value} ({symbol})"
        labelled.add(value)
        ax.axvspan(start, end, color=colors[value], alpha=0.15, lw=0, label=label)


def _figure(title: str, ylabel: str):
    fig = Figure(figsize=_SIZE, dpi=_DPI)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig: Figure, ax, *, dates: bool = True) -> bytes:
    if dates:
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    if 0 < len(ax.get_legend_handles_labels()[0]) <= _MAX_LEGEND:
        # outside the axes, top right: never over the data, and no "best" placement search (which cost
        # half of a figure's rendering with thousands of points per line)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})  # fast zlib: ~5 % larger files
    return buf.getvalue()


def plot_risk_model_bias(risk_model: pl.DataFrame, *, order: list[str] | None = None) -> bytes:
    """Bias statistic b = std(r / sigma) per covariance estimator, one marker per book (1 = the risk
    was predicted right, above = under-predicted), each estimator's 95 % bands (the widest of its
    books) shaded: dark the normal band, light the kurtosis-robust one; a filled marker passes both
    VaR conditional coverage tests at 5 %, a hollow one fails one. ``order``: estimators left to
    right (default: sorted).

    Columns: estimator, strategy, bias, bias_lower, bias_upper, bias_lower_robust,
    bias_upper_robust, var95_cc_p, var99_cc_p (as backtest.risk_model; a null bias is not drawn)."""
    columns = ("estimator", "strategy", "bias", "bias_lower", "bias_upper", "bias_lower_robust", "bias_upper_robust",
               "var95_cc_p", "var99_cc_p")
    _require(risk_model, columns, "plot_risk_model_bias")
    rows = risk_model.drop_nulls("bias")
    if rows.is_empty():
        raise DataError("plot_risk_model_bias: no row has a bias statistic")
    estimators = order or sorted(rows["estimator"].unique().to_list())
    rows = rows.filter(pl.col("estimator").is_in(estimators))
    books = sorted(rows["strategy"].unique().to_list())
    fig, ax = _figure("Risk-model bias (grey: 95 % normal / robust band; filled: VaR 95 and 99 % coverage pass)",
                      "bias statistic std(r / predicted vol)")
    for x, estimator in enumerate(estimators):
        mine = rows.filter(pl.col("estimator") == estimator)
        for low, high, alpha in (("bias_lower_robust", "bias_upper_robust", 0.15), ("bias_lower", "bias_upper", 0.3)):
            if mine.height and mine[low].min() is not None:
                ax.fill_between([x - 0.45, x + 0.45], mine[low].min(), mine[high].max(), color="grey", alpha=alpha, lw=0)
    width = 0.8 / len(books)
    for k, book in enumerate(books):
        mine = rows.filter(pl.col("strategy") == book)
        x = np.array([estimators.index(e) for e in mine["estimator"]]) + (k - (len(books) - 1) / 2) * width
        passed = ((mine["var95_cc_p"].fill_null(0.0) >= 0.05) & (mine["var99_cc_p"].fill_null(0.0) >= 0.05)).to_numpy()
        color = f"C{k % 10}"
        ax.scatter(x, mine["bias"].to_numpy(), s=30, zorder=3, label=book, edgecolors=color,
                   facecolors=[color if ok else "none" for ok in passed])
    values = np.concatenate([rows[c].cast(pl.Float64).to_numpy()
                             for c in ("bias", "bias_lower", "bias_upper", "bias_lower_robust", "bias_upper_robust")])
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.6 * (high - low))  # room for the legend above the markers
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xticks(np.arange(len(estimators)), estimators, rotation=20, fontsize="small")
    return _png(fig, ax, dates=False)


def plot_stress_vs_realized(rows: pl.DataFrame, *, margin_mode: str = "cross") -> bytes:
    """Predicted (worst stress scenario at the asof) vs realized (worst bar of the holding window)
    margin ratio, maintenance margin / equity, one dot per rebalance and book, coloured by leverage,
    log axes; the lines at 1 mark liquidation, so the four quadrants are (predicted, realized) =
    (F, F) bottom left, (T, F) bottom right, (F, T) top left (missed) and (T, T) top right, each
    labelled with its count. Ratios above 10 (an account all but wiped out) and null ones (no equity
    left) are drawn as triangles at 10; ratios below 1e-4 (a flat book) at 1e-4.

    Columns: margin_mode, leverage, predicted_margin_ratio, realized_worst_margin_ratio (nullable),
    predicted_liquidated, realized_liquidated (as risk.stress_vs_realized).
    """
    need = ("margin_mode", "leverage", "predicted_margin_ratio", "realized_worst_margin_ratio",
            "predicted_liquidated", "realized_liquidated")
    _require(rows, need, "plot_stress_vs_realized")
    part = rows.filter(pl.col("margin_mode") == margin_mode)
    if part.is_empty():
        raise DataError(f"plot_stress_vs_realized: no rows with margin_mode {margin_mode!r}")
    floor, cap = 1e-4, 10.0
    fig, ax = _figure(f"Stress prediction vs what happened ({margin_mode} margin; lines: liquidation)",
                      "realized worst margin ratio (holding window)")
    for k, (lev, group) in enumerate(sorted(part.partition_by("leverage", as_dict=True).items())):
        x, y = (np.clip(group[c].fill_null(np.inf).to_numpy(), floor, None)
                for c in ("predicted_margin_ratio", "realized_worst_margin_ratio"))
        beyond = (x > cap) | (y > cap)
        x, y = np.minimum(x, cap), np.minimum(y, cap)
        ax.scatter(x[~beyond], y[~beyond], s=12, alpha=0.6, color=f"C{k % 10}", label=f"{lev[0]:g}x")
        ax.scatter(x[beyond], y[beyond], s=30, marker="^", alpha=0.6, color=f"C{k % 10}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, cap * 3)
    ax.set_ylim(floor / 2, cap * 3)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axhline(1.0, color="black", lw=0.8)
    pred, real = part["predicted_liquidated"], part["realized_liquidated"]
    for p, r in ((False, False), (True, False), (False, True), (True, True)):
        count = int(((pred == p) & (real == r)).sum())
        ax.text(0.98 if p else 0.02, 0.98 if r else 0.02, f"predicted {'T' if p else 'F'}, realized {'T' if r else 'F'}: "
                f"{count}", transform=ax.transAxes, ha="right" if p else "left", va="top" if r else "bottom",
                fontsize="small", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    ax.set_xlabel("predicted margin ratio (worst stress scenario at the asof)")
    return _png(fig, ax, dates=False)


_SOURCES = {"ret_price": "price", "ret_funding": "funding", "ret_costs": "fees + slippage", "ret_interest": "interest"}


def plot_return_attribution(attribution: pl.DataFrame) -> bytes:
    """Per book, its total return (%) split by source: price, funding, fees + slippage and interest,
    stacked (gains up from 0, losses down), with the total as a black dot.

    Columns: strategy, ret_price, ret_funding, ret_costs, ret_interest (fractions of initial equity;
    rows per symbol are summed per book, as backtest.attribution stores them).
    """
    _require(attribution, ("strategy", *_SOURCES), "plot_return_attribution")
    per_book = attribution.group_by("strategy").agg(pl.col(*_SOURCES).sum()).sort("strategy")
    values = 100.0 * per_book.select(*_SOURCES).to_numpy()  # books x sources
    fig, ax = _figure("Return attribution by source (fractions of initial equity)", "return (%)")
    x = np.arange(per_book.height)
    up, down = np.zeros(len(x)), np.zeros(len(x))
    for k, label in enumerate(_SOURCES.values()):
        v = values[:, k]
        ax.bar(x, v, 0.6, bottom=np.where(v >= 0, up, down), color=f"C{k}", label=label)
        up, down = up + np.clip(v, 0, None), down + np.clip(v, None, 0)
    ax.scatter(x, values.sum(axis=1), color="black", zorder=3, s=25, label="total")
    ax.axhline(0.0, color="black", lw=0.6)
    span = max(up.max() - down.min(), 1e-9)
    ax.set_ylim(down.min() - 0.05 * span, up.max() + 0.35 * span)  # headroom for the legend
    ax.set_xticks(x, per_book["strategy"].to_list(), rotation=30, ha="right", fontsize="small")
    return _png(fig, ax, dates=False)


def plot_risk_contributions(contributions: pl.DataFrame) -> bytes:
    """Per book, each symbol's share of the book's variance (%) at the book's latest asof, stacked
    (a hedge, share < 0, below 0), with the book's predicted annualized vol in the label.

    Columns: as_of, strategy, symbol, share (fraction, nullable), book_vol (annualized).
    """
    _require(contributions, ("as_of", "strategy", "symbol", "share", "book_vol"), "plot_risk_contributions")
    latest = contributions.filter(pl.col("as_of") == pl.col("as_of").max().over("strategy"))
    wide = latest.pivot(on="symbol", index=["strategy", "as_of", "book_vol"], values="share").sort("strategy")
    symbols = sorted(latest["symbol"].unique().to_list())
    shares = 100.0 * wide.select(symbols).fill_null(0.0).to_numpy()  # books x symbols (null: a riskless book)
    shown = banded_symbols(sorted(symbols, key=lambda sym: (-np.abs(shares[:, symbols.index(sym)]).mean(), sym)))
    bands, positive, negative = stacked_bands(symbols, shares, shown)
    as_of = latest["as_of"].max().strftime("%Y-%m-%d")
    fig, ax = _figure(f"Risk contributions (Euler, share of variance) at each book's latest rebalance ({as_of})",
                      "share of variance (%)")
    x = np.arange(wide.height)
    up, down = np.zeros(len(x)), np.zeros(len(x))
    colors = band_colors(shown)
    for k, band in enumerate(bands):
        name = f"other ({len(symbols) - len(shown)} symbols)" if band == "other" else band
        ax.bar(x, positive[k], 0.6, bottom=up, color=colors[band], label=name)
        ax.bar(x, negative[k], 0.6, bottom=down, color=colors[band])
        up, down = up + positive[k], down + negative[k]
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_ylim(min(down.min(), 0.0) - 5.0, max(up.max(), 100.0) * 1.3)  # headroom for the legend
    labels = [f"{s} (σ {100 * v:.0f}%)" for s, v in wide.select("strategy", "book_vol").iter_rows()]
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize="small")
    return _png(fig, ax, dates=False)


_SIGNIFICANCE_UNITS = {"sharpe": ("Sharpe ratio (annualized)", 1.0), "ann_return": ("annual return (%)", 100.0),
                       "max_drawdown": ("max drawdown (%)", 100.0), "cvar_95": ("CVaR 95, per bar (%)", 100.0)}


def plot_significance(significance: pl.DataFrame, *, statistic: str = "sharpe",
                      reference: str = "baseline:equal_weight") -> bytes:
    """Forest plot of one statistic of backtest.significance. Left: every book's estimate (dot) and
    its percentile interval (line). Right, when the table has paired rows against ``reference``: the
    difference book - reference with its interval and the share of resamples where the book is better
    (solid: the interval excludes 0; hollow: it does not). Books sorted by their own estimate, the
    highest on top. sharpe unitless; ann_return, max_drawdown, cvar_95 in %.

    Columns: strategy, reference (null: the book's own row), statistic, estimate, lower, upper, level,
    prob_better.
    """
    _require(significance, ("strategy", "reference", "statistic", "estimate", "lower", "upper", "level",
                            "prob_better"), "plot_significance")
    if statistic not in _SIGNIFICANCE_UNITS:
        raise ConfigError(f"plot_significance: statistic must be one of {sorted(_SIGNIFICANCE_UNITS)}, got {statistic!r}")
    rows = significance.filter(pl.col("statistic") == statistic)
    own = rows.filter(pl.col("reference").is_null()).sort("estimate", "strategy")
    if own.is_empty():
        raise DataError(f"plot_significance: no book has its own {statistic} row")
    paired = rows.filter(pl.col("reference") == reference)
    label, scale = _SIGNIFICANCE_UNITS[statistic]
    fig = Figure(figsize=(_SIZE[0], max(_SIZE[1], 0.45 * own.height + 1.5)), dpi=_DPI)
    axes = fig.subplots(1, 2, sharey=True) if paired.height else [fig.add_subplot()]
    fig.suptitle(f"{label}: estimates and {own['level'][0]:.0%} stationary-bootstrap intervals")
    at = {book: k for k, book in enumerate(own["strategy"])}
    panels = [(axes[0], own, "each book")]
    if paired.height:
        panels.append((axes[1], paired, f"difference to {reference} (common bars)"))
    for ax, part, title in panels:
        y = np.array([at[b] for b in part["strategy"]], dtype=float)
        est, low, high = (scale * part[c].to_numpy() for c in ("estimate", "lower", "upper"))
        sure = (low > 0) | (high < 0) if ax is not axes[0] else np.ones(len(y), dtype=bool)
        ax.hlines(y, low, high, color="C0", lw=2.0)
        ax.scatter(est, y, s=36, zorder=3, edgecolors="C0", facecolors=np.where(sure, "C0", "white"))
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
        if ax is not axes[0]:
            ax.axvline(0.0, color="black", lw=0.8)
            ax.margins(x=0.25)  # room for the labels right of the intervals
            for yk, hk, p in zip(y, high, part["prob_better"].to_numpy()):
                ax.annotate(f"better {p:.0%}", (hk, yk), textcoords="offset points", xytext=(4, -3), fontsize="small")
    axes[0].set_yticks(np.arange(own.height), own["strategy"].to_list(), fontsize="small")
    return _png(fig, axes[0], dates=False)


def evidence_sections(
    significance: pl.DataFrame, risk_summary: pl.DataFrame, confusion: pl.DataFrame, break_even: pl.DataFrame,
    by_regime: pl.DataFrame, *, ablations: Sequence[tuple[str, str]],
) -> dict[str, pl.DataFrame]:
    """The report's evidence tables, by heading: the Sharpe of every book with its bootstrap interval,
    PSR and DSR; the article's ablations (paired differences of Sharpe, annual return, max drawdown
    and CVaR 95 with their intervals); which covariance estimator forecast risk best; how often the
    stress verdict matched the market (cross margin); the break-even cost against equal weight; and
    the Sharpe of every book in calm and in turbulent markets with the bars behind each. ``ablations``: the (book, reference)
    pairs of the ablation table (perpfolio.significance.ablation_pairs)."""
    sharpe = (significance.filter((pl.col("statistic") == "sharpe") & pl.col("reference").is_null())
              .sort("estimate", descending=True)
              .select("strategy", "estimate", "lower", "upper", "psr", "dsr", "n_bars"))
    wanted = pl.struct("strategy", "reference").is_in([{"strategy": a, "reference": b} for a, b in ablations])
    ablation_rows = (significance.filter(pl.col("reference").is_not_null() & wanted)
                     .select("strategy", "reference", "statistic", "estimate", "lower", "upper", "prob_better"))
    regimes = (by_regime.pivot(on="regime", index="strategy", values=["sharpe", "bars"]).sort("strategy")
               if by_regime.height else by_regime)
    return {
        "How sure: Sharpe with its 95 % bootstrap interval, PSR and DSR": sharpe,
        "The article's ablations (book minus reference, paired bootstrap)": ablation_rows,
        "Which covariance estimator forecast risk best": risk_summary,
        "Stress verdicts against what the market then did (cross margin)": confusion.filter(
            pl.col("margin_mode") == "cross").drop("margin_mode"),
        "Break-even cost against equal weight": break_even,
        "Sharpe in calm and in turbulent markets (and the bars of each)": regimes,
    }
