#!/usr/bin/env bash
# The main job: starts sigil on this machine with embedded defaults and shows an identity being issued.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-deps.sh
cargo build --release --locked -p sigil-cli
exec ./target/release/sigil demo "$@"
