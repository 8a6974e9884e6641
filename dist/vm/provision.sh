#!/bin/sh
# Provisions a Debian 12 VM to build and test the enforcer, as root; run by lima.yaml and
# the Vagrantfile. Everything else (bpf-linker, nightly rust-src, test packages, qemu for
# `cargo xtask vm-test`) is installed by `cargo xtask test` itself.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends build-essential ca-certificates curl git pkg-config
if [ ! -x /root/.cargo/bin/rustup ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        HOME=/root sh -s -- -y --profile minimal --default-toolchain stable
fi
HOME=/root /root/.cargo/bin/rustup toolchain install nightly --profile minimal --component rust-src
HOME=/root /root/.cargo/bin/rustup component add clippy rustfmt --toolchain stable
