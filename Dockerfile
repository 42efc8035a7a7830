# syntax=docker/dockerfile:1
#
# etp container image: build with the Rust toolchain, run on debian:bookworm-slim with only
# the two shared libraries etp links (libnftnl, libmnl) besides glibc.
#
#   docker build -t etp:0.1.0 .
#
# The image runs as uid 65532, not root. etp needs CAP_NET_ADMIN and CAP_NET_BIND_SERVICE; the pod
# (deploy/kubernetes/daemonset.yaml) adds exactly those and drops the rest. Kubernetes gives a
# non-root container no ambient capabilities, so the added ones would be lost at execve; the
# binary therefore carries them as file capabilities (setcap ...+ep, below). The kernel grants
# file capabilities only when they are in the container's bounding set, so the image confers
# nothing a pod did not add: run it without them and execve fails with EPERM.
# allowPrivilegeEscalation: false (no_new_privs) does not block this, because the runtime
# already put those capabilities in the process's permitted set before execve.

FROM rust:1-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl-dev libmnl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole context (see .dockerignore): Cargo.toml names test and example targets under
# integration/, and deploy/etp.default.toml is compiled in as the embedded default.
COPY . .
RUN cargo build --release --locked --bin etp \
 && strip target/release/etp

FROM debian:bookworm-slim
COPY --from=build /src/target/release/etp /usr/local/bin/etp
COPY deploy/etp.default.toml /etc/etp/etp.toml
# One layer: runtime libraries, the file capabilities, then setcap's package is removed again.
# /run/etp holds the pid file that `etp reload` (and the pod's reload sidecar) reads.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnftnl11 libmnl0 libcap2-bin \
 && setcap cap_net_admin,cap_net_bind_service+ep /usr/local/bin/etp \
 && apt-get purge -y --auto-remove libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/etp \
 && chown 65532:65532 /run/etp
USER 65532:65532
# TPROXY listener (TCP and UDP) and the admin endpoint (/metrics /ready /live).
EXPOSE 15001/tcp 15001/udp 15002/tcp
ENTRYPOINT ["/usr/local/bin/etp"]
CMD ["run", "-c", "/etc/etp/etp.toml"]
