# Build: docker build -t transfer-worker .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY lua ./lua
COPY benches ./benches
RUN cargo build --release --locked --bin transfer-worker

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 transfer
COPY --from=build /src/target/release/transfer-worker /usr/local/bin/transfer-worker
COPY config/default.toml /etc/transfer-worker/default.toml
USER transfer
# 8088: callback relay (public); 9090: health, readiness, metrics (keep internal).
EXPOSE 8088 9090
ENTRYPOINT ["transfer-worker"]
CMD ["run"]
