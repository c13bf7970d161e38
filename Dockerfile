# kiln: the coordinator image, and the helper image of build pods (their init container runs
# `/usr/local/bin/kiln agent prepare`, which copies this static binary into the pod and fetches
# the sources with git).
#
#   docker build -t ghcr.io/kiln-ci/kiln:0.1.0 .
#
# Multi-arch (amd64 and arm64 nodes: Graviton, Ampere, Yitian), one manifest list:
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/kiln-ci/kiln:0.1.0 --push .
#
# Each platform's build stage runs on that platform (natively, or under QEMU on another), so
# its binary is the platform's own. A node pulls the variant of its architecture, and the init
# container copies that binary into the job's image: the agent always matches the node.

FROM rust:1.95-alpine AS build
# Set by buildx for the platform being built (`amd64`, `arm64`); plain `docker build` builds
# the host's.
ARG TARGETARCH
# musl-dev for the static link; cmake, perl and clang build aws-lc (kube's rustls backend).
RUN apk add --no-cache musl-dev cmake perl clang make
WORKDIR /src
COPY . .
# `dist`: the release profile with thin LTO (Cargo.toml), for what ships.
RUN case "${TARGETARCH:-$(uname -m)}" in \
        amd64|x86_64) target=x86_64-unknown-linux-musl ;; \
        arm64|aarch64) target=aarch64-unknown-linux-musl ;; \
        *) echo "unsupported architecture ${TARGETARCH:-$(uname -m)}" >&2; exit 1 ;; \
    esac \
    && cargo build --profile dist --locked --target "$target" --bin kiln \
    && cp "target/$target/dist/kiln" /kiln

FROM alpine:3.22
# git (with git-lfs, for LFS files and submodules' LFS files) fetches the sources in build
# pods; CA certificates for GitLab, Jenkins and cloud APIs (rustls reads the system store).
RUN apk add --no-cache git git-lfs ca-certificates \
    && adduser -D -H -u 10001 -g kiln kiln
COPY --from=build /kiln /usr/local/bin/kiln
USER 10001:10001
EXPOSE 9252
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["run"]
