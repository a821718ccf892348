"""The Binance archive reader: formats, data quality, the real BTC/ETH/SOL archive and the whole chain on it."""

import hashlib
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from perpfolio.errors import ConfigError, DataError
from perpfolio.sources.archive import REFERENCE_SCHEMA, archive_files, empty_data, find_gaps, read_archive
from tests.conftest import REAL_DATA

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)
KLINE_HEADER = "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore"
FUNDING_HEADER = "calc_time,funding_interval_hours,last_funding_rate"
REAL_ARCHIVE = REAL_DATA / "binance"


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def kline_rows(start: datetime, hours: int, *, price: float = 100.0, unit: str = "ms") -> list[str]:
    """Hourly 12-column kline lines; close = price + i, open = previous close."""
    rows = []
    for i in range(hours):
        t = ms(start + timedelta(hours=i))
        stamp = t * 1000 if unit == "us" else t
        o, c = price + i - 1 if i else price, price + i
        rows.append(f"{stamp},{o},{max(o, c) + 0.5},{min(o, c) - 0.5},{c},{10 + i},{stamp + 3599999},0,0,0,0,0")
    return rows


def write(root: Path, rel: str, lines: list[str], *, header: str | None = None, as_zip: bool = False,
          checksum: str | None = None) -> Path:
    """Write an archive file (csv or zip holding the csv) and optionally its .CHECKSUM ("good" or "bad")."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(([header] if header else []) + lines) + "\n"
    if as_zip:
        path = path.with_suffix(".zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(path.with_suffix(".csv").name, text)
    else:
        path.write_text(text)
    if checksum:
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if checksum == "good" else "0" * 64
        path.with_name(path.name + ".CHECKSUM").write_text(f"{digest}  {path.name}\n")
    return path


def monthly_klines(sym: str, month: str) -> str:
    return f"futures/um/monthly/klines/{sym}/1h/{sym}-1h-{month}.csv"


def daily_klines(sym: str, day: str) -> str:
    return f"futures/um/daily/klines/{sym}/1h/{sym}-1h-{day}.csv"


def funding_file(sym: str, month: str) -> str:
    return f"futures/um/monthly/fundingRate/{sym}/{sym}-fundingRate-{month}.csv"


def reference_file(kind: str, sym: str, period: str) -> str:
    """markPriceKlines / indexPriceKlines file of a month (YYYY-MM) or a day (YYYY-MM-DD)."""
    granularity = "daily" if len(period) == 10 else "monthly"
    return f"futures/um/{granularity}/{kind}PriceKlines/{sym}/1h/{sym}-1h-{period}.csv"


class TestFormats:
    @pytest.mark.parametrize("header", [KLINE_HEADER, None], ids=["header", "headerless"])
    @pytest.mark.parametrize("unit", ["ms", "us"])
    @pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "csv"])
    def test_every_format_reads_the_same_bars(self, tmp_path, header, unit, as_zip):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 48, unit=unit), header=header, as_zip=as_zip,
              checksum="good")
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=48))
        c = data.candles
        assert c.height == 48 and c["ts"].dtype == pl.Datetime("us", "UTC")
        assert c["ts"].to_list() == [T0 + timedelta(hours=i) for i in range(48)]
        assert c["close"].to_list() == [100.0 + i for i in range(48)]
        assert c["volume"].to_list() == [10.0 + i for i in range(48)]
        assert set(c["source"]) == {"archive"} and set(c["symbol"]) == {"AAAUSDT"}
        assert data.quality.is_empty()

    def test_window_reads_only_overlapping_files(self, tmp_path):
        for month, start in (("2025-02", datetime(2025, 2, 1, tzinfo=UTC)), ("2025-03", T0), ("2025-04", datetime(2025, 4, 1, tzinfo=UTC))):
            write(tmp_path, monthly_klines("AAAUSDT", month), kline_rows(start, 24), header=KLINE_HEADER)
        files = archive_files(tmp_path, "AAAUSDT", "klines", T0, T0 + timedelta(hours=24))
        assert [f.path.name for f in files] == ["AAAUSDT-1h-2025-03.csv"]
        data = read_archive(tmp_path, ["AAAUSDT"], T0 + timedelta(hours=2), T0 + timedelta(hours=5))
        assert data.candles["ts"].to_list() == [T0 + timedelta(hours=h) for h in (2, 3, 4)]
        assert [p.name for p in data.files] == ["AAAUSDT-1h-2025-03.csv"]

    def test_zip_shadows_its_extracted_csv(self, tmp_path):
        rows = kline_rows(T0, 24)
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows, header=KLINE_HEADER, as_zip=True)
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows, header=KLINE_HEADER)
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=24))
        assert [p.suffix for p in data.files] == [".zip"]
        assert data.candles.height == 24 and data.quality.is_empty()

    def test_funding_bar_ts_is_ceil_to_hour_minus_one_hour(self, tmp_path):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 24), header=KLINE_HEADER)
        events = [T0 + timedelta(hours=8), T0 + timedelta(hours=16, milliseconds=5), T0 + timedelta(hours=20, minutes=30),
                  T0 + timedelta(hours=24)]
        lines = [f"{ms(t)},{h},{r}" for t, h, r in zip(events, (8, 8, 4, 4), (1e-4, -2e-4, 3e-4, 5e-5))]
        write(tmp_path, funding_file("AAAUSDT", "2025-03"), lines)  # headerless
        f = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=24)).funding
        # on the hour -> the bar that ENDS then; 16:00:00.005 -> bar 16:00; 20:30 -> bar 20:00; 24:00 -> bar 23:00
        assert f["bar_ts"].to_list() == [T0 + timedelta(hours=h) for h in (7, 16, 20, 23)]
        assert f["rate"].to_list() == [1e-4, -2e-4, 3e-4, 5e-5]
        assert f["interval_hours"].to_list() == [8, 8, 4, 4]
        # an event at end + 1 h settles in the next window: its bar is not in [start, end)
        assert read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=7)).funding.is_empty()

    def test_real_xrp_format_sample(self):
        root = REAL_DATA / "freqtrade_xrp_sample"
        if not root.exists():
            pytest.skip(f"real data folder {root} is absent (not shipped with the project)")
        start, end = datetime(2021, 11, 17, 1, tzinfo=UTC), datetime(2021, 11, 21, 5, tzinfo=UTC)
        data = read_archive(root, ["XRPUSDT"], start, end)
        assert data.candles.height == 100 and data.gaps.is_empty()
        assert [p.suffix for p in data.files if "klines" in str(p)] == [".zip"]  # the csv beside it is not read again
        assert data.funding["interval_hours"].unique().to_list() == [8]


class TestErrors:
    def test_bad_checksum_names_the_file(self, tmp_path):
        path = write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 5), as_zip=True, checksum="bad")
        with pytest.raises(DataError, match=rf"{path.name}: sha256 .* does not match"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=5))
        # the same file without its checksum, or with checksums switched off, reads
        assert read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=5), verify_checksums=False).candles.height == 5

    def test_corrupt_zip_names_the_file(self, tmp_path):
        path = tmp_path / "futures/um/monthly/klines/AAAUSDT/1h/AAAUSDT-1h-2025-03.zip"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"PK\x03\x04 this is not a zip archive")
        with pytest.raises(DataError, match=r"AAAUSDT-1h-2025-03.zip: corrupt zip"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=5))

    def test_truncated_zip_member_is_corrupt(self, tmp_path):
        path = write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 200), as_zip=True)
        blob = bytearray(path.read_bytes())
        blob[60:70] = b"\x00" * 10  # damage the compressed stream
        path.write_bytes(bytes(blob))
        with pytest.raises(DataError, match="corrupt zip"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=5))

    @pytest.mark.parametrize(("bad", "field"), [
        ("{t},100,101,99,abc,5,0,0,0,0,0,0", "close"),
        ("{t},100,101,99,nan,5,0,0,0,0,0,0", "close"),
        ("{t},100,101,99", "field 5 is missing"),
        ("{t},0,101,99,100,5,0,0,0,0,0,0", "open must be > 0"),
        ("{t},100,101,99,100,-1,0,0,0,0,0,0", "volume must be >= 0"),
        ("x{t},100,101,99,100,5,0,0,0,0,0,0", "open_time"),
    ])
    def test_malformed_row_names_file_line_symbol_and_field(self, tmp_path, bad, field):
        rows = kline_rows(T0, 6)
        rows[3] = bad.format(t=ms(T0 + timedelta(hours=3)))
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows, header=KLINE_HEADER)
        # header is line 1, so data row index 3 is line 5
        with pytest.raises(DataError, match=r"AAAUSDT-1h-2025-03.csv: line 5") as info:
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=6))
        assert field in str(info.value)
        if "missing" not in field:
            assert "symbol AAAUSDT" in str(info.value)

    def test_close_outside_its_high_low_is_read_and_keeps_its_file_and_line(self, tmp_path):
        """Issue 12: a trade candle outside its own [low, high] is no longer a reader error but a bad print
        that perpfolio.quality flags (tests/test_quality.py); the reader keeps where each candle was read."""
        rows = kline_rows(T0, 6)
        rows[3] = f"{ms(T0 + timedelta(hours=3))},100,99,98,100,5,0,0,0,0,0,0"  # close 100 above high 99
        path = write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows, header=KLINE_HEADER)
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=6))
        assert data.candles.filter(pl.col("ts") == T0 + timedelta(hours=3)).select("high", "close").row(0) == (99.0, 100.0)
        assert data.candle_origin.columns == ["ts", "symbol", "origin"]
        assert data.candle_origin["origin"].to_list() == [f"{path}: line {n}" for n in range(2, 8)]  # header is line 1

    def test_ragged_line_names_its_line(self, tmp_path):
        rows = kline_rows(T0, 6)
        rows[2] += ",extra"
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows)  # headerless: data row 2 is line 3
        with pytest.raises(DataError, match=r"AAAUSDT-1h-2025-03.csv: line 3: 13 fields, expected 12"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=6))

    def test_off_hour_candle_and_bad_funding(self, tmp_path):
        rows = kline_rows(T0, 3)
        rows[1] = rows[1].replace(str(ms(T0 + timedelta(hours=1))), str(ms(T0 + timedelta(hours=1, minutes=1))), 1)
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows)
        with pytest.raises(DataError, match=r"line 2: symbol AAAUSDT: ts .*not on the hour"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=3))
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 3))
        write(tmp_path, funding_file("AAAUSDT", "2025-03"), [f"{ms(T0 + timedelta(hours=1))},8,NaN"], header=FUNDING_HEADER)
        with pytest.raises(DataError, match=r"fundingRate-2025-03.csv: line 2: symbol AAAUSDT: field last_funding_rate"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=3))

    def test_unknown_symbol_lists_what_is_there(self, tmp_path):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 3))
        with pytest.raises(DataError, match=r"no klines folder for symbol 'BBBUSDT'.*AAAUSDT"):
            read_archive(tmp_path, ["BBBUSDT"], T0, T0 + timedelta(hours=3))

    def test_window_must_be_utc_hours(self, tmp_path):
        with pytest.raises(ConfigError, match="aligned to the hour"):
            read_archive(tmp_path, ["AAAUSDT"], T0 + timedelta(minutes=5), T0 + timedelta(hours=3))


class TestDataQuality:
    def test_duplicates_and_out_of_order_are_fixed_and_counted(self, tmp_path):
        rows = kline_rows(T0, 10)
        shuffled = rows[:3] + [rows[5], rows[3], rows[4]] + rows[6:] + [rows[7], rows[2]]  # 2 late rows, 2 repeats
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), shuffled, header=KLINE_HEADER)
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=10))
        assert data.candles["ts"].to_list() == [T0 + timedelta(hours=i) for i in range(10)]
        assert data.candles["close"].to_list() == [100.0 + i for i in range(10)]
        q = {r["issue"]: r for r in data.quality.iter_rows(named=True)}
        assert set(q) == {"duplicates", "out_of_order"}
        assert q["duplicates"]["duplicates_dropped"] == 2
        assert (q["duplicates"]["from_ts"], q["duplicates"]["to_ts"]) == (T0 + timedelta(hours=2), T0 + timedelta(hours=7))
        # rows earlier than their predecessor: 03:00 after 05:00, and 07:00 / 02:00 after 09:00 / 07:00
        assert q["out_of_order"]["out_of_order"] == 3
        assert data.gaps.is_empty()

    def test_gap_is_reported_not_filled_and_split_at_midnight(self, tmp_path):
        rows = kline_rows(T0, 48)
        kept = rows[:5] + rows[8:22] + rows[27:]  # missing 05..07 and 22..26 (crosses midnight)
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kept, header=KLINE_HEADER)
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=48))
        assert data.candles.height == 48 - 3 - 5  # nothing invented
        h = lambda n: T0 + timedelta(hours=n)  # noqa: E731
        assert data.gaps.rows() == [
            ("AAAUSDT", h(5), h(7), 3), ("AAAUSDT", h(22), h(23), 2), ("AAAUSDT", h(24), h(26), 3),
        ]

    def test_find_gaps_against_an_independent_count(self, rng):
        hours = 24 * 5
        present = np.sort(rng.choice(hours, size=80, replace=False))
        ts = [T0 + timedelta(hours=int(i)) for i in present]
        candles = pl.DataFrame({"ts": ts, "symbol": ["X"] * len(ts)}).with_columns(pl.col("ts").dt.cast_time_unit("us"))
        gaps = find_gaps(candles, "X", T0, T0 + timedelta(hours=hours))
        missing = sorted(set(range(hours)) - set(present.tolist()))
        assert gaps["bars_missing"].sum() == len(missing)
        covered = {int((g[0] - T0) / timedelta(hours=1)) + k for g in gaps.select("from_ts", "bars_missing").rows()
                   for k in range(g[1])}
        assert covered == set(missing)
        assert (gaps["from_ts"].dt.date() == gaps["to_ts"].dt.date()).all()

    def test_daily_and_monthly_for_the_same_period_do_not_double_count(self, tmp_path):
        march = kline_rows(T0, 31 * 24)
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), march, header=KLINE_HEADER)
        # daily files of March (shadowed by the monthly) and of April 1 (no monthly: read)
        write(tmp_path, daily_klines("AAAUSDT", "2025-03-31"), march[-24:], as_zip=True)
        write(tmp_path, daily_klines("AAAUSDT", "2025-03-02"), [r.replace(",", ",9", 1) for r in march[24:48]])
        april = datetime(2025, 4, 1, tzinfo=UTC)
        write(tmp_path, daily_klines("AAAUSDT", "2025-04-01"), kline_rows(april, 24, price=200.0))
        data = read_archive(tmp_path, ["AAAUSDT"], datetime(2025, 3, 30, tzinfo=UTC), datetime(2025, 4, 2, tzinfo=UTC))
        assert data.candles.height == 72 and data.quality.is_empty()
        assert [p.name for p in data.files] == ["AAAUSDT-1h-2025-03.csv", "AAAUSDT-1h-2025-04-01.csv"]
        assert data.candles.filter(pl.col("ts") == april)["close"].item() == 200.0

    def test_overlapping_daily_files_dedupe_by_key_keeping_the_first(self, tmp_path):
        write(tmp_path, daily_klines("AAAUSDT", "2025-03-01"), kline_rows(T0, 26))  # 2 hours spill into 03-02
        write(tmp_path, daily_klines("AAAUSDT", "2025-03-02"), kline_rows(T0 + timedelta(hours=24), 24, price=500.0))
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=48))
        assert data.candles.height == 48
        assert data.quality["duplicates_dropped"].sum() == 2
        assert data.candles.filter(pl.col("ts") == T0 + timedelta(hours=24))["close"].item() == 124.0  # first read wins


class TestReferencePrices:
    """markPriceKlines and indexPriceKlines: the klines reader's rules; absent folders are no rows, not an error."""

    def test_mark_and_index_read_with_the_kline_rules(self, tmp_path):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 48))
        # mark: monthly, headerless, microseconds, zipped with a good checksum; its daily file is shadowed
        write(tmp_path, reference_file("mark", "AAAUSDT", "2025-03"), kline_rows(T0, 48, price=200.0, unit="us"),
              as_zip=True, checksum="good")
        write(tmp_path, reference_file("mark", "AAAUSDT", "2025-03-01"), kline_rows(T0, 24, price=999.0))
        # index: two daily files with a header, milliseconds; volume fields empty (they are not read)
        day2 = T0 + timedelta(days=1)
        for day, start in (("2025-03-01", T0), ("2025-03-02", day2)):
            rows = [",".join(r.split(",")[:5] + [""] * 7) for r in kline_rows(start, 24, price=99.0 + (start == day2) * 24)]
            write(tmp_path, reference_file("index", "AAAUSDT", day), rows, header=KLINE_HEADER)
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=48))
        ref = data.reference_prices
        assert ref.schema == pl.Schema(REFERENCE_SCHEMA) and set(ref["source"]) == {"archive"}
        mark = ref.filter(pl.col("kind") == "mark")
        index = ref.filter(pl.col("kind") == "index")
        hours = [T0 + timedelta(hours=i) for i in range(48)]
        assert mark["ts"].to_list() == hours and mark["close"].to_list() == [200.0 + i for i in range(48)]
        assert index["ts"].to_list() == hours and index["close"].to_list() == [99.0 + i for i in range(48)]
        assert ref.sort("symbol", "kind", "ts").equals(ref) and data.quality.is_empty()
        names = sorted(p.name for p in data.files if "PriceKlines" in str(p))
        assert names == ["AAAUSDT-1h-2025-03-01.csv", "AAAUSDT-1h-2025-03-02.csv", "AAAUSDT-1h-2025-03.zip"]

    def test_missing_folders_are_no_rows_not_an_error(self, tmp_path):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 5))
        write(tmp_path, monthly_klines("BBBUSDT", "2025-03"), kline_rows(T0, 5))
        write(tmp_path, reference_file("index", "BBBUSDT", "2025-03"), kline_rows(T0, 5))
        data = read_archive(tmp_path, ["AAAUSDT", "BBBUSDT"], T0, T0 + timedelta(hours=5))
        assert data.reference_prices.select("symbol", "kind").unique().rows() == [("BBBUSDT", "index")]
        assert data.quality.is_empty() and data.candles.height == 10
        assert empty_data().reference_prices.schema == pl.Schema(REFERENCE_SCHEMA)

    def test_bad_checksum_names_the_file(self, tmp_path):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 5))
        path = write(tmp_path, reference_file("index", "AAAUSDT", "2025-03"), kline_rows(T0, 5), as_zip=True, checksum="bad")
        with pytest.raises(DataError, match=rf"indexPriceKlines/AAAUSDT/1h/{path.name}: sha256 .* does not match"):
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=5))

    @pytest.mark.parametrize(("bad", "field"), [
        ("{t},100,101,99,abc,0,0,0,0,0,0,0", "field close is not a finite number: 'abc'"),
        ("{t},100,99,98,100,0,0,0,0,0,0,0", "field high is below max(open, close)"),
        ("{t},100,101,99,-3,0,0,0,0,0,0,0", "field close must be > 0"),
        ("{t},100,101", "field 4 is missing"),
    ])
    def test_malformed_row_names_file_line_and_field(self, tmp_path, bad, field):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 6))
        rows = kline_rows(T0, 6)
        rows[3] = bad.format(t=ms(T0 + timedelta(hours=3)))
        write(tmp_path, reference_file("mark", "AAAUSDT", "2025-03-01"), rows)  # headerless: data row 3 is line 4
        with pytest.raises(DataError, match=r"markPriceKlines/AAAUSDT/1h/AAAUSDT-1h-2025-03-01.csv: line 4") as info:
            read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=6))
        assert field in str(info.value)

    def test_duplicates_are_dropped_and_counted_per_kind(self, tmp_path):
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), kline_rows(T0, 6))
        rows = kline_rows(T0, 6)
        write(tmp_path, reference_file("mark", "AAAUSDT", "2025-03"), rows[:4] + [rows[2]] + rows[4:])
        data = read_archive(tmp_path, ["AAAUSDT"], T0, T0 + timedelta(hours=6))
        assert data.reference_prices.height == 6
        assert data.quality.select("dataset", "issue", "duplicates_dropped", "out_of_order").rows() == [
            ("mark", "duplicates", 1, 0), ("mark", "out_of_order", 0, 1)]


class TestRealArchive:
    @pytest.fixture(scope="class")
    def real(self):
        if not REAL_ARCHIVE.exists():
            pytest.skip(f"real data folder {REAL_ARCHIVE} is absent (not shipped with the project)")
        return read_archive(REAL_ARCHIVE, ["BTCUSDT", "ETHUSDT", "SOLUSDT"], datetime(2025, 1, 1, tzinfo=UTC),
                            datetime(2025, 7, 1, tzinfo=UTC))

    def test_every_hour_of_h1_2025_once(self, real):
        assert dict(real.candles.group_by("symbol").len().iter_rows()) == {"BTCUSDT": 4344, "ETHUSDT": 4344, "SOLUSDT": 4344}
        assert real.quality.is_empty() and real.gaps.is_empty()
        steps = real.candles.group_by("symbol").agg(pl.col("ts").diff().drop_nulls().unique())
        assert all(s.to_list() == [timedelta(hours=1)] for s in steps["ts"])

    def test_funding_every_8h(self, real):
        f = real.funding
        assert set(f["interval_hours"]) == {8}
        gaps = f.group_by("symbol").agg(pl.col("ts").diff().drop_nulls().unique())
        assert all(g.to_list() == [timedelta(hours=8)] for g in gaps["ts"])
        # events at 08:00, 16:00, 00:00 of Jan 1 .. Jun 30 whose bar is in the window: 3 * 181 - 1 (2025-01-01 00:00)
        assert dict(f.group_by("symbol").len().iter_rows()) == {s: 3 * 181 - 1 for s in ("BTCUSDT", "ETHUSDT", "SOLUSDT")}
        assert f["rate"].abs().max() < 0.01

    def test_prices_are_plausible(self, real):
        btc = real.candles.filter(pl.col("symbol") == "BTCUSDT")
        assert 74_000 < btc["low"].min() < 80_000 and 105_000 < btc["high"].max() < 112_000
        eth = real.candles.filter(pl.col("symbol") == "ETHUSDT")
        assert 1_300 < eth["low"].min() < eth["high"].max() < 4_000


class TestRawMarketSource:
    def test_archive_source_returns_contract_frames_and_quality(self, tmp_path):
        from assets import schemas
        from assets.checks import check_frame
        from pipelines.resources import RawMarket

        rows = kline_rows(T0, 24)
        write(tmp_path, monthly_klines("AAAUSDT", "2025-03"), rows[:10] + rows[12:], header=KLINE_HEADER)
        write(tmp_path, funding_file("AAAUSDT", "2025-03"), [f"{ms(T0 + timedelta(hours=8))},8,0.0001"])
        iv_path = tmp_path / "iv.csv"
        iv_path.write_text(f"ts,underlying,iv\n{T0.isoformat()},AAA,0.6\n")
        market = RawMarket(source="archive", symbols=["AAAUSDT"], origin=T0.isoformat(), archive_dir=str(tmp_path),
                           iv_csv=[str(iv_path)])
        data = market.fetch_with_quality(T0, T0 + timedelta(days=1))
        candles, funding, iv, quality = data.candles, data.funding, data.implied_vol, data.data_quality
        assert candles.height == 22 and funding.height == 1 and iv["iv"].to_list() == [0.6]
        # the missing hours, and the 16:00 funding event an 8 h schedule expects while the symbol trades
        assert quality.select("issue", "from_ts", "bars_missing", "events_missing").rows() == [
            ("gap", T0 + timedelta(hours=10), 2, 0), ("funding_gap", T0 + timedelta(hours=16), 0, 1)]
        assert data.reference_prices.is_empty()  # no mark/index folders: no rows, no error
        for frame, model in ((candles, schemas.Candles), (funding, schemas.Funding), (iv, schemas.ImpliedVol),
                             (quality, schemas.DataQuality), (data.reference_prices, schemas.ReferencePrices)):
            assert check_frame(schemas.conform(frame, model), model, dg.AssetKey(["raw", "x"])).passed, model.__name__
        fetched = market.fetch(T0, T0 + timedelta(days=1))
        assert [fetched.candles.height, fetched.funding.height, fetched.implied_vol.height] == [22, 1, 1]

    def test_synthetic_source_is_unchanged_and_reports_no_gap(self):
        from pipelines.resources import RawMarket
        from perpfolio.sources.synthetic import generate_market

        market = RawMarket(symbols=["BTCUSDT", "ETHUSDT"], origin=T0.isoformat(), seed=3)
        data = market.fetch_with_quality(T0, T0 + timedelta(days=2))
        direct = generate_market(["BTCUSDT", "ETHUSDT"], T0, T0 + timedelta(days=2), seed=3)
        assert data.candles.equals(direct.candles) and data.data_quality.is_empty()
        assert data.implied_vol.equals(direct.implied_vol)
        assert data.reference_prices.equals(direct.reference_prices) and data.reference_prices.height == 2 * 2 * 48

    def test_reference_metadata_names_what_is_missing_and_counts_fixes(self):
        from assets.raw import missing_reference, quality_metadata
        from perpfolio.sources.archive import quality_rows

        reference = pl.DataFrame({"symbol": ["AAAUSDT", "AAAUSDT", "BBBUSDT"], "kind": ["mark", "index", "index"]})
        assert missing_reference(reference, ["AAAUSDT", "BBBUSDT", "CCCUSDT"]) == "BBBUSDT:mark, CCCUSDT:mark, CCCUSDT:index"
        assert missing_reference(reference, ["AAAUSDT"]) == "none"
        quality = quality_rows(pl.DataFrame([
            ("AAAUSDT", "mark", "duplicates", T0, T0, 0, 2, 0, 0), ("AAAUSDT", "index", "out_of_order", T0, T0, 0, 0, 1, 0),
            ("AAAUSDT", "candles", "gap", T0, T0, 3, 0, 0, 0), ("AAAUSDT", "candles", "outlier", T0, T0, 0, 0, 0, 0),
            ("AAAUSDT", "funding", "funding_gap", T0, T0, 0, 0, 0, 3), ("BBBUSDT", "funding", "funding_gap", T0, T0, 0, 0, 0, 2),
        ], schema=["symbol", "dataset", "issue", "from_ts", "to_ts", "bars_missing", "duplicates_dropped", "out_of_order",
                   "events_missing"], orient="row"))
        assert quality_metadata(quality, "reference_prices") == {"duplicates_fixed": 2, "out_of_order_fixed": 1}
        assert quality_metadata(quality, "candles") == {"duplicates_fixed": 0, "out_of_order_fixed": 0, "gap_count": 1,
                                                        "bars_missing": 3, "outliers": 1}
        assert quality_metadata(quality, "funding") == {"duplicates_fixed": 0, "out_of_order_fixed": 0, "funding_gaps": 2,
                                                        "funding_events_missing": 5}
        assert quality_metadata(quality, "data_quality") == {"issues": 6, "outliers": 1, "funding_gaps": 2,
                                                             "funding_events_missing": 5}

    def test_settings_read_the_archive_variables(self, tmp_path):
        from pipelines.settings import Settings

        a, b = tmp_path / "a.csv", tmp_path / "b.csv"
        a.write_text("ts,underlying,iv\n")
        b.write_text("ts,underlying,iv\n")
        for sym in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):  # the archive must hold the configured symbols (checked at load)
            write(tmp_path, monthly_klines(sym, "2025-01"), kline_rows(datetime(2025, 1, 1, tzinfo=timezone.utc), 24))
        s = Settings.from_env({"PERPFOLIO_SOURCE": "archive", "PERPFOLIO_ARCHIVE_DIR": str(tmp_path),
                               "PERPFOLIO_IV_CSV": f"{a}, {b}"})
        assert (s.source, s.archive_dir, s.iv_csv) == ("archive", tmp_path, (a, b))
        with pytest.raises(ConfigError, match="PERPFOLIO_ARCHIVE_DIR"):
            Settings(source="archive")
        with pytest.raises(ConfigError, match="choose synthetic, archive or exchange"):
            Settings(source="ftx")
        with pytest.raises(ConfigError, match="PERPFOLIO_IV_CSV"):
            Settings(iv_csv=(tmp_path / "missing.csv",))
