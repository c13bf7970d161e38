# kiln: the coordinator image, and the helper image of build pods (their init container runs
# `/usr/local/bin/kiln agent prepare`, which copies this static binary into the pod and fetches
# the sources with git).
#
#   docker build -t ghcr.io/kiln-ci/kiln:0.1.0 .

FROM rust:1.95-alpine AS build
# musl-dev for the static link; cmake, perl and clang build aws-lc (kube's rustls backend).
RUN apk add --no-cache musl-dev cmake perl clang make
WORKDIR /src
COPY . .
# `dist`: the release profile with thin LTO (Cargo.toml), for what ships.
RUN cargo build --profile dist --locked --target x86_64-unknown-linux-musl --bin kiln \
    && cp target/x86_64-unknown-linux-musl/dist/kiln /kiln

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
