"""How sure is a backtest's verdict? Bootstrap intervals and Sharpe-ratio tests of the books.

Every statistic is computed on a book's simple per-bar returns ``r_t = E_t / E_{t-1} - 1`` of
backtest.equity (:func:`perpfolio.backtest.bar_returns`) by the ONE implementation that
backtest.metrics uses, :func:`perpfolio.backtest.return_statistics`: sharpe (annualized, rf = 0),
ann_return (geometric, annualized), max_drawdown and cvar_95 (POSITIVE losses; cvar per bar).

* Stationary block bootstrap (Politis & Romano 1994, :func:`stationary_bootstrap_indices`): a
  resample is T bars drawn in blocks of geometric length with mean ``block_bars`` that start at a
  uniform random bar and wrap around the end of the series, so it keeps the serial dependence
  (volatility clustering, funding regimes) within a block and is stationary. ``block_bars = 1`` is
  the i.i.d. bootstrap. Keep ``block_bars`` well below the number of bars: a resample of blocks as
  long as the series is little more than a rotation of it (same mean and std), and the intervals
  collapse onto the estimate.
* Percentile interval at ``level``: the (1 - level)/2 and (1 + level)/2 quantiles (numpy's linear
  interpolation) of the statistic over the resamples. Point estimates are the statistics of the
  observed series. A bootstrapped max drawdown is biased (shuffled blocks rarely rebuild the one
  long slide), so its interval need not contain the estimate: read it as the spread, not a test.
* Paired bootstrap of two books (:func:`bootstrap_intervals` ``pairs``): their series are aligned
  by bar ts and cut to the COMMON bars (books that start trading later have fewer), and the SAME
  resampled bar indices are applied to both, so the interval of ``stat(book) - stat(reference)``
  keeps their correlation (a hybrid and its baseline move together: the difference is far more
  precise than either alone). ``prob_better`` = share of resamples where the book is strictly
  better: a higher sharpe / ann_return, a lower max_drawdown / cvar_95. A difference within
  :data:`TIE_FRACTION` of the statistic's bootstrap spread (the standard deviation of the
  reference's resampled values) is a tie, not a win: two books that hold the same weights up to
  the optimizer's tolerance never beat each other by noise.
* Probabilistic and deflated Sharpe ratio (Bailey & Lopez de Prado 2012, 2014;
  :func:`probabilistic_sharpe`, :func:`expected_max_sharpe`, :func:`sharpe_tests`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import polars as pl
from scipy.special import ndtr, ndtri

from perpfolio.backtest import bar_returns, return_statistics
from perpfolio.errors import ConfigError, DataError
from perpfolio.optimize.config import StrategySpec

STATISTICS = ("sharpe", "ann_return", "max_drawdown", "cvar_95")
LOWER_IS_BETTER = frozenset({"max_drawdown", "cvar_95"})  # losses: the smaller, the better
LEVEL = 0.95
# prob_better counts a paired difference as a win only beyond this fraction of the statistic's
# bootstrap standard deviation: the optimizer solves to about 1e-7 relative, so books that hold the
# same weights differ by far less, while any real edge is many orders of magnitude larger
TIE_FRACTION = 1e-6
EQUAL_WEIGHT = "baseline:equal_weight"

BookReturns = Mapping[str, tuple[np.ndarray, np.ndarray]]  # {book: (bar ts datetime64[us], simple returns)}


def book_returns(equity: pl.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{book: (bar open ts, simple per-bar returns)} of backtest.equity rows (ts, strategy, equity,
    pnl), each book sorted by ts; the returns are :func:`perpfolio.backtest.bar_returns`."""
    missing = [c for c in ("ts", "strategy", "equity", "pnl") if c not in equity.columns]
    if missing:
        raise DataError(f"book_returns: equity frame lacks columns {missing}")
    out = {}
    for (book,), path in equity.sort("strategy", "ts").group_by("strategy", maintain_order=True):
        try:
            out[book] = (path["ts"].dt.replace_time_zone(None).to_numpy(), bar_returns(path))
        except DataError as exc:
            raise DataError(f"book {book!r}: {exc}") from exc
    return out


def stationary_bootstrap_indices(n_bars: int, *, block_bars: float, n_resamples: int, seed: int) -> np.ndarray:
    """n_resamples x n_bars bar indices of the stationary bootstrap (Politis & Romano 1994).

    Row b: ``I_0 ~ U{0..T-1}``; for t >= 1, with probability ``p = 1 / block_bars`` a new block
    starts, ``I_t ~ U{0..T-1}``, else ``I_t = (I_{t-1} + 1) mod T`` (the block runs on and wraps
    from the last bar to the first). Block lengths are geometric with mean ``block_bars`` (the last
    block of a row is cut at T). Drawn from ``numpy.random.default_rng(seed)``, all rows at once:
    the same (n_bars, block_bars, n_resamples, seed) give the same matrix.
    """
    if not (isinstance(n_bars, (int, np.integer)) and n_bars >= 1):
        raise DataError(f"stationary_bootstrap_indices: n_bars must be an integer >= 1, got {n_bars!r}")
    if not (np.isfinite(block_bars) and block_bars >= 1):
        raise ConfigError(f"stationary_bootstrap_indices: block_bars must be >= 1 (mean block length in bars), "
                          f"got {block_bars!r}")
    if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
        raise ConfigError(f"stationary_bootstrap_indices: n_resamples must be an integer >= 1, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    new = rng.random((n_resamples, n_bars)) < 1.0 / block_bars
    new[:, 0] = True
    bars = np.arange(n_bars, dtype=np.int64)
    # block k (row-major order) opens at bar t_k on start s_k: its bar t reads s_k + (t - t_k) mod T
    shift = rng.integers(0, n_bars, size=int(new.sum())) - np.broadcast_to(bars, new.shape)[new]
    block = np.cumsum(new.ravel()).reshape(new.shape) - 1
    out = shift[block] + bars
    out %= n_bars
    return out


def percentile_interval(samples: np.ndarray, *, level: float) -> tuple[float, float]:
    """(lower, upper): the (1 - level)/2 and (1 + level)/2 quantiles of ``samples`` (linear interpolation)."""
    lower, upper = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lower), float(upper)


def comparison_pairs(books: Sequence[str], *, hybrid_baselines: Mapping[str, str],
                     reference: str = EQUAL_WEIGHT) -> list[tuple[str, str]]:
    """The (book, reference) pairs the evaluation compares: every other book against ``reference``
    (when it is one of ``books``), then every hybrid against its baseline strategy
    (``hybrid_baselines`` = {hybrid: parameters.baseline}) where both are books; no pair twice."""
    pairs = [(b, reference) for b in books if reference in books and b != reference]
    pairs += [(h, base) for h, base in hybrid_baselines.items() if h in books and base in books]
    return list(dict.fromkeys(pairs))


def ablation_pairs(specs: Sequence[StrategySpec]) -> list[tuple[str, str]]:
    """The article's ablations among the strategies of a file, as (book, reference) pairs:

    * a book on the proxied VRP against the same strategy on real implied vol only (identical but
      for ``vrp_source``): does the BTC-scaled proxy add anything?
    * a hybrid against a hybrid of the same baseline with a larger overlay cap (an uncapped one is
      the overlay alone): does capping the overlay help?
    * a ``downside`` strategy against a ``min_variance`` one with the same constraints: does
      downside risk beat variance?
    """
    pairs = []
    for a in specs:
        for b in specs:
            if a.name == b.name:
                continue
            same_but_vrp = (a.vrp_source == "with_proxy" and b.vrp_source == "signal"
                            and replace(a, name=b.name, vrp_source=b.vrp_source) == b)
            capped = (a.objective == b.objective == "hybrid" and a.parameters.baseline == b.parameters.baseline
                      and a.parameters.overlay_cap < b.parameters.overlay_cap)
            downside = (a.objective == "downside" and b.objective == "min_variance" and a.constraints == b.constraints)
            if same_but_vrp or capped or downside:
                pairs.append((a.name, b.name))
    return pairs


def bootstrap_intervals(
    returns: BookReturns, *, pairs: Sequence[tuple[str, str]], periods_per_year: float, block_bars: int,
    n_resamples: int, seed: int, level: float = LEVEL,
) -> pl.DataFrame:
    """Percentile intervals of every book's :data:`STATISTICS`, and of their paired differences.

    One row per (strategy, reference, statistic):

    * reference null: the book alone over all its bars; estimate = the statistic of its series
      (equal to backtest.metrics), lower / upper its interval, prob_better null;
    * each (book, reference) of ``pairs``: over the bars both have (by ts), estimate =
      stat(book) - stat(reference), lower / upper the interval of the resampled differences (the
      same indices for both), prob_better the share of resamples where the book is strictly better.

    Resample indices depend only on (number of bars, block_bars, n_resamples, seed), so the same
    inputs always give the same table, and every book and pair of the same length shares them.
    Also: n_bars, from_ts / to_ts (first and last bar used), level, block_bars, n_resamples, seed.
    """
    if not 0 < level < 1:
        raise ConfigError(f"bootstrap_intervals: level must be in (0, 1), got {level!r}")
    if periods_per_year <= 0:
        raise ConfigError(f"bootstrap_intervals: periods_per_year must be > 0, got {periods_per_year!r}")
    _check_returns(returns)
    unknown = sorted({b for pair in pairs for b in pair} - set(returns))
    if unknown:
        raise DataError(f"bootstrap_intervals: pairs name {unknown}, which have no returns (books: {sorted(returns)})")
    indices: dict[int, np.ndarray] = {}
    scored: dict[tuple, tuple[dict, dict]] = {}

    def score(book: str, ts: np.ndarray) -> tuple[dict, dict]:
        """(point, resampled) statistics of the book's returns at bars ``ts``, each computed once."""
        key = (book, ts[0], ts[-1], len(ts))
        if key not in scored:
            own_ts, ret = returns[book]
            r = ret[np.searchsorted(own_ts, ts)]
            if len(ts) not in indices:
                indices[len(ts)] = stationary_bootstrap_indices(len(ts), block_bars=block_bars,
                                                                n_resamples=n_resamples, seed=seed)
            point = return_statistics(r, periods_per_year=periods_per_year)
            draws = return_statistics(r[indices[len(ts)]], periods_per_year=periods_per_year)
            bad = [s for s in STATISTICS if not np.isfinite(draws[s]).all()]
            if bad:
                raise DataError(f"bootstrap of {book!r}: {bad} undefined in some resamples (a constant resample: "
                                f"the book hardly moves over its {len(ts)} bars)")
            scored[key] = ({s: float(point[s]) for s in STATISTICS}, {s: draws[s] for s in STATISTICS})
        return scored[key]

    rows, spans = [], []
    for book, (ts, _) in returns.items():
        point, draws = score(book, ts)
        for s in STATISTICS:
            lower, upper = percentile_interval(draws[s], level=level)
            rows.append({"strategy": book, "reference": None, "statistic": s, "estimate": point[s], "lower": lower,
                         "upper": upper, "prob_better": None, "n_bars": len(ts)})
            spans.append((ts[0], ts[-1]))
    for book, reference in pairs:
        ts = np.intersect1d(returns[book][0], returns[reference][0])
        if len(ts) < 2:
            raise DataError(f"bootstrap_intervals: {book!r} and {reference!r} share {len(ts)} bar(s); a paired "
                            "comparison needs at least 2")
        (p_book, d_book), (p_ref, d_ref) = score(book, ts), score(reference, ts)
        for s in STATISTICS:
            diff = d_book[s] - d_ref[s]
            tie = TIE_FRACTION * float(np.std(d_ref[s]))
            better = diff < -tie if s in LOWER_IS_BETTER else diff > tie
            lower, upper = percentile_interval(diff, level=level)
            rows.append({"strategy": book, "reference": reference, "statistic": s, "estimate": p_book[s] - p_ref[s],
                         "lower": lower, "upper": upper, "prob_better": float(better.mean()), "n_bars": len(ts)})
            spans.append((ts[0], ts[-1]))
    first, last = (np.array(x, dtype="datetime64[us]") for x in zip(*spans))
    return pl.DataFrame(rows, schema_overrides={"reference": pl.String, "prob_better": pl.Float64}).with_columns(
        from_ts=pl.Series(first).dt.replace_time_zone("UTC"), to_ts=pl.Series(last).dt.replace_time_zone("UTC"),
        level=pl.lit(level), block_bars=pl.lit(block_bars), n_resamples=pl.lit(n_resamples), seed=pl.lit(seed))


def _check_returns(returns: BookReturns) -> None:
    """Every book: strictly increasing datetime64 bar ts, one finite return per bar, at least 2 bars."""
    if not returns:
        raise DataError("no book returns")
    for book, (ts, ret) in returns.items():
        if len(ts) != len(ret) or len(ret) < 2:
            raise DataError(f"book {book!r}: {len(ts)} bar ts for {len(ret)} returns; need equal counts, at least 2")
        if not np.all(ts[1:] > ts[:-1]):
            raise DataError(f"book {book!r}: bar ts must be strictly increasing")
        if not np.isfinite(ret).all():
            raise DataError(f"book {book!r}: returns contain NaN or inf")


def probabilistic_sharpe(sharpe: np.ndarray, *, benchmark: float | np.ndarray, n_bars: np.ndarray,
                         skew: np.ndarray, kurtosis: np.ndarray) -> np.ndarray:
    """Probabilistic Sharpe ratio (Bailey & Lopez de Prado 2012): the probability that the true
    Sharpe ratio exceeds ``benchmark`` SR*, given the observed SR over T bars,

        PSR(SR*) = Phi((SR - SR*) sqrt(T - 1) / sqrt(1 - g3 SR + (g4 - 1) / 4 SR^2))

    with SR and SR* PER BAR (not annualized), g3 the skewness and g4 the (non-excess, normal = 3)
    kurtosis of the bar returns. Vectorized over its inputs.
    """
    sr = np.asarray(sharpe, dtype=float)
    spread = np.sqrt(1.0 - np.asarray(skew) * sr + (np.asarray(kurtosis) - 1.0) / 4.0 * sr**2)
    return ndtr((sr - benchmark) * np.sqrt(np.asarray(n_bars, dtype=float) - 1.0) / spread)


def expected_max_sharpe(*, n_trials: int, variance: float) -> float:
    """SR0, the Sharpe ratio the best of N zero-skill trials is expected to show by luck alone
    (Bailey & Lopez de Prado 2014, from extreme-value theory), in the units of ``variance``'s SRs:

        SR0 = sqrt(V[SR_n]) ((1 - gamma) PhiInv(1 - 1/N) + gamma PhiInv(1 - 1/(N e)))

    with gamma the Euler-Mascheroni constant and V[SR_n] the variance of the N trials' Sharpe
    ratios. One trial selects nothing: SR0 = 0 for N = 1.
    """
    if not (isinstance(n_trials, (int, np.integer)) and n_trials >= 1):
        raise DataError(f"expected_max_sharpe: n_trials must be an integer >= 1, got {n_trials!r}")
    if not (np.isfinite(variance) and variance >= 0):
        raise DataError(f"expected_max_sharpe: variance must be finite and >= 0, got {variance!r}")
    if n_trials == 1:
        return 0.0
    g = np.euler_gamma
    return float(np.sqrt(variance) * ((1 - g) * ndtri(1 - 1 / n_trials) + g * ndtri(1 - 1 / (n_trials * np.e))))


def sharpe_tests(returns: BookReturns, *, periods_per_year: float) -> pl.DataFrame:
    """Per book: psr = PSR(0), the probability that its true Sharpe ratio is positive, and the
    deflated dsr = PSR(SR0), that it beats the best Sharpe ratio luck alone would have produced
    among ALL the books (N = len(returns) trials: every strategy and baseline of the run).

    SR_n = mean(r) / std(r, ddof=1) per bar (the annualized sharpe of backtest.metrics divided by
    sqrt(periods_per_year)); T = the book's bars; skewness m3 / m2^1.5 and kurtosis m4 / m2^2 from
    the central moments m_k = mean((r - mean r)^k) of its returns; V[SR_n] = their sample variance
    across the books (ddof = 1; 0 for a single book). Returns strategy, psr, dsr and dsr_benchmark =
    SR0 x sqrt(periods_per_year) (annualized, comparable to the sharpe column).
    """
    _check_returns(returns)
    books = list(returns)
    moments = []
    for book in books:
        r = returns[book][1]
        dev = r - r.mean()
        m2, m3, m4 = (np.mean(dev**k) for k in (2, 3, 4))
        if not m2 > 0:
            raise DataError(f"sharpe_tests: book {book!r} has constant returns; its Sharpe ratio is undefined")
        moments.append((float(return_statistics(r, periods_per_year=1.0)["sharpe"]), len(r), m3 / m2**1.5, m4 / m2**2))
    sr, n_bars, skew, kurt = (np.array(x, dtype=float) for x in zip(*moments))
    sr0 = expected_max_sharpe(n_trials=len(books), variance=float(sr.var(ddof=1)) if len(books) > 1 else 0.0)
    test = dict(n_bars=n_bars, skew=skew, kurtosis=kurt)
    return pl.DataFrame({
        "strategy": books,
        "psr": probabilistic_sharpe(sr, benchmark=0.0, **test),
        "dsr": probabilistic_sharpe(sr, benchmark=sr0, **test),
        "dsr_benchmark": np.full(len(books), sr0 * np.sqrt(periods_per_year)),
    })


def significance(
    returns: BookReturns, *, pairs: Sequence[tuple[str, str]], periods_per_year: float, block_bars: int,
    n_resamples: int, seed: int, level: float = LEVEL,
) -> pl.DataFrame:
    """The backtest.significance table: :func:`bootstrap_intervals` with the :func:`sharpe_tests`
    columns psr, dsr and dsr_benchmark on each book's own sharpe row (null on every other row)."""
    table = bootstrap_intervals(returns, pairs=pairs, periods_per_year=periods_per_year, block_bars=block_bars,
                                n_resamples=n_resamples, seed=seed, level=level)
    tests = sharpe_tests(returns, periods_per_year=periods_per_year).with_columns(
        reference=pl.lit(None, pl.String), statistic=pl.lit("sharpe"))
    return table.join(tests, on=["strategy", "reference", "statistic"], how="left", nulls_equal=True)


def verdict(table: pl.DataFrame, book: str, references: Sequence[str], *, statistic: str = "sharpe") -> list[str]:
    """One sentence per reference saying whether ``book`` beat it on ``statistic`` and how sure that
    is, from the paired rows of a :func:`significance` table: the difference, its interval, the
    share of resamples where the book was better, and "evidence" only when the interval excludes 0.
    References without a paired row are skipped."""
    lines = []
    for ref in references:
        rows = table.filter((pl.col("strategy") == book) & (pl.col("reference") == ref) & (pl.col("statistic") == statistic))
        if rows.is_empty():
            continue
        r = rows.row(0, named=True)
        better = r["estimate"] < 0 if statistic in LOWER_IS_BETTER else r["estimate"] > 0
        sure = r["lower"] > 0 or r["upper"] < 0
        lines.append(
            f"{book} vs {ref}: {statistic} difference {r['estimate']:+.3g} ({r['level']:.0%} interval "
            f"{r['lower']:+.3g} to {r['upper']:+.3g}), {book} {'ahead' if better else 'behind'} on the observed "
            f"{r['n_bars']} bars and better in {r['prob_better']:.0%} of {r['n_resamples']} resamples: "
            + ("the interval excludes 0, evidence of a difference." if sure else
               "the interval contains 0, no evidence of a difference."))
    return lines


def hybrid_verdicts(table: pl.DataFrame, specs: Sequence[StrategySpec]) -> list[str]:
    """The article's question for every hybrid strategy of ``specs``: :func:`verdict` sentences on its
    Sharpe against its baseline strategy and against equal weight."""
    return [line for s in specs if s.objective == "hybrid"
            for line in verdict(table, s.name, [s.parameters.baseline, EQUAL_WEIGHT])]
