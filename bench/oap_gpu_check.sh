#!/usr/bin/env bash
# Every GPU check of the OAP pseudo-mask issue in one run (for a session lent a CUDA device):
#   1. the static path's tests on CUDA (sync-debug mode "error" around the layer loop, GPU == CPU masks);
#   2. `labelwise bench oap --device cuda`: OAP at 56x56, batch 16, ms per image without the backbone.
# Usage: bash bench/oap_gpu_check.sh [OUT_DIR]   (writes OUT_DIR/oap_gpu.json and the test log)
set -euo pipefail
out="${1:-bench}"
mkdir -p "$out"
python -m pytest -q tests/test_oap_static.py -k "cuda or static_equals" 2>&1 | tee "$out/oap_gpu_tests.log"
labelwise bench oap --device cuda --json "$out/oap_gpu.json" --md "$out/oap_gpu.md"
