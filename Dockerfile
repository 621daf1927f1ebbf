# Image with the example shop's services: orders-service (default command),
# thumbnail-service and shop-publisher. Build from the repository root:
#
#   docker build -t conejo-example-shop .
#   docker run --rm -e CONEJO_URL=amqp://guest:guest@host:5672/%2f conejo-example-shop
#   docker run --rm -e CONEJO_URL=… conejo-example-shop orders-service check
#
# docker-compose.yml runs it next to a RabbitMQ broker.

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p example-shop --bins

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 conejo \
    && useradd --system --uid 10001 --gid conejo --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin conejo
COPY --from=build \
    /src/target/release/orders-service \
    /src/target/release/thumbnail-service \
    /src/target/release/shop-publisher \
    /usr/local/bin/
# The services' log filter (CONEJO_LOG_LEVEL, when set, wins over it).
ENV RUST_LOG=info,lapin=off
# Numeric, so that runtimes enforcing "run as non-root" can check it.
USER 10001:10001
# The services drain in-flight deliveries and close cleanly on SIGTERM.
STOPSIGNAL SIGTERM
CMD ["orders-service"]
