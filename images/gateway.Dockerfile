# The gateway: one static (musl) binary on an empty base. No CUDA, no shell.
# Built by images/build.sh from the repository root.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
        -p llmctl-gateway --bin llmctl-gateway \
    && cp target/x86_64-unknown-linux-musl/release/llmctl-gateway /llmctl-gateway

FROM scratch
ARG VERSION=dev
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="llmctl-gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}"
COPY --from=build /llmctl-gateway /llmctl-gateway
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/llmctl-gateway"]
