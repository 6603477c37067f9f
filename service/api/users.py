"""GET /users/{user_id}/history/titles: the stored history with the served model's titles (the
web page shows titles; GET /users/{user_id}/history has ids only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from service.api import events  # noqa: F401 (registers the {x:anyid} path convertor)
from service.deps import State, require_api_key
from service.schemas import ERROR_RESPONSES, UserIdPath
from service.serving.recommender import Recommender

router = APIRouter(tags=["events"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


class TitledItem(BaseModel):
    item_id: str
    title: str | None = Field(description="null: not in the served catalogue, or untitled")


class TitledHistoryResponse(BaseModel):
    user_id: str
    model_version: int | None = Field(description="the model whose titles these are; null: "
                                                  "no model loaded yet (titles all null)")
    items: list[TitledItem] = Field(description="oldest first, as GET /users/{user_id}/history")


# {user_id:anyid} as in service/api/events.py: an id may hold "/". The fixed suffix keeps the
# two routes apart (".../history" vs ".../history/titles").
@router.get("/users/{user_id:anyid}/history/titles", response_model=TitledHistoryResponse)
async def titled_history(user_id: UserIdPath, state: State) -> TitledHistoryResponse:
    items = await state.store.history(user_id)  # StoreUnavailable -> 503 (service/app.py)
    model = state.models.current  # none yet is not an error: only the titles are null
    return TitledHistoryResponse(
        user_id=user_id, model_version=model.version if model is not None else None,
        items=[TitledItem(item_id=i, title=title_of(model, i)) for i in items])


def title_of(model: Recommender | None, item_id: str) -> str | None:
    row = model.internal.get(item_id) if model is not None else None
    if model is None or row is None:
        return None
    return str(model.bundle.titles[row - 1]) or None  # "" in the id map: untitled
