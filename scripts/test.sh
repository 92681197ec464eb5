#!/usr/bin/env bash
# Runs sigil's whole test suite (unit, integration and end-to-end tests with real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-deps.sh
cargo test --workspace --locked
