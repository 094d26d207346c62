# The streametl worker image (used by docker-compose.yml).
FROM python:3.11-slim
WORKDIR /srv/streametl
COPY pyproject.toml README.md ./
COPY app ./app
COPY agents ./agents
COPY tables ./tables
COPY web ./web
COPY operators ./operators
COPY bench ./bench
COPY config ./config
RUN pip install --no-cache-dir .
ENV STREAMETL_WEB_HOST=0.0.0.0 \
    STREAMETL_DATA_DIR=/var/lib/streametl \
    STREAMETL_PIPELINES_FILE=/srv/streametl/config/pipelines.yaml
EXPOSE 6066
CMD ["streametl", "worker", "-l", "info"]
