# The load balancer of the `replicas` compose profile: Debian's HAProxy package with
# docker/haproxy.cfg. Build from the repository root: docker build -f docker/haproxy.Dockerfile .
# Any Debian base works; python:3.11-slim (Debian) is the base the other two images already
# use, and its python runs the health check (the slim images have no curl).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# policy-rc.d: the package must not try to start a haproxy service inside the build.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* \
    && haproxy -v

COPY docker/haproxy.cfg /usr/local/etc/haproxy/haproxy.cfg
# Compose's addresses; the config reads them from the environment.
ENV LB_BIND=:8080 \
    API_1_ADDR=api:8000 \
    API_2_ADDR=api-2:8000
# Checked at build time (names that do not resolve here are only warnings: init-addr).
RUN haproxy -c -q -f /usr/local/etc/haproxy/haproxy.cfg

# The Debian package's unprivileged user; 8080 needs no privilege.
USER haproxy
EXPOSE 8080

# Healthy while the balancer answers /readyz through at least one ready replica.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"

# SIGUSR1 is HAProxy's graceful stop: no new connections, answers in progress finish
# (hard-stop-after in the config bounds the wait). -db: foreground, logs on stdout.
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
