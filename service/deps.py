"""Application state and FastAPI dependencies."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.batching import Batcher
from service.history import HistoryStore
from service.models import ModelManager
from service.observability import Metrics
from service.recommender import Recommender
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    store: HistoryStore
    models: ModelManager
    metrics: Metrics
    batcher: Batcher | None = None  # None: each request computed alone


def get_state(request: Request) -> AppState:
    return request.app.state.recsys


State = Annotated[AppState, Depends(get_state)]


def require_api_key(request: Request, state: State) -> None:
    """With API_KEY set, every data route needs `X-API-Key` or `Authorization: Bearer`."""
    expected = state.settings.api_key
    if not expected:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:]
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


def get_recommender(state: State) -> Recommender:
    current = state.models.current
    if current is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"no model loaded yet (waiting for a bundle in {state.models.root})")
    return current


ServedModel = Annotated[Recommender, Depends(get_recommender)]
