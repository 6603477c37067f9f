import gzip
import json

import pandas as pd
import pytest

from trainer.data.loaders import (
    DataError,
    load_amazon,
    load_interactions,
    load_movielens,
    load_path,
    load_taobao,
)


def write(path, text):
    path.write_text(text)
    return path


def test_generic_csv_with_items_and_iso_timestamps(tmp_path):
    f = write(tmp_path / "events.csv",
              "user_id,item_id,timestamp\nu1,a,2024-01-02T00:00:00Z\nu1,b,2024-01-01\n")
    items = write(tmp_path / "items.csv", "item_id,title,categories\na,Alpha,x|y\nb,Beta,\n")
    raw = load_interactions(f, items)
    assert raw.interactions["user_id"].tolist() == ["u1", "u1"]
    assert raw.interactions["timestamp"].tolist() == [1704153600, 1704067200]
    assert raw.items.set_index("item_id").loc["a", "categories"] == "x|y"


def test_generic_parquet(tmp_path):
    f = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "timestamp": [5, 6]}).to_parquet(f)
    raw = load_interactions(f)
    assert raw.interactions["item_id"].tolist() == ["10", "11"]
    assert raw.interactions["timestamp"].dtype == "int64"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user_id,item_id\nu,a\n", "missing column(s) timestamp"),
        ("user_id,item_id,timestamp\nu,a,1\nu,b,yesterday\n", "line 3: bad timestamp 'yesterday'"),
        ("user_id,item_id,timestamp\nu,a,1\n,b,2\n", "line 3: empty user_id"),
        ("", "empty file"),
        ("user_id,item_id,timestamp\n", "no rows"),
    ],
)
def test_malformed_generic_file_names_file_and_problem(tmp_path, text, message):
    f = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as err:
        load_interactions(f)
    assert str(f) in str(err.value)
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere.csv: file not found"):
        load_path(tmp_path / "nowhere.csv")


def test_movielens_1m_dat_files(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    write(tmp_path / "movies.dat",
          "1193::One Flew (1975)::Drama\n661::James (1996)::Animation|Kids\n")
    raw = load_path(tmp_path / "ratings.dat")
    assert raw.name == "movielens-1m"
    assert raw.interactions["item_id"].tolist() == ["1193", "661"]
    movie = raw.items.set_index("item_id").loc["661"]
    assert (movie["title"], movie["year"], movie["categories"]) == ("James", 1996, "Animation|Kids")


def test_movielens_1m_bad_line_is_named(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(DataError, match=r"ratings.dat: line 2: expected 4"):
        load_movielens(tmp_path)


def test_movielens_25m_csv_files(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n296,"Pulp Fiction (1994)",Crime\n')
    raw = load_movielens(tmp_path)
    assert raw.interactions.iloc[0].tolist() == ["1", "296", 1147880044]
    assert raw.items.iloc[0]["title"] == "Pulp Fiction"


def test_amazon_reviews_and_metadata(tmp_path):
    reviews = tmp_path / "Books_5.json.gz"
    with gzip.open(reviews, "wt") as fh:
        fh.write(json.dumps({"reviewerID": "A1", "asin": "B1", "unixReviewTime": 100}) + "\n")
        fh.write(json.dumps({"reviewerID": "A1", "asin": "B2", "unixReviewTime": 50}) + "\n")
    meta = write(tmp_path / "meta.json",
                 json.dumps({"asin": "B1", "title": "A Book", "categories": [["Books", "SF"]]}))
    raw = load_path(reviews, meta)
    assert raw.interactions["timestamp"].tolist() == [100, 50]
    assert raw.items.set_index("item_id").loc["B1", "categories"] == "Books|SF"


def test_amazon_2023_format_timestamps_in_ms(tmp_path):
    f = write(tmp_path / "reviews.jsonl",
              json.dumps({"user_id": "U", "parent_asin": "P", "timestamp": 1588687728923}) + "\n")
    assert load_amazon(f).interactions["timestamp"].tolist() == [1588687728]


def test_amazon_bad_json_line_is_named(tmp_path):
    f = write(tmp_path / "r.json", '{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"r.json: line 2: not JSON"):
        load_amazon(f)


def test_taobao_keeps_page_views(tmp_path):
    f = write(tmp_path / "UserBehavior.csv",
              "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n")
    raw = load_path(f)
    assert raw.interactions["item_id"].tolist() == ["2268318"]
    assert raw.items.iloc[0]["categories"] == "2520377"


def test_taobao_short_line_is_named(tmp_path):
    f = write(tmp_path / "UserBehavior.csv", "1,2,3,pv,1511544070\n1,2,3\n")
    with pytest.raises(DataError, match="line 2"):
        load_taobao(f)
