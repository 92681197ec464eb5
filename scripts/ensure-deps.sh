#!/usr/bin/env bash
# Installs the Debian packages sigil's build needs when they are missing (protoc for gRPC code, clang for eBPF).
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/struct.proto ] || need+=(libprotobuf-dev)
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || need+=(iproute2)
# sigil-netd benchmarks: iperf3 throughput and the nftables baseline.
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v nft >/dev/null 2>&1 || need+=(nftables)
# Attack tests run commands as another user (setpriv), under limits (prlimit), in new namespaces (unshare), and
# send crafted packets from the system Python as an unprivileged user.
command -v setpriv >/dev/null 2>&1 && command -v prlimit >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1 ||
  need+=(util-linux)
[ -x /usr/bin/python3 ] || need+=(python3)
# sigil-kvstore tests and multi-node netd: a private etcd (3.4) per test.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# Metrics tests check every daemon's /metrics text with promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# netd's service map (tests/tests/service_map.rs): the page rendered by a real headless browser.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]} — install them with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# gRPC interop tests (tests/tests/grpc_interop.rs): Python grpcio (gRPC C-core) and grpcio-tools for stubs.
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: grpcio grpcio-tools — install them with: python3 -m pip install grpcio==1.85.1 grpcio-tools==1.85.1" >&2
    exit 1
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3-pip >/dev/null
  fi
  echo "installing grpcio grpcio-tools" >&2
  # Debian marks its Python as externally managed; these are test-only packages for root's interpreter.
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --break-system-packages \
    grpcio==1.85.1 grpcio-tools==1.85.1 >/dev/null 2>&1 ||
    python3 -m pip install -q --disable-pip-version-check grpcio==1.85.1 grpcio-tools==1.85.1
fi
