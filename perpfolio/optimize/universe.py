"""The tradable universe: start with the most liquid perpetuals.

:func:`liquid_universe` turns trailing quote volume into a per-asof tradable mask that the
optimizer's bounds honour (an untradable asset is held at weight 0).
"""

from __future__ import annotations

import numpy as np

from perpfolio.errors import ConfigError, DataError


def trailing_quote_volume(quote_volume: np.ndarray, ends: np.ndarray, *, window: int) -> np.ndarray:
    r"""K x N mean quote volume per bar over the ``window`` bars ending at each end index
    (inclusive): :math:`\bar V_{k,i} = \frac1W \sum_{t=e_k-W+1}^{e_k} V_{t,i}` (quote currency per
    bar). Bars with no data (NaN) are skipped; a window with no data at all gives 0 (not liquid).
    """
    if quote_volume.ndim != 2:
        raise DataError(f"quote_volume must be T x N, got shape {quote_volume.shape}")
    if window < 1:
        raise ConfigError(f"window must be >= 1, got {window}")
    padded = np.vstack([np.zeros((1, quote_volume.shape[1])), np.nan_to_num(quote_volume, nan=0.0)])
    counts = np.vstack([np.zeros((1, quote_volume.shape[1])), np.isfinite(quote_volume)])
    total, seen = np.cumsum(padded, axis=0), np.cumsum(counts, axis=0)
    hi, lo = np.asarray(ends) + 1, np.maximum(np.asarray(ends) + 1 - window, 0)
    n_obs = seen[hi] - seen[lo]
    return np.where(n_obs > 0, (total[hi] - total[lo]) / np.maximum(n_obs, 1), 0.0)


def liquid_universe(
    volume: np.ndarray, *, min_quote_volume: float | None = None, top_k: int | None = None
) -> np.ndarray:
    """K x N bool mask: assets whose trailing quote volume is at least ``min_quote_volume``
    and among the ``top_k`` largest (ties broken by column order); None disables a rule."""
    mask = np.ones(volume.shape, dtype=bool)
    if min_quote_volume is not None:
        mask &= volume >= min_quote_volume
    if top_k is not None:
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        rank = np.argsort(np.argsort(-volume, axis=1, kind="stable"), axis=1, kind="stable")
        mask &= rank < top_k
    return mask
