# The lastgasp binary (agent and controller) in one image.
#
# With a registry, from the workspace root:
#   docker build -t <registry>/lastgasp:<tag> .
# Without one, `cargo xtask image` builds this same file with podman from local images: the
# binary cargo built (BINARY=prebuilt) on a Debian base made with debootstrap and tagged with
# BASE_IMAGE's name.
#
# Build arguments:
#   BASE_IMAGE  Debian bookworm image the run-time files are taken from (default below).
#   RUST_IMAGE  the image the `builder` stage compiles in (default below).
#   BINARY      `builder` (default): compile in RUST_IMAGE; `prebuilt`: copy
#               target/release/lastgasp, built on a bookworm (glibc 2.36) host.
ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-bookworm
ARG BINARY=builder

# The workspace's rust-version, on Debian bookworm (the glibc the binary is linked against).
FROM ${RUST_IMAGE} AS builder
# What `cargo xtask setup` installs for the eBPF programs, which agent/build.rs compiles: the
# nightly pinned in agent-ebpf/rust-toolchain.toml with rust-src, and bpf-linker 0.10.3 (it
# links with rustc's own LLVM).
WORKDIR /src
COPY . .
RUN nightly="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' agent-ebpf/rust-toolchain.toml)" \
 && rustup toolchain install "$nightly" --profile minimal --component rust-src \
 && cargo install bpf-linker --version 0.10.3 --locked --force \
 && cargo build --release --locked -p lastgasp \
 && install -D -m 0755 target/release/lastgasp /out/lastgasp

FROM scratch AS prebuilt
COPY target/release/lastgasp /out/lastgasp

FROM ${BINARY} AS binary

# The image's files, gathered from a Debian system: only what the binary uses at run time.
FROM ${BASE_IMAGE} AS rootfs
# - ca-certificates: kube's rustls client loads the system's CA roots before adding the
#   cluster's own CA, and fails without any.
# - kmod: the agent runs `modprobe netconsole` when the module is not loaded (with the host's
#   /lib/modules mounted).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binary /out/lastgasp /rootfs/usr/local/bin/lastgasp
# The two programs, their shared libraries (glibc and what kmod links), the CA bundle, and
# modprobe as kmod's multi-call name. Nothing else: no shell, no package manager.
# Libraries are copied to their directory's real path (merged /usr) with the base's top-level
# links (/lib -> usr/lib, ...), so the paths the binaries were linked with resolve as in Debian.
RUN set -e; \
    cp -a --parents /usr/bin/kmod /etc/ssl/certs/ca-certificates.crt /rootfs; \
    mkdir -p /rootfs/usr/sbin && ln -s ../bin/kmod /rootfs/usr/sbin/modprobe; \
    for lib in $({ ldd /rootfs/usr/local/bin/lastgasp; ldd /usr/bin/kmod; } | grep -o '/[^ ]*' | sort -u); do \
      dir="/rootfs$(realpath "$(dirname "$lib")")"; \
      mkdir -p "$dir" && cp -L "$lib" "$dir/"; \
    done; \
    for link in /lib /lib64 /bin /sbin; do \
      if [ -L "$link" ]; then cp -a "$link" /rootfs/; fi; \
    done

FROM scratch
COPY --from=rootfs /rootfs /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin
# Root by default, which the agent needs to load eBPF; deploy/base runs the controller as
# user 65532.
ENTRYPOINT ["/usr/local/bin/lastgasp"]
