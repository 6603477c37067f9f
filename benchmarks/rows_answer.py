"""One answer of the issue's user (The Silence of the Lambs, The Shawshank Redemption, Star
Wars, The Fellowship of the Ring, The Matrix, Toy Story) with interest rows, before and after
a filter (no Drama) and an unavailable item (Return of the Jedi): both apply to the list and
the rows alike. The app in-process (TestClient, in-memory stores) on a model store. Prints
JSON: ids and titles of the list and of each row.

    python benchmarks/rows_answer.py MODELS_DIR [--model recommender] > answer.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

HISTORY = ["593", "318", "260", "4993", "2571", "1"]  # MovieLens ids, oldest first
UNAVAILABLE = "1210"  # Star Wars: Episode VI - Return of the Jedi
FILTER = {"exclude": {"category": ["Drama"]}}


def brief(answer: dict[str, Any]) -> dict[str, Any]:
    return {"items": [[i["item_id"], i["title"]] for i in answer["items"]],
            "rows": [{"name": r["name"], "because": r["because_titles"],
                      "items": [[i["item_id"], i["title"]] for i in r["items"]]}
                     for r in answer["rows"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--model", default="recommender")
    args = parser.parse_args()
    app = create_app(Settings(models_dir=args.models_dir, model_name=args.model,
                              redis_url=None, log_level="WARNING"))
    body = {"user_id": "demo", "history": HISTORY, "k": 10, "rows": 4, "row_size": 5,
            "use_stored_history": False}
    with TestClient(app) as client:
        before = client.post("/recommend", json=body).raise_for_status().json()
        client.post("/items/availability",
                    json={"unavailable": [UNAVAILABLE]}).raise_for_status()
        after = client.post("/recommend",
                            json={**body, "filter": FILTER}).raise_for_status().json()
    shown = [i for part in (after["items"], *(r["items"] for r in after["rows"])) for i in part]
    print(json.dumps({"request": body, "unavailable": UNAVAILABLE, "filter": FILTER,
                      "unavailable_shown_after": any(i["item_id"] == UNAVAILABLE
                                                     for i in shown),
                      "before": brief(before), "after": brief(after)}, indent=1))


if __name__ == "__main__":
    main()
