#!/usr/bin/env bash
# The project's one GPU check: a session that is lent one CUDA GPU runs this, and it takes under
# 8 minutes. It supersedes bench/oap_gpu_check.sh (the OAP static path's CUDA tests and
# `labelwise bench oap --device cuda`) and bench/oap_train_gpu_check.sh (the oap coco preset's step
# in bf16, and a trained OAP run predicting on CUDA). Both are covered here and kept for reference.
#   1. every method's paper preset (cam, irn, seco, cobra, segmenter: voc; oap: coco; kmax, cocal:
#      pascalpart) trains on a `labelwise data synth` testbed at the preset's crop and batch size,
#      in fp32 and in bf16 autocast. Recorded: median step time, peak GPU memory, and whether the
#      losses are finite. Weights start random: no pretrained weights exist offline;
#   2. `labelwise infer` on the cam and oap runs, at batch 1 and batched: images/s;
#   3. `labelwise bench oap --device cuda`: OAP's static path on the GPU vs MaskCut on the CPU;
#   4. the static path's CUDA tests (tests/test_oap_static.py -k cuda).
# A failing check is recorded with its one-line error, and the next check runs.
# Usage: bash bench/gpu_check.sh [OUT_DIR] [options of bench/gpu_check.py, e.g. --all-presets]
#        writes OUT_DIR/gpu_results.json (default bench/gpu_results.json) and OUT_DIR/gpu_check_logs/.
#        --dry-run (or GPU_CHECK_DRY_RUN=1): the same on the CPU at tiny sizes, which is what CI tests.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here"
if [[ $# -gt 0 && "$1" != -* ]]; then
  out="$1"
  shift
fi
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/gpu_check.py" --out "$out" "$@"
