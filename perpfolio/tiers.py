"""Leverage tiers (maintenance-margin brackets) of USDT-margined perpetuals: the packaged Binance
snapshot, a user's tier file, live tiers, the conservative default, and where each symbol's came from.

**The bracket formula.** A position of absolute notional ``n`` (USDT) in bracket ``k`` (the last
bracket whose ``min_notional_k <= n``) needs the maintenance margin ``MM(n) = n * mmr_k - cum_k``
(USDT). The exchange accepts no position beyond the last bracket's ``max_notional``; the formula
then extends the last bracket and perpfolio.stress reports the position as oversized.

**Bracket rules** (every table, whatever its origin; a break is a ConfigError naming the file or
source, the symbol and the bracket): the first bracket starts at 0 with ``cum = 0``; each starts
where the previous one ends (``min_notional_k = max_notional_{k-1}``); ``max_notional >
min_notional``; ``0 <= mmr < 1`` and never decreasing; ``max_leverage > 0``; and ``cum`` follows
one of two deduction rules:

* continuous (Binance ``cum``, Bybit ``mmDeduction``): ``cum_k = cum_{k-1} + min_notional_k
  (mmr_k - mmr_{k-1})`` (within 1e-6 relative), so MM is continuous across brackets;
* whole position (OKX, and any ccxt table without a deduction): ``cum_k = 0`` in every bracket, the
  whole notional at its bracket's rate; MM jumps up at each boundary and is never below the
  continuous rule's, so reading a table without deductions this way is the conservative choice.

**Formats** (:func:`load_tier_file` tells them apart by their brackets):

* the project's: ``{"source", "provenance", "snapshot_date", "exchange", "note", "fields",
  "tiers": {"BTCUSDT": [[min_notional, max_notional, mmr, max_leverage, cum], ...]}}`` (a bracket
  may also be an object with those five keys);
* ccxt's leverage-tier structure ``{"BTC/USDT:USDT": [{"minNotional", "maxNotional",
  "maintenanceMarginRate", "maxLeverage", "info": {"cum" or "mmDeduction"}}, ...]}`` at the top level
  (freqtrade's ``binance_leverage_tiers.json``) or under ``"tiers"``. Only USDT-settled perpetuals
  (``BASE/USDT:USDT``) are read; dated futures and other settle currencies are skipped.
  :func:`parse_ccxt` is the one reader of this structure: the converter, tier files and the live
  tiers of perpfolio.sources.exchange all go through it.

**Where a symbol's tiers come from** (:func:`resolve_tiers`; the first that has the symbol): a
user's tier file (PERPFOLIO_TIERS_FILE; source ``file:<name>``), the exchange's live tiers for
PERPFOLIO_SOURCE=exchange where it serves them without an API key (Bybit, OKX; ``exchange:<name>``),
the packaged snapshot (``snapshot:binance:<date>``), then the conservative default (``default``).

**The conservative default** (:func:`default_tiers`) stands for a symbol no table covers, so it is
never kinder than any symbol of the snapshot: ``MM_default(n) >= MM_s(n)`` for every snapshot symbol
``s`` and notional ``n``, its last bracket ends at the SMALLEST last bracket of any symbol (a
position oversized for some listed symbol is oversized here), and each bracket's max leverage is the
lowest any symbol allows at that size. A continuous table with rates that never decrease is convex,
i.e. the maximum of its brackets' lines ``n mmr_k - cum_k`` (a whole-position table lies below the
maximum of its lines too), so the default is the upper envelope of every line of the snapshot:
again a continuous bracket table, computed exactly (no sampling).

Convert freqtrade's file once into the packaged snapshot (run from the project root)::

    python -m perpfolio.tiers convert freqtrade-2026.9-py3-none-any.whl perpfolio/data/leverage_tiers.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from perpfolio.errors import ConfigError

DEFAULT_TIERS_PATH = Path(__file__).parent / "data" / "leverage_tiers.json"
FIELDS = ("min_notional", "max_notional", "mmr", "max_leverage", "cum")
DEFAULT_SOURCE = "default"
FREQTRADE_MEMBER = "freqtrade/exchange/binance_leverage_tiers.json"


@dataclass(frozen=True)
class Tier:
    """One leverage bracket: applies to absolute notionals in [min_notional, max_notional] (USDT)."""

    min_notional: float
    max_notional: float
    mmr: float  # maintenance margin rate, decimal (0.004 = 0.4%)
    max_leverage: float
    cum: float  # maintenance amount (USDT) subtracted in the bracket formula


class SymbolTiers(NamedTuple):
    """One symbol's brackets and where they came from (``file:<name>``, ``exchange:<name>``,
    ``snapshot:<exchange>:<date>`` or ``default``)."""

    tiers: tuple[Tier, ...]
    source: str


@dataclass(frozen=True, repr=False)
class TierTable:
    """Validated brackets per project symbol (``BTCUSDT``) and the label of where they came from."""

    tiers: Mapping[str, tuple[Tier, ...]]
    source: str

    def __repr__(self) -> str:
        return f"TierTable({self.source}, {len(self.tiers)} symbols)"


def validate_tiers(tiers: Sequence[Tier], *, where: str) -> None:
    """Raise ConfigError naming ``where`` (file or source and symbol) and the bracket that breaks a
    bracket rule of the module docstring."""
    if not tiers:
        raise ConfigError(f"{where}: empty bracket list")
    whole_position = all(t.cum == 0 for t in tiers)
    for k, t in enumerate(tiers, start=1):
        at = f"{where}, bracket {k}"
        if not (0 <= t.mmr < 1 and t.max_notional > t.min_notional and t.max_leverage > 0 and math.isfinite(t.cum)):
            raise ConfigError(f"{at}: need 0 <= mmr < 1, max_notional > min_notional, max_leverage > 0 and a finite "
                              f"cum, got {t}")
        if k == 1:
            if t.min_notional != 0 or t.cum != 0:
                raise ConfigError(f"{at}: the first bracket must start at notional 0 with cum 0, got {t}")
            continue
        prev = tiers[k - 2]
        if t.min_notional != prev.max_notional:
            raise ConfigError(f"{at}: starts at {t.min_notional:g}, not where bracket {k - 1} ends ({prev.max_notional:g})")
        if t.mmr < prev.mmr:
            raise ConfigError(f"{at}: mmr {t.mmr:g} is below bracket {k - 1}'s {prev.mmr:g}")
        expected = prev.cum + t.min_notional * (t.mmr - prev.mmr)
        if not whole_position and abs(t.cum - expected) > 1e-6 * max(1.0, abs(expected)):
            raise ConfigError(f"{at}: cum {t.cum:g} != expected {expected:g} (cum_k = cum_(k-1) + min_notional_k x "
                              "(mmr_k - mmr_(k-1)); or cum 0 in every bracket for the whole-position rule)")


def parse_ccxt(structure: Mapping, *, where: str) -> dict[str, tuple[Tier, ...]]:
    """Validated brackets of every USDT-settled perpetual in a ccxt leverage-tier structure
    (``{"BTC/USDT:USDT": [{minNotional, maxNotional, maintenanceMarginRate, maxLeverage, info}, ...]}``),
    keyed by project symbol (``BTCUSDT``). ``cum`` is the bracket's ``info.cum`` (Binance) or
    ``info.mmDeduction`` (Bybit), 0 where the exchange gives none ('' included)."""
    out: dict[str, tuple[Tier, ...]] = {}
    for unified, rows in structure.items():
        base, _, settle = str(unified).partition("/")
        if settle != "USDT:USDT" or not base:
            continue
        symbol = base + "USDT"
        if not isinstance(rows, list):
            raise ConfigError(f"{where}: symbol {symbol}: expected a list of brackets, got {type(rows).__name__}")
        tiers = []
        for k, row in enumerate(rows, start=1):
            try:
                info = row.get("info") or {}
                deduction = info.get("cum", info.get("mmDeduction"))
                tiers.append(Tier(float(row["minNotional"]), float(row["maxNotional"]), float(row["maintenanceMarginRate"]),
                                  float(row["maxLeverage"]), 0.0 if deduction in (None, "") else float(deduction)))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: symbol {symbol}, bracket {k}: expected numeric minNotional, maxNotional, "
                                  f"maintenanceMarginRate and maxLeverage ({type(exc).__name__}: {exc})") from exc
        validate_tiers(tiers, where=f"{where}: symbol {symbol}")
        out[symbol] = tuple(tiers)
    return out


def parse_project(raw: Mapping, *, where: str) -> dict[str, tuple[Tier, ...]]:
    """Validated brackets of the project format: ``raw["tiers"]`` maps a symbol to brackets given
    as arrays in the order of ``raw["fields"]`` (default :data:`FIELDS`) or as objects."""
    order = tuple(raw.get("fields", FIELDS))
    if sorted(order) != sorted(FIELDS):
        raise ConfigError(f"{where}: 'fields' must name {list(FIELDS)} in some order, got {list(order)}")
    out: dict[str, tuple[Tier, ...]] = {}
    for symbol, rows in raw["tiers"].items():
        tiers = []
        for k, row in enumerate(rows if isinstance(rows, list) else [rows], start=1):
            try:
                values = row if isinstance(row, Mapping) else dict(zip(order, row, strict=True))
                tiers.append(Tier(**{name: float(values[name]) for name in FIELDS}))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: symbol {symbol}, bracket {k}: expected numbers {list(order)}, got "
                                  f"{row!r}") from exc
        validate_tiers(tiers, where=f"{where}: symbol {symbol}")
        out[symbol] = tuple(tiers)
    return out


def load_tier_file(path: Path | str) -> TierTable:
    """A user's tier file, project format or ccxt structure (told apart by the first bracket: an
    object with ``minNotional`` is ccxt's); source ``file:<name>``. Anything unreadable or breaking
    a bracket rule is a ConfigError naming the file (and the symbol and bracket)."""
    path = Path(path)
    raw = _read_json(path)
    body = raw.get("tiers", raw) if isinstance(raw, dict) else None
    if not isinstance(body, dict) or not body:
        raise ConfigError(f"{path}: expected a JSON object mapping symbols to brackets (the project format under "
                          "'tiers', or ccxt's leverage-tier structure)")
    first = next((rows[0] for rows in body.values() if isinstance(rows, list) and rows), None)
    if isinstance(first, Mapping) and "minNotional" in first:
        tiers = parse_ccxt(body, where=str(path))
    else:
        tiers = parse_project({**(raw if "tiers" in raw else {}), "tiers": body}, where=str(path))
    if not tiers:
        raise ConfigError(f"{path}: no USDT-margined perpetual in the file (ccxt symbols look like BTC/USDT:USDT)")
    return TierTable(MappingProxyType(tiers), f"file:{path.name}")


@lru_cache(maxsize=4)
def load_snapshot(path: Path | str = DEFAULT_TIERS_PATH) -> TierTable:
    """The packaged snapshot (project format with ``exchange`` and ``snapshot_date``); source
    ``snapshot:<exchange>:<date>``. Read once per path."""
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("tiers"), dict) or not raw.get("exchange") or not raw.get("snapshot_date"):
        raise ConfigError(f"{path}: a tier snapshot needs 'exchange', 'snapshot_date' and an object under 'tiers'")
    tiers = parse_project(raw, where=str(path))
    return TierTable(MappingProxyType(tiers), f"snapshot:{raw['exchange']}:{raw['snapshot_date']}")


def default_tiers(table: TierTable) -> tuple[Tier, ...]:
    """The conservative default derived from ``table`` (module docstring): the upper envelope of
    every bracket line ``n mmr - cum`` of every symbol, on ``[0, smallest last max_notional]``, each
    bracket with the lowest max leverage of any bracket that overlaps it."""
    brackets = [t for tiers in table.tiers.values() for t in tiers]
    if not brackets:
        raise ConfigError(f"{table!r}: no brackets to derive a default from")
    cap = min(tiers[-1].max_notional for tiers in table.tiers.values())
    lines: dict[float, float] = {}  # slope (mmr) -> smallest cum: of lines with the same slope, the highest
    for t in brackets:
        lines[t.mmr] = min(lines.get(t.mmr, math.inf), t.cum)
    hull: list[tuple[float, float, float]] = []  # (mmr, cum, notional where the line starts to dominate)
    for m, c in sorted(lines.items()):
        start = -math.inf
        while hull:
            pm, pc, pstart = hull[-1]
            start = (c - pc) / (m - pm)  # where n m - c overtakes n pm - pc
            if start > pstart:
                break
            hull.pop()
            start = -math.inf
        hull.append((m, c, start))
    active = [h for i, h in enumerate(hull) if (i + 1 == len(hull) or hull[i + 1][2] > 0) and h[2] < cap]
    floors = [0.0] + [h[2] for h in active[1:]]
    ceilings = floors[1:] + [cap]
    lo = np.array([t.min_notional for t in brackets])
    hi = np.array([t.max_notional for t in brackets])
    lev = np.array([t.max_leverage for t in brackets])
    return tuple(
        Tier(a, b, m, float(lev[(lo < b) & (hi > a)].min()), c)
        for (m, c, _), a, b in zip(active, floors, ceilings)
    )


def resolve_tiers(
    symbols: Sequence[str], *, snapshot: TierTable, user: TierTable | None = None,
    live: Callable[[list[str]], TierTable | None] | None = None,
) -> dict[str, SymbolTiers]:
    """Each symbol's brackets and source, by precedence: ``user`` (a tier file), then ``live``
    (called once with the symbols the user table lacks; returns the tiers the exchange serves, or
    None), then ``snapshot``, then :func:`default_tiers` of the snapshot (source ``default``)."""
    tables = [user] if user is not None else []
    if live is not None:
        uncovered = [s for s in symbols if user is None or s not in user.tiers]
        fetched = live(uncovered) if uncovered else None
        if fetched is not None:
            tables.append(fetched)
    tables.append(snapshot)
    out: dict[str, SymbolTiers] = {}
    fallback: tuple[Tier, ...] | None = None
    for s in symbols:
        table = next((t for t in tables if s in t.tiers), None)
        if table is not None:
            out[s] = SymbolTiers(tuple(table.tiers[s]), table.source)
            continue
        fallback = fallback or default_tiers(snapshot)
        out[s] = SymbolTiers(fallback, DEFAULT_SOURCE)
    return out


# --- the one-time conversion of freqtrade's file ---------------------------------------------------


def convert(source: Path | str, out: Path | str, *, snapshot_date: str | None = None,
            exchange: str = "binance") -> TierTable:
    """Write the project-format snapshot of every USDT-settled perpetual in a ccxt leverage-tier file.

    ``source``: a freqtrade wheel (its ``freqtrade/exchange/binance_leverage_tiers.json`` is read;
    snapshot date = that member's date in the wheel; provenance = package, version, file name and
    sha256 of the wheel) or the JSON file itself (then ``snapshot_date`` is required and the
    provenance is the file's name and sha256). Returns the table written.
    """
    source, out = Path(source), Path(out)
    blob = source.read_bytes()
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            member = wheel.getinfo(FREQTRADE_MEMBER)
            data = wheel.read(member)
        year, month, day = member.date_time[:3]
        snapshot_date = snapshot_date or f"{year:04d}-{month:02d}-{day:02d}"
        package, version = source.name.split("-")[:2]
        provenance = {"package": package, "version": version, "file": source.name, "member": FREQTRADE_MEMBER,
                      "sha256": hashlib.sha256(blob).hexdigest()}
    else:
        if snapshot_date is None:
            raise ConfigError(f"{source}: a JSON source needs --snapshot-date (the date the exchange's tiers were taken)")
        data, provenance = blob, {"file": source.name, "sha256": hashlib.sha256(blob).hexdigest()}
    try:
        structure = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON: {exc}") from exc
    tiers = parse_ccxt(structure, where=str(source))
    header = {
        "source": f"{exchange.title()} leverage brackets (maintenance-margin tiers) of every USDT-margined perpetual, "
                  f"from {source.name} (ccxt leverage-tier structure)",
        "provenance": provenance,
        "exchange": exchange,
        "snapshot_date": snapshot_date,
        "note": "maintenance margin = |notional| x mmr - cum (USDT), in the bracket whose min_notional the notional "
                "reaches; written by `python -m perpfolio.tiers convert`; one line per symbol",
        "fields": list(FIELDS),
    }
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()] + ['  "tiers": {']
    rows = [f"    {json.dumps(s)}: {json.dumps([[_compact(x) for x in astuple(t)] for t in tiers[s]], separators=(',', ':'))}"
            for s in sorted(tiers)]
    out.write_text("\n".join(lines + [",\n".join(rows), "  }", "}"]) + "\n")
    return TierTable(MappingProxyType(tiers), f"snapshot:{exchange}:{snapshot_date}")


def _compact(x: float) -> float | int:
    """300000.0 -> 300000 (the file stays small); other numbers as they are."""
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read a leverage-tier table: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m perpfolio.tiers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="ccxt leverage-tier JSON (or a freqtrade wheel) -> project snapshot")
    conv.add_argument("source", type=Path, help="freqtrade-<version>-py3-none-any.whl or a ccxt-structure JSON file")
    conv.add_argument("out", type=Path, help="project-format JSON to write (e.g. perpfolio/data/leverage_tiers.json)")
    conv.add_argument("--snapshot-date", help="YYYY-MM-DD; default for a wheel: the date of the file in the wheel")
    conv.add_argument("--exchange", default="binance", help="whose brackets these are (default binance)")
    args = parser.parse_args(argv)
    table = convert(args.source, args.out, snapshot_date=args.snapshot_date, exchange=args.exchange)
    brackets = sum(len(t) for t in table.tiers.values())
    print(f"wrote {args.out}: {len(table.tiers)} USDT perpetuals, {brackets} brackets ({table.source})")


if __name__ == "__main__":
    main()
