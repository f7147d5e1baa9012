# The executor: the `llmctl` binary on a pinned CUDA 13.0 runtime (cuBLAS, NVRTC; the driver
# comes from the node). CUDA is loaded at run time, so the same image serves on CPU nodes.
# A small random model is baked in at /models/tiny for the example CPU pool.
# Built by images/build.sh from the repository root.
ARG CUDA_TAG=13.0.0-runtime-ubuntu24.04

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin llmctl \
    && cp target/release/llmctl /llmctl \
    && /llmctl model init --preset tiny --out /models/tiny

FROM nvidia/cuda:${CUDA_TAG}
ARG CUDA_TAG
ARG VERSION=dev
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="llmctl-worker" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      io.llmctl.cuda-base="nvidia/cuda:${CUDA_TAG}" \
      io.llmctl.cuda-version="13.0"
COPY --from=build /llmctl /usr/local/bin/llmctl
COPY --from=build /models/tiny /models/tiny
# NVRTC's compiled-kernel cache (kernels/src/compile.rs) needs a writable home.
ENV HOME=/tmp
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/llmctl"]
CMD ["worker", "--model", "/models/tiny", "--host", "0.0.0.0", "--port", "8000"]
