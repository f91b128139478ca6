# syntax=docker/dockerfile:1
# refresher daemon image. Build from the repository root:
#   docker build -t ghcr.io/refresher-dev/refresher:0.1.0 .
# (Not built by CI: there is no container engine there. The Helm chart's default image
# ghcr.io/refresher-dev/refresher:<appVersion> refers to this file.)

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY refresher ./refresher
# constraints.txt pins every dependency at the versions the test suite passed with.
RUN python -m venv /opt/refresher \
 && /opt/refresher/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="refresher" \
      org.opencontainers.image.description="Token refresher daemon: short-lived API tokens kept fresh in files and Kubernetes Secrets" \
      org.opencontainers.image.source="https://github.com/refresher-dev/refresher" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/refresher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 refresher \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin refresher \
 && mkdir -p /etc/refresher /tokens \
 && chown 10001:10001 /tokens
COPY --from=build /opt/refresher /opt/refresher
# Numeric user so runAsNonRoot can verify it without resolving names.
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["refresher"]
CMD ["run", "--config", "/etc/refresher/config.yaml"]
