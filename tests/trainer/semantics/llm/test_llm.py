"""LLM labelling: answer schema, cache, the OpenAI-compatible client against a real HTTP server
on loopback, the category baseline, and the local SmolLM2 backend on one real user."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer.semantics.llm.backends import LLMSettings, OpenAIChat
from trainer.semantics.llm.cache import ResponseCache
from trainer.semantics.llm.labellers import (
    METADATA_SOURCE,
    ORACLE_SOURCE,
    ChatLabeller,
    MetadataLabeller,
    OracleError,
    OracleLabeller,
    label_users,
    make_labeller,
)
from trainer.semantics.llm.prompt import AnswerSchema, PromptItem, build_messages, parse_answer

ITEMS = [PromptItem("Toy Story", 1995.0, ("Animation", "Comedy")),
         PromptItem("Heat", 1995.0, ("Action", "Crime")),
         PromptItem("Aladdin", 1992.0, ("Animation", "Musical")),
         PromptItem("Die Hard", 1988.0, ("Action", "Thriller"))]
GOOD = {"interests": [
    {"name": "Animated family films", "description": "Cartoons for all ages.", "items": [1, 3]},
    {"name": "Action thrillers", "description": "Heists and shootouts.", "items": [2, 4]}]}
SCHEMA = AnswerSchema(n_items=4, max_interests=4)


# --- answer schema ------------------------------------------------------------------------------


def test_parse_accepts_fenced_json_and_dedups_items():
    text = "Sure!\n```json\n" + json.dumps(
        {"interests": [{"name": " Action ", "description": "Guns.", "items": [2, 2, 4]}]}
    ) + "\n```"
    answer = parse_answer(text, SCHEMA)
    assert answer.interests[0].name == "Action"
    assert answer.interests[0].items == [2, 4]


@pytest.mark.parametrize(("payload", "message"), [
    ("not json at all", "no JSON object"),
    ('{"interests": [', "no JSON object"),
    ('{"interests": [{"name": "a", "description": "b", "items": [1],}]}', "invalid JSON"),
    ('{"interests": []}', "interests"),
    ('{"interests": [{"name": "  ", "description": "b", "items": [1]}]}', "name"),
    ('{"interests": [{"name": "a", "description": "b", "items": []}]}', "items"),
    ('{"interests": [{"name": "a", "description": "b", "items": [5]}]}', "not between 1 and 4"),
    ('{"interests": [{"name": "a", "description": "b", "items": ["x"]}]}', "items"),
    (json.dumps({"interests": [GOOD["interests"][0]] * 5}), "at most 4"),
])
def test_parse_rejects_with_a_message_fit_for_a_repair_prompt(payload, message):
    with pytest.raises(ValueError, match=message):
        parse_answer(payload, SCHEMA)


def test_prompt_lists_items_with_numbers_year_and_categories():
    user = build_messages(ITEMS, 3)[-1]["content"]
    assert "1. Toy Story (1995) [Animation, Comedy]" in user
    assert "4. Die Hard (1988) [Action, Thriller]" in user
    assert "1 to 3" in user


def test_cache_is_keyed_by_model_and_messages(tmp_path):
    cache = ResponseCache(tmp_path)
    messages = build_messages(ITEMS, 4)
    cache.put("model-a", messages, "answer-a")
    assert cache.get("model-a", messages) == "answer-a"
    assert cache.get("model-b", messages) is None
    assert cache.get("model-a", build_messages(ITEMS[:3], 4)) is None


# --- a chat-completions server on loopback ------------------------------------------------------


class ChatServer:
    """Speaks POST /v1/chat/completions; answers from a script, one step per request:
    ("answer", text) | ("status", code) | ("sleep", seconds, text)."""

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    step = server.script.pop(0) if server.script else ("answer", json.dumps(GOOD))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self.counted = True
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": "not found"})
                    if step[0] == "status":
                        return self._send(step[1], {"error": {"message": "busy"}},
                                          {"Retry-After": "0"})
                    if step[0] == "sleep":
                        time.sleep(step[1])
                        step = ("answer", step[2])
                    return self._send(200, {
                        "id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": step[1]}}]})
                finally:
                    self._leave()

            def _leave(self):
                """No longer in flight: before the answer is written, or the client's next
                request (sent as soon as it reads this one's answer) could be counted while
                this thread has not yet left, an overlap the client never made."""
                if self.counted:
                    self.counted = False
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, payload, headers=None):
                self._leave()
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    server = ChatServer()
    yield server
    server.close()


def openai_labeller(server: ChatServer, cache_dir, sleeps: list[float] | None = None,
                    **settings) -> ChatLabeller:
    config = LLMSettings(base_url=server.url, model="test-model", api_key="sk-test",
                         cache_dir=cache_dir, backoff_s=0.01, **settings)
    record = sleeps.append if sleeps is not None else (lambda s: None)
    return ChatLabeller(OpenAIChat(config, sleep=record), ResponseCache(cache_dir), 4)


def test_openai_success(chat_server, tmp_path):
    labeller = openai_labeller(chat_server, tmp_path)
    interests = labeller.label(ITEMS)
    assert [i.name for i in interests] == ["Animated family films", "Action thrillers"]
    assert [i.items for i in interests] == [[0, 2], [1, 3]]  # 0-based positions
    assert len(chat_server.requests) == 1
    sent = chat_server.requests[0]
    assert sent["model"] == "test-model" and sent["temperature"] == 0
    assert "1. Toy Story (1995)" in sent["messages"][-1]["content"]
    assert chat_server.headers[0]["authorization"] == "Bearer sk-test"
    assert labeller.stats.calls == 1 and labeller.stats.repaired == 0


def test_openai_malformed_answer_then_repair(chat_server, tmp_path):
    chat_server.script = [("answer", '{"interests": [{"name": "Action", "items": [2, 9]}'),
                          ("answer", json.dumps(GOOD))]
    labeller = openai_labeller(chat_server, tmp_path)
    interests = labeller.label(ITEMS)
    assert interests is not None and len(interests) == 2
    assert len(chat_server.requests) == 2
    repair = chat_server.requests[1]["messages"]
    assert repair[-2]["role"] == "assistant" and "Action" in repair[-2]["content"]
    assert "not valid" in repair[-1]["content"]
    assert labeller.stats.repaired == 1


def test_openai_invalid_twice_skips_the_user_and_counts_it(chat_server, tmp_path):
    three = {"interests": [{"name": "Animation", "description": "Cartoons.", "items": [1, 3]}]}
    chat_server.script = [("answer", "no idea"), ("answer", "still no idea"),
                          ("answer", json.dumps(three))]
    labeller = openai_labeller(chat_server, tmp_path, concurrency=1)
    results, stats = label_users(labeller, [ITEMS, ITEMS[:3]], progress=False)
    assert results[0] is None and results[1] is not None
    assert (stats.users, stats.labelled, stats.failed) == (2, 1, 1)
    assert "invalid after repair" in stats.failures[0]


def test_openai_timeout_is_retried(chat_server, tmp_path):
    chat_server.script = [("sleep", 1.0, json.dumps(GOOD))]
    sleeps: list[float] = []
    labeller = openai_labeller(chat_server, tmp_path, sleeps, timeout_s=0.2, max_retries=2)
    interests = labeller.label(ITEMS)
    assert interests is not None
    assert len(chat_server.requests) == 2 and len(sleeps) == 1
    assert labeller.backend.requests == 2


def test_openai_gives_up_after_bounded_retries(chat_server, tmp_path):
    chat_server.script = [("status", 500)] * 10
    sleeps: list[float] = []
    labeller = openai_labeller(chat_server, tmp_path, sleeps, max_retries=2)
    assert labeller.label(ITEMS) is None
    assert len(chat_server.requests) == 3  # first try + 2 retries
    assert sleeps[1] > sleeps[0]  # exponential backoff
    assert labeller.stats.errors == 1 and "HTTP 500" in labeller.stats.failures[0]


@pytest.mark.parametrize("code", [429, 500, 503])
def test_openai_retries_throttling_and_server_errors(chat_server, tmp_path, code):
    chat_server.script = [("status", code), ("status", code)]
    sleeps: list[float] = []
    labeller = openai_labeller(chat_server, tmp_path, sleeps)
    assert labeller.label(ITEMS) is not None
    assert len(chat_server.requests) == 3 and len(sleeps) == 2


def test_openai_client_errors_are_not_retried(chat_server, tmp_path):
    chat_server.script = [("status", 401)]
    labeller = openai_labeller(chat_server, tmp_path)
    assert labeller.label(ITEMS) is None
    assert len(chat_server.requests) == 1
    assert "HTTP 401" in labeller.stats.failures[0]


def test_openai_second_run_is_served_from_the_cache(chat_server, tmp_path):
    chat_server.script = [("answer", "oops"), ("answer", json.dumps(GOOD))]
    first = openai_labeller(chat_server, tmp_path)
    assert first.label(ITEMS) is not None
    assert len(chat_server.requests) == 2
    second = openai_labeller(chat_server, tmp_path)  # a new run, same cache directory
    again = second.label(ITEMS)
    assert [i.name for i in again] == ["Animated family films", "Action thrillers"]
    assert len(chat_server.requests) == 2  # no new request: the answer and its repair cached
    assert (second.stats.calls, second.stats.cached) == (0, 2)


def test_openai_concurrency_is_limited(chat_server, tmp_path):
    chat_server.script = [("sleep", 0.1, json.dumps(GOOD))] * 6
    labeller = openai_labeller(chat_server, tmp_path, concurrency=2)
    users = [[*ITEMS, PromptItem(f"film {i}", None, ())] for i in range(6)]
    results, stats = label_users(labeller, users, progress=False)
    assert all(r is not None for r in results) and stats.calls == 6
    assert chat_server.max_in_flight == 2


def test_openai_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_BASE_URL", "http://llm.internal:9000/v1")
    monkeypatch.setenv("LLM_MODEL", "qwen")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    settings = LLMSettings()
    assert settings.base_url == "http://llm.internal:9000/v1" and settings.model == "qwen"
    assert settings.api_key.get_secret_value() == "sk-env"


# --- metadata baseline --------------------------------------------------------------------------


def test_metadata_labeller_uses_categories_and_says_so():
    labeller = MetadataLabeller(max_interests=4)
    interests = labeller.label(ITEMS)
    assert [i.name for i in interests] == ["Action", "Animation"]
    assert [i.items for i in interests] == [[1, 3], [0, 2]]
    assert labeller.stats.source == METADATA_SOURCE and labeller.stats.backend == "metadata"


# --- oracle (true planted topics of synthetic data) ---------------------------------------------


def test_oracle_returns_every_true_topic_of_the_items():
    items = [PromptItem(f"item {n}", None, (f"topic-{t}",))
             for n, t in enumerate([7, 2, 7, 5, 2, 7, 9])]
    labeller = make_labeller("oracle", max_interests=4)
    interests = labeller.label(items)
    # Largest group first; every item sits in the group of its own topic.
    assert [(i.name, i.items) for i in interests] == [
        ("topic-7", [0, 2, 5]), ("topic-2", [1, 4]), ("topic-5", [3]), ("topic-9", [6])]
    assert all("true planted topic" in i.description for i in interests)
    assert labeller.stats.source == ORACLE_SOURCE and labeller.stats.backend == "oracle"
    # At most K: the smallest groups (ties: the later first item) are left out.
    assert [i.name for i in OracleLabeller(2).label(items)] == ["topic-7", "topic-2"]


def test_oracle_uses_the_topics_the_synthetic_generator_planted(tiny_dataset):
    from trainer.semantics.esim.typical_users import last_histories, prompt_items

    user = tiny_dataset.train_users[:1]
    history = last_histories(tiny_dataset, user, 20)[0]
    history = history[history > 0]
    truth = [str(tiny_dataset.categories[i]) for i in history]  # written by make_synthetic
    interests = OracleLabeller(10).label(prompt_items(tiny_dataset, history))
    assert sorted(i.name for i in interests) == sorted(set(truth))
    assert {n: i.name for i in interests for n in i.items} == dict(enumerate(truth))


def test_oracle_refuses_items_without_a_planted_topic(tiny_dataset):
    from dataclasses import replace

    from trainer.config import TrainConfig
    from trainer.semantics.esim.setup import esim_setup

    with pytest.raises(OracleError, match="needs synthetic data"):
        OracleLabeller(4).label(ITEMS)  # MovieLens-like items: genres, no true topic
    movies = replace(tiny_dataset, categories=tiny_dataset.categories.astype(object))
    movies.categories[5] = "Comedy|Drama"
    cfg = TrainConfig(esim=True, llm="oracle")
    with pytest.raises(OracleError, match="'Comedy', 'Drama'"):  # before any training
        esim_setup(movies, cfg, None, progress=False)


# --- local SmolLM2 on one real user -------------------------------------------------------------


@pytest.mark.slow
def test_local_backend_labels_a_real_user_with_a_valid_answer(tmp_path):
    from trainer.data.dataset import build_dataset
    from trainer.data.specs import load_spec
    from trainer.semantics.esim.typical_users import prompt_items
    from trainer.semantics.llm.local import LocalChat

    dataset = build_dataset(load_spec({"dataset": "movielens-small"}))
    user = dataset.train_users[0]
    history = dataset.sequence(user)[-20:]
    items = prompt_items(dataset, history)
    labeller = ChatLabeller(LocalChat(), ResponseCache(tmp_path), 4)
    interests = labeller.label(items)
    assert interests is not None and labeller.stats.calls == 1
    assert labeller.stats.repaired == 0  # constrained decoding: valid at the first answer
    raw = labeller.cache.get(labeller.backend.model_id, build_messages(items, 4))
    answer = parse_answer(raw, AnswerSchema(len(items), 4))  # raises unless schema-valid
    assert 1 <= len(answer.interests) <= 4
    assert all(1 <= i <= len(items) for a in answer.interests for i in a.items)
    assert [i.name for i in interests] == [a.name for a in answer.interests]
