# The pool controller: one static (musl) binary on an empty base. No CUDA, no shell. It reaches
# the Kubernetes API with the pod's service account (its CA comes from the mounted token).
# Built by images/build.sh from the repository root.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
        -p llmctl-pool-controller --bin llmctl-controller \
    && cp target/x86_64-unknown-linux-musl/release/llmctl-controller /llmctl-controller

FROM scratch
ARG VERSION=dev
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="llmctl-controller" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}"
COPY --from=build /llmctl-controller /llmctl-controller
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/llmctl-controller"]
