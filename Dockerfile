# Tally's image: tally-edge, tally-query and tally, built in a Rust image and run from a small
# Debian runtime as an unprivileged user. The entry point is tally-edge; run the query service
# with `--entrypoint tally-query` (deploy/compose.yaml and deploy/k8s/ do).
#
#   docker build -t tally .
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p edge -p query -p tally --bins \
 && mkdir /out \
 && cp target/release/tally-edge target/release/tally-query target/release/tally /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tally --create-home tally
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/tally
# The embedded database (when DATABASE_URL is unset) lives in the user's home; logs are JSON
# lines for collectors.
ENV TALLY_DATA_DIR=/var/lib/tally/data \
    TALLY_LOG_FORMAT=json
# 7000 binary protocol, 8000 ingest HTTP (and /metrics), 8002 query HTTP (and /metrics).
EXPOSE 7000 8000 8002
ENTRYPOINT ["tally-edge"]
