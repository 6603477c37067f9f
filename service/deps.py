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


def given_key(request: Request) -> str | None:
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:]
    return given


def same_key(given: str | None, expected: str | None) -> bool:
    return bool(given is not None and expected
                and secrets.compare_digest(given.encode(), expected.encode()))


async def require_api_key(request: Request, state: State) -> None:
    """With API_KEY set, every data route needs `X-API-Key` or `Authorization: Bearer`: the
    API key or the admin key (which opens every route)."""
    settings = state.settings
    if not settings.api_key:
        return
    given = given_key(request)
    if not (same_key(given, settings.api_key) or same_key(given, settings.admin_api_key)):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong API key",
                            headers={"WWW-Authenticate": "Bearer"})


async def require_admin_key(request: Request, state: State) -> None:
    """The routes that change state for everyone (availability, reloads, any user's history)
    or show the server's paths (GET /model) need ADMIN_API_KEY when it is set; without it they
    follow API_KEY like the data routes (and a non-loopback HOST refuses to start unless
    ALLOW_OPEN_ADMIN: service/settings.py)."""
    settings = state.settings
    if not settings.admin_api_key:
        await require_api_key(request, state)
        return
    given = given_key(request)
    if same_key(given, settings.admin_api_key):
        return
    if same_key(given, settings.api_key):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this is an admin route: it needs the "
                            "admin API key (ADMIN_API_KEY), not the data routes' API key")
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong admin API key (this "
                        "route needs ADMIN_API_KEY)", headers={"WWW-Authenticate": "Bearer"})


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
