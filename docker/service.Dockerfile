# The online service: serving dependencies only (no torch), non-root, health-checked.
# Build from the repository root: docker build -f docker/service.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
# The base install is the serving stack; the [train] extra (torch) is never installed here.
RUN pip install . && python -c "import importlib.util as u; assert u.find_spec('torch') is None"

RUN useradd --create-home --uid 10001 recsys
USER recsys

ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODELS_DIR=/models \
    MODEL_NAME=recommender
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"

CMD ["python", "-m", "service"]
