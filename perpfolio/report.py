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
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from perpfolio.errors import ConfigError, DataError

_SIZE = (9.0, 4.5)
_DPI = 100
_MAX_LEGEND = 20  # more series than this: no legend (it would cover the plot)


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


def plot_weights(weights: pl.DataFrame, strategy: str) -> bytes:
    """Stacked weights over asof for one strategy: longs stacked up from 0, shorts down from 0.

    Columns: asof, strategy, symbol, weight (fractions of equity).
    """
    _require(weights, ("as_of", "strategy", "symbol", "weight"), "plot_weights")
    part = weights.filter(pl.col("strategy") == strategy)
    if part.is_empty():
        raise DataError(f"plot_weights: no rows for strategy {strategy!r}")
    wide = part.pivot(on="symbol", index="as_of", values="weight").sort("as_of")
    symbols = [c for c in wide.columns if c != "as_of"]
    w = wide.select(symbols).to_numpy().astype(float)
    if np.isnan(w).any():
        raise DataError(f"plot_weights: strategy {strategy!r} has missing weights for some asof/symbol")
    fig, ax = _figure(f"Weights: {strategy}", "weight")
    asof = wide["as_of"].to_numpy()
    colors = [f"C{i % 10}" for i in range(len(symbols))]
    ax.stackplot(asof, np.clip(w, 0, None).T, labels=symbols, colors=colors, alpha=0.85)
    if (w < 0).any():
        ax.stackplot(asof, np.clip(w, None, 0).T, colors=colors, alpha=0.85)
    ax.axhline(0.0, color="black", lw=0.6)
    return _png(fig, ax)


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


def plot_liquidation(levels: pl.DataFrame, *, leverage: float) -> bytes:
    """Grouped bars: adverse move to liquidation (%) per strategy x symbol at one leverage, cross
    (solid) and isolated (hatched) margin; a position without a liquidation price shows no bar.

    Columns: strategy, symbol, leverage, margin_mode, distance (fraction, nullable).
    """
    _require(levels, ("strategy", "symbol", "leverage", "margin_mode", "distance"), "plot_liquidation")
    part = levels.filter(pl.col("leverage") == leverage)
    if part.is_empty():
        raise DataError(f"plot_liquidation: no rows at leverage {leverage}")
    strategies = sorted(part["strategy"].unique().to_list())
    symbols = sorted(part["symbol"].unique().to_list())
    fig, ax = _figure(f"Distance to liquidation of the latest weights at {leverage:g}x "
                      "(solid: cross, hatched: isolated)", "adverse move to liquidation (%)")
    slots = [(sym, mode) for sym in symbols for mode in ("cross", "isolated")]
    width = 0.8 / len(slots)
    x = np.arange(len(strategies))
    for k, (sym, mode) in enumerate(slots):
        cell = dict(part.filter((pl.col("symbol") == sym) & (pl.col("margin_mode") == mode))
                    .select("strategy", "distance").iter_rows())
        heights = [100.0 * cell[s] if cell.get(s) is not None else np.nan for s in strategies]
        ax.bar(x + k * width, heights, width, color=f"C{symbols.index(sym) % 10}",
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
                 tables: dict[str, pl.DataFrame] | None = None) -> Path:
    """Write ``out_dir/report.html`` (the ``tables`` by heading, then the metrics table, then every
    figure as a base64 PNG data URI) and each figure as ``out_dir/<name>.png``. Figure names:
    letters, digits, ``_`` and ``-``. Returns the HTML path.
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
        ax.legend(loc="best", fontsize="small", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
