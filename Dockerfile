# K2 code location, Dagster webserver/daemon and the Binance producer share this image.
FROM python:3.11-slim
WORKDIR /opt/k2
COPY pyproject.toml setup.py README.md workspace.yaml dagster.yaml ./
COPY schemas ./schemas
COPY k2_assets ./k2_assets
COPY docker ./docker
# pg_dump and pg_restore for the catalog backups (catalog_backup_job, `k2 catalog backup|restore`); a C compiler
# only while pip builds the vendor-file scanner (k2_assets/core/vendor_scan.c), removed in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client gcc libc6-dev \
 && pip install --no-cache-dir -e . \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home k2 && mkdir -p /opt/dagster /backups && chown k2 /backups && cp docker/dagster.yaml /opt/dagster/dagster.yaml && chown -R k2 /opt/dagster
USER k2
ENV DAGSTER_HOME=/opt/dagster K2_HOME=/home/k2/.k2
