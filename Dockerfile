# prefect-exporter: a small image with the exporter and prefect-client only (no Prefect server).
# tests/test_image.py lints this file with hadolint and repeats its install steps (the COPY lines
# and the pip install of the build stage, then the entrypoint, as uid 10001), so keep them simple.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
# An unprivileged user; the exporter needs no write access except an optional state file.
RUN useradd --system --uid 10001 --no-create-home exporter
# prefect-client creates its home directory when imported; the user has none, and on Kubernetes
# the root filesystem is read-only with an emptyDir on /tmp (deploy/kubernetes/base).
ENV PREFECT_HOME=/tmp/prefect
USER 10001
EXPOSE 9716
HEALTHCHECK --interval=30s --timeout=5s \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9716/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["prefect-exporter"]
CMD ["--web.listen-address=:9716", "--log.format=json"]
