# Multi-stage build of resonance-task: the runtime image holds the binary and
# its default configuration only, and runs as a non-root user.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
RUN cargo build --release --locked --bin resonance-task

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/resonance-task /usr/local/bin/resonance-task
COPY config/task.yaml /etc/resonance-task/task.yaml
ENV RESONANCE_TASK_CONFIG=/etc/resonance-task/task.yaml
USER nonroot:nonroot
# Admin port: /metrics, /healthz, /readyz.
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/resonance-task"]
CMD ["run"]
