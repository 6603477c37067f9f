"""Application state and FastAPI dependencies."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.ab.attribution import AttributionStore
from service.observability import Metrics
from service.serving.batching import Batcher
from service.serving.model_manager import ModelManager
from service.serving.recommender import DEFAULT_SHAPING, Recommender, Shaping
from service.serving.variants import Variant, Variants
from service.settings import Settings
from service.store.availability import Availability, InMemoryAvailabilityStore
from service.store.history import HistoryStore


@dataclass
class AppState:
    settings: Settings
    store: HistoryStore
    variants: Variants  # the served models, one per A/B variant (service/serving/variants.py)
    attribution: AttributionStore  # which variant served which request (service/ab/)
    metrics: Metrics
    availability: Availability = field(
        default_factory=lambda: Availability(InMemoryAvailabilityStore()))
    batcher: Batcher | None = None  # None: each request computed alone
    shaping: Shaping = DEFAULT_SHAPING  # how interests shape answers (from the settings)

    @property
    def models(self) -> ModelManager:
        """The control's (first variant's) models: the one model without A/B."""
        return self.variants.primary.models


# The dependencies are `async def`: FastAPI runs a plain `def` dependency in its thread pool,
# two thread hops per request that cost more than the work they do.
async def get_state(request: Request) -> AppState:
    return request.app.state.recsys


State = Annotated[AppState, Depends(get_state)]


async def require_api_key(request: Request, state: State) -> None:
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


async def get_recommender(state: State) -> Recommender:
    """The control's model (the only one without A/B), or 503 while it has none."""
    return variant_model(state.variants.primary)


ServedModel = Annotated[Recommender, Depends(get_recommender)]


def variant_model(variant: Variant) -> Recommender:
    """The model a variant serves now, or 503 while it has none (its users are not served
    by another variant: that would blur the comparison)."""
    current = variant.models.current
    if current is None:
        # Not the models folder (a server path): the log names it at start and at each load.
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"no model loaded yet for variant {variant.name!r}; retry later")
    return current
