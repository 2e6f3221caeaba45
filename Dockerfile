# Multi-stage build of resonance-task. The default (last) stage is the
# production image: the `resonance-task` binary without the developer
# tools (run, notify, migrate, dlq, offline, check-config), its default
# configuration, a non-root user. The `dev` stage adds the reference
# gateway, seed, publish, workload, chaos and bench commands for the
# compose stack:
#   docker build -t resonance-task:local .
#   docker build --target dev -t resonance-task-dev:local .
# The protos compile with protox, so no protoc is needed.
FROM rust:1.95-bookworm AS source
# Symbols stay, debug line tables (kept locally for profiling) do not:
# they would be five sixths of the binary.
ENV CARGO_PROFILE_RELEASE_DEBUG=false
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
COPY migrations migrations

FROM source AS build-pod
RUN cargo build --release --locked -p resonance-task-cli --no-default-features --bin resonance-task

FROM source AS build-dev
RUN cargo build --release --locked -p resonance-task-cli --bin resonance-task

# What both images share: the default configuration and a non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY config/task.yaml /etc/resonance-task/task.yaml
ENV RESONANCE_TASK_CONFIG=/etc/resonance-task/task.yaml
USER nonroot:nonroot
# Admin port: /metrics, /healthz, /readyz.
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/resonance-task"]
CMD ["run"]

FROM runtime AS dev
COPY --from=build-dev /src/target/release/resonance-task /usr/local/bin/resonance-task

FROM runtime AS pod
COPY --from=build-pod /src/target/release/resonance-task /usr/local/bin/resonance-task
