"""Rolling sample moments of per-bar net returns: mean, covariance, downside risk, semicovariance.

Window ``k`` holds the ``window`` bars ending at (and including) row ``ends[k]``, the bar opened
at ``asof``: only data at or before ``asof`` is ever used. Inputs are per-bar returns (simple or
log, as ``perpfolio.returns.net_returns`` built them); outputs are per bar until ``annualize``
multiplies them by ``periods_per_year``, the one place where rescaling happens.

NaN policy. A NaN is a missing bar (not listed yet, delisted, a gap). A window that holds a NaN
in any symbol, starts before the first row, or has a constant symbol gets a status other than
"ok" and all-NaN arrays: never a partial estimate, never a zero-filled one.

All windows are computed at once: statuses from prefix counts over the whole matrix (exact
integer arithmetic), the statistics by gathering windows into a stack and batched matrix products
(two-pass, centred: robust for calm windows after volatile history), in chunks of ``_CHUNK``
windows so memory stays at ``_CHUNK * window * N`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import polars as pl

from perpfolio.errors import ConfigError, DataError

STATUSES = ("ok", "insufficient_history", "missing_data", "degenerate")
_STATUS_DTYPE = "<U20"
_CHUNK = 64
_VECTORS = ("mean", "downside")
_MATRICES = ("cov", "semicov")


@dataclass(frozen=True, repr=False)
class Moments:
    """Moments of K windows over N symbols; per-BAR units unless passed through ``annualize``.

    mean      K x N      sample mean of the window
    cov       K x N x N  sample covariance, divides by ``window - ddof`` (ddof=1 by default)
    downside  K x N      ``D_i = mean(min(0, r_i - tau)^2)``, divides by ``window``
    semicov   K x N x N  ``mean(min(0, r - tau) min(0, r - tau)^T)``, divides by ``window``; PSD
    n_obs     K ints     complete bars (every symbol finite) in the window; ``window`` when ok
    status    K str      "ok" | "insufficient_history" | "missing_data" | "degenerate";
                         non-"ok" windows hold NaN in every array and must not reach a solver.
    """

    mean: np.ndarray
    cov: np.ndarray
    downside: np.ndarray
    semicov: np.ndarray
    n_obs: np.ndarray
    status: np.ndarray

    def __post_init__(self) -> None:
        k, n = self.mean.shape
        shapes = {"cov": (k, n, n), "downside": (k, n), "semicov": (k, n, n), "n_obs": (k,), "status": (k,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise DataError(f"Moments.{name} has shape {getattr(self, name).shape}, expected {shape}")
        unknown = set(self.status.tolist()) - set(STATUSES)
        if unknown:
            raise DataError(f"Moments.status holds unknown values {sorted(unknown)}; expected {STATUSES}")

    def __repr__(self) -> str:
        k, n = self.mean.shape
        counts = dict(zip(*np.unique(self.status, return_counts=True)))
        return f"Moments(windows={k}, symbols={n}, status={ {str(s): int(c) for s, c in counts.items()} })"


def to_datetime64(values) -> np.ndarray:
    """UTC ``datetime64[us]`` array from datetime64 values, a polars Datetime series or Python
    datetimes (tz-aware ones are converted to UTC, naive ones are taken to be UTC)."""
    if isinstance(values, pl.Series):
        if not isinstance(values.dtype, pl.Datetime):
            raise DataError(f"timestamps must be Datetime, got a {values.dtype} series")
        utc = values.dt.convert_time_zone("UTC") if values.dtype.time_zone else values
        return utc.dt.cast_time_unit("us").to_numpy()
    array = np.asarray(values)
    if array.dtype.kind == "M":
        return array.astype("datetime64[us]")
    if array.dtype == object and all(isinstance(v, datetime) for v in array.ravel()):
        naive = [v.astimezone(timezone.utc).replace(tzinfo=None) if v.tzinfo else v for v in array.ravel()]
        return np.array(naive, dtype="datetime64[us]").reshape(array.shape)
    raise DataError(f"timestamps must be datetime64 or datetime values, got dtype {array.dtype}")


def window_ends(ts: np.ndarray, asofs: np.ndarray) -> np.ndarray:
    """Row index ``e`` with ``ts[e] == asof`` for every asof (``ts`` strictly increasing, UTC).

    Raises ``DataError`` naming the first asof that is not a bar of ``ts``.
    """
    ts = to_datetime64(ts)
    asofs = to_datetime64(asofs)
    if ts.size > 1 and np.any(np.diff(ts) <= np.timedelta64(0, "us")):
        row = int(np.flatnonzero(np.diff(ts) <= np.timedelta64(0, "us"))[0]) + 1
        raise DataError(f"window_ends: ts must be strictly increasing; row {row} ts={ts[row]} follows {ts[row - 1]}")
    idx = np.searchsorted(ts, asofs)
    found = idx < ts.size
    found[found] = ts[idx[found]] == asofs[found]
    if not found.all():
        raise DataError(f"window_ends: asof {asofs[~found][0]} is not a bar ts of the returns")
    return idx.astype(np.int64)


def rolling_moments(
    returns: np.ndarray, ends: np.ndarray, *, window: int, ddof: int = 1, tau: float = 0.0
) -> Moments:
    """Sample moments over the ``window`` bars ending at each row of ``ends``. Per-bar units.

    For window ``W_k = returns[ends[k] - window + 1 : ends[k] + 1]`` (T_w = ``window`` rows):
    ``mean = sum(r) / T_w``; ``cov = sum((r - mean)(r - mean)^T) / (T_w - ddof)``;
    ``z = min(0, r - tau)``, ``semicov = sum(z z^T) / T_w`` and ``downside = diag(semicov)``
    (``D_i = mean(min(0, r_i - tau)^2)``). ``tau`` is a per-bar return threshold.

    ``returns``: ``T x N`` per-bar returns, NaN = missing bar. ``ends[k] = -1`` means no bar at or
    before the asof. Status per window: "insufficient_history" if it would start before row 0,
    else "missing_data" if it holds a NaN, else "degenerate" if a symbol is constant in it, else
    "ok". Non-ok windows are all NaN.
    cov and semicov are symmetrized exactly; semicov is PSD by construction (also when N > T_w).
    """
    returns = _check_returns(returns)
    t, n = returns.shape
    ends = _check_ends(ends, t)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise ConfigError(f"window must be an integer >= 2, got {window!r}")
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or not 0 <= ddof < window:
        raise ConfigError(f"ddof must be an integer in [0, window), got {ddof!r}")
    if not np.isfinite(tau):
        raise ConfigError(f"tau must be finite, got {tau!r}")
    k = ends.size
    starts = ends - window + 1
    first = np.maximum(starts, 0)
    complete = np.concatenate([[0], np.cumsum(~np.isnan(returns).any(axis=1))])
    n_obs = complete[ends + 1] - complete[first]
    # changes[j, i]: how often symbol i's return differs from the row before, up to row j
    changes = np.concatenate([np.zeros((1, n), np.int64), np.cumsum(np.diff(returns, axis=0) != 0, axis=0)])
    constant = (changes[np.maximum(ends, 0)] == changes[first]).any(axis=1)
    status = np.full(k, "ok", dtype=_STATUS_DTYPE)
    status[constant] = "degenerate"
    status[n_obs < window] = "missing_data"
    status[starts < 0] = "insufficient_history"

    mean = np.full((k, n), np.nan)
    cov = np.full((k, n, n), np.nan)
    semicov = np.full((k, n, n), np.nan)
    todo = np.flatnonzero(status == "ok")
    for chunk in range(0, todo.size, _CHUNK):
        rows = todo[chunk : chunk + _CHUNK]
        w = returns[starts[rows, None] + np.arange(window)]  # (c, window, n)
        m = w.mean(axis=1)
        x = w - m[:, None, :]
        z = np.minimum(w - tau, 0.0)
        mean[rows] = m
        cov[rows] = _symmetric(x.transpose(0, 2, 1) @ x) / (window - ddof)
        semicov[rows] = _symmetric(z.transpose(0, 2, 1) @ z) / window
    downside = np.diagonal(semicov, axis1=1, axis2=2).copy()
    return Moments(mean=mean, cov=cov, downside=downside, semicov=semicov, n_obs=n_obs.astype(np.int64), status=status)


def annualize(moments: Moments, periods_per_year: float) -> Moments:
    """Per-bar moments to annual units: mean, cov, downside and semicov x ``periods_per_year``.

    (Variances scale linearly with time under i.i.d. bars; ``periods_per_year = 8760 / bar_hours``.)
    """
    if not np.isfinite(periods_per_year) or periods_per_year <= 0:
        raise ConfigError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    return Moments(
        mean=moments.mean * periods_per_year,
        cov=moments.cov * periods_per_year,
        downside=moments.downside * periods_per_year,
        semicov=moments.semicov * periods_per_year,
        n_obs=moments.n_obs.copy(),
        status=moments.status.copy(),
    )


def moments_to_long(
    asofs: np.ndarray, symbols: list[str], moments: Moments, *, estimator: str = "sample", window_bars: int
) -> pl.DataFrame:
    """Long ``features.estimates`` rows: asof, estimator, quantity, symbol, symbol_j, value,
    window_bars, n_obs, status.

    Per asof: quantity "mean" and "downside" (one row per symbol, symbol_j null), "cov" and
    "semicov" (all N*N pairs). ``value`` is in the units of ``moments`` (annualized when it went
    through ``annualize``) and null on every row of an asof whose status is not "ok".
    """
    asofs = to_datetime64(asofs)
    k, n = moments.mean.shape
    if asofs.shape != (k,) or len(symbols) != n:
        raise DataError(
            f"moments_to_long: {asofs.shape[0]} asofs / {len(symbols)} symbols for moments of shape {(k, n)}"
        )
    sym = np.array(symbols, dtype=object)
    template = pl.DataFrame(
        {
            "quantity": ["mean"] * n + ["downside"] * n + ["cov"] * n * n + ["semicov"] * n * n,
            "symbol": np.concatenate([sym, sym, np.repeat(sym, n), np.repeat(sym, n)]).tolist(),
            "symbol_j": [None] * (2 * n) + np.tile(sym, 2 * n).tolist(),
        },
        schema={"quantity": pl.String, "symbol": pl.String, "symbol_j": pl.String},
    )
    per_asof = template.height
    values = np.concatenate(
        [moments.mean, moments.downside, moments.cov.reshape(k, n * n), moments.semicov.reshape(k, n * n)], axis=1
    )
    frame = template.select(pl.all().gather(np.tile(np.arange(per_asof), k))).with_columns(
        as_of=pl.Series(np.repeat(asofs, per_asof)).dt.replace_time_zone("UTC"),
        estimator=pl.lit(estimator, dtype=pl.String),
        value=pl.Series(values.ravel(), dtype=pl.Float64),
        window_bars=pl.lit(window_bars, dtype=pl.Int64),
        n_obs=pl.Series(np.repeat(moments.n_obs, per_asof), dtype=pl.Int64),
        status=pl.Series(np.repeat(moments.status, per_asof).tolist(), dtype=pl.String),
    )
    return frame.with_columns(value=pl.when(pl.col("status") == "ok").then(pl.col("value"))).select(
        "as_of", "estimator", "quantity", "symbol", "symbol_j", "value", "window_bars", "n_obs", "status"
    )


def moments_from_long(frame: pl.DataFrame, *, estimator: str = "sample") -> tuple[np.ndarray, list[str], Moments]:
    """Inverse of ``moments_to_long`` for one estimator: ``(asofs, symbols, Moments)``.

    ``asofs`` sorted (``datetime64[us]``), ``symbols`` sorted; values are returned bit for bit,
    null -> NaN. Raises ``DataError`` on a missing or duplicate cell, an unknown quantity or
    symbol_j, a status / n_obs that differs within an asof, or a null value on an "ok" asof.
    """
    rows = frame.filter(pl.col("estimator") == estimator).with_columns(
        pl.col("as_of").dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    )
    if rows.height == 0:
        raise DataError(f"moments_from_long: no rows for estimator={estimator!r}")
    unknown = rows.filter(~pl.col("quantity").is_in(_VECTORS + _MATRICES))
    if unknown.height:
        raise DataError(f"moments_from_long: unknown quantity={unknown['quantity'][0]!r} at asof={unknown['as_of'][0]}")
    per_asof = rows.group_by("as_of").agg(
        pl.col("status").n_unique().alias("n_status"), pl.col("n_obs").n_unique().alias("n_nobs"),
        pl.col("status").first(), pl.col("n_obs").first(),
    ).sort("as_of")
    mixed = per_asof.filter((pl.col("n_status") > 1) | (pl.col("n_nobs") > 1))
    if mixed.height:
        raise DataError(f"moments_from_long: status or n_obs differs within asof={mixed['as_of'][0]}")
    null_ok = rows.filter((pl.col("status") == "ok") & pl.col("value").is_null())
    if null_ok.height:
        r = null_ok.row(0, named=True)
        raise DataError(
            f"moments_from_long: null value with status 'ok' at asof={r['as_of']} "
            f"quantity={r['quantity']} symbol={r['symbol']}"
        )
    asofs = per_asof["as_of"].to_numpy()
    symbols = sorted(rows["symbol"].unique().to_list())
    k, n = asofs.size, len(symbols)
    sym = np.array(symbols, dtype=object)
    arrays = {q: np.full((k, n), np.nan) for q in _VECTORS} | {q: np.full((k, n, n), np.nan) for q in _MATRICES}
    for quantity, array in arrays.items():
        part = rows.filter(pl.col("quantity") == quantity)
        expected = k * n * (n if quantity in _MATRICES else 1)
        cells = ["as_of", "symbol"] + (["symbol_j"] if quantity in _MATRICES else [])
        if part.height != expected or part.select(cells).is_duplicated().any():
            raise DataError(
                f"moments_from_long: quantity={quantity!r} has {part.height} rows, expected {expected} unique cells"
            )
        idx = [np.searchsorted(asofs, part["as_of"].to_numpy()), np.searchsorted(sym, part["symbol"].to_numpy())]
        if quantity in _MATRICES:
            strays = part.filter(~pl.col("symbol_j").is_in(symbols).fill_null(False))
            if strays.height:
                raise DataError(
                    f"moments_from_long: quantity={quantity!r} symbol_j={strays['symbol_j'][0]!r} "
                    f"at asof={strays['as_of'][0]} is not among the symbols {symbols}"
                )
            idx.append(np.searchsorted(sym, part["symbol_j"].to_numpy()))
        array[tuple(idx)] = part["value"].to_numpy()
    moments = Moments(
        mean=arrays["mean"], cov=arrays["cov"], downside=arrays["downside"], semicov=arrays["semicov"],
        n_obs=per_asof["n_obs"].to_numpy().astype(np.int64),
        status=per_asof["status"].to_numpy().astype(_STATUS_DTYPE),
    )
    return asofs, symbols, moments


def _symmetric(a: np.ndarray) -> np.ndarray:
    """``(A + A^T) / 2`` on the last two axes: exactly symmetric, same values up to rounding."""
    return (a + a.swapaxes(-1, -2)) / 2.0


def _check_returns(returns: np.ndarray) -> np.ndarray:
    returns = np.asarray(returns, dtype=np.float64)
    if returns.ndim != 2:
        raise DataError(f"returns must be a T x N matrix, got shape {returns.shape}")
    if np.isinf(returns).any():
        row, col = np.argwhere(np.isinf(returns))[0]
        raise DataError(f"returns: infinite value at row {row}, column {col}")
    return returns


def _check_ends(ends: np.ndarray, t: int) -> np.ndarray:
    """Window end rows in ``[-1, t)``; -1 = no bar at or before the asof (insufficient history)."""
    ends = np.asarray(ends)
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        raise DataError(f"ends must be a 1-D integer array, got dtype {ends.dtype} shape {ends.shape}")
    if ends.size and (ends.min() < -1 or ends.max() >= t):
        bad = ends[(ends < -1) | (ends >= t)][0]
        raise DataError(f"ends: row {bad} outside [-1, {t}) for the {t} rows of returns")
    return ends.astype(np.int64)
