#!/usr/bin/env bash
# The GPU figures in one prepared run, for a lent GPU machine (no network there; under 8 minutes):
#
#   bash benchmarks/gpu.sh [--dry-run] [--out DIR]
#
# Before lending, put the wheels the machine lacks into benchmarks/wheels/ (ignored by git, carried
# with the run): pip download bitsandbytes==0.50.2 --no-deps -d benchmarks/wheels
# The machine's own torch, transformers, accelerate and safetensors are used. It writes
# DIR/gpu.json (default bench-gpu/) and prints the Markdown table benchmarks/RESULTS.md holds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench-gpu
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
python=${PYTHON:-python3}
if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps benchmarks/wheels/*.whl
fi
export PYTHONUNBUFFERED=1
"$python" benchmarks/gpu_bench.py --out "$out/gpu.json" --work "$out/work" ${args[@]+"${args[@]}"}
rm -rf "$out/work"
