#!/usr/bin/env bash
# GPU check of the device KV data path (#17), for the lent GPU machine: one GPU, Python 3.12, torch with CUDA, NO vLLM,
# NO ucxx, NO network, at most 64 MiB carried. Two processes on the GPU hold vLLM-shaped KV buffers (one layer-major,
# one block-major, both carved from one buffer as vLLM 0.32 allocates them) and migrate blocks with the real
# send_blocks/receive_blocks: UCX device-to-device (cuda_ipc), then TCP staged through pinned host memory; hashes
# computed on the device verify every block. Then `llumnix bench dataplane --device cuda`. Budget: under 6 minutes.
#
# The ucxx cu13 stack travels as wheels (~51 MiB) in the git-ignored folder .gpu-wheels/, installed offline here.
# Fetch them once on a machine with pip access (versions pinned to what ucxx-cu13 0.52 requires):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     -d .gpu-wheels ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 "libucx-cu13==1.21.*" rmm-cu13==26.10.0 \
#     librmm-cu13==26.10.0 "rapids-logger==0.3.*"
# (cuda-core, cuda-bindings, nvidia-ml-py and numpy, which they also need, are in the GPU machine's image.)
# Run from the repository root with .gpu-wheels carried:  bash integration/gpu_check.sh
# Results: $OUT/gpu_check.json, $OUT/bench_device.json, $OUT/gpu_check.log (OUT defaults to /tmp/llumnix-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/llumnix-gpu-check}
WHEELS=${WHEELS:-.gpu-wheels}
SITE=${SITE:-/tmp/llumnix-site}
PKG=/tmp/llumnix-pkg
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 2; }

echo "== ucxx (offline, from $WHEELS)"
if ! $PY -c 'import ucxx' 2>/dev/null; then
  ls "$WHEELS"/ucxx_cu13-*.whl >/dev/null 2>&1 || { echo "no ucxx wheels in $WHEELS (see the header)"; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "offline install of the ucxx wheels failed"; exit 2; }
fi
# pyllumnix without installing it: each repository folder is a subpackage (setup.py maps pyllumnix.<folder> there).
mkdir -p "$PKG/pyllumnix"
for d in data_plane tools; do ln -sfn "$PWD/$d" "$PKG/pyllumnix/$d"; done
export PYTHONPATH="$SITE:$PKG${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
$PY - <<'EOF' || { echo "imports failed"; exit 2; }
import torch, ucxx
from ucxx._lib import libucxx
from pyllumnix.data_plane.transport import ucx_available
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "| ucxx", getattr(ucxx, "__version__", "?"),
      "| ucx_available", ucx_available())
EOF

rc=0
echo "== two processes, layer-major <-> block-major KV on cuda:0: UCX device-to-device, TCP via pinned host memory"
timeout 200 $PY integration/gpu_dataplane_check.py --device cuda --blocks 1024 --migrate 300 --transports ucx,tcp \
  --json "$OUT/gpu_check.json" || rc=1

echo "== llumnix bench dataplane --device cuda"
UCX_PROTO_INFO=y timeout 150 $PY -c 'import sys; from pyllumnix.tools.bench_dataplane import bench_dataplane; bench_dataplane(sys.argv[1:])' \
  --device cuda --sizes 4,16,64 --repeat 2 --transports ucx --json "$OUT/bench_device.json" > "$OUT/bench_device.out" 2>&1 || rc=1
tail -n 1 "$OUT/bench_device.out"

echo "== gpu_check finished in $(( $(date +%s) - start )) s, rc=$rc"
exit $rc
