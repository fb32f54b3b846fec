#!/usr/bin/env bash
# GPU check for the real vLLM engine: live migration between two vLLM V1 engines on ONE NVIDIA GPU, token-identical
# to an unmigrated run (in-process pair, then two llumlet processes over TCP), and `llumnix bench migration --engine
# vllm` when that exists. Self-contained (installs vllm==0.32.* if missing), meant to finish within 8 minutes.
#   bash integration/gpu_check.sh            (from the repository root, on a machine with one NVIDIA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || { echo "no NVIDIA GPU"; exit 2; }

if ! $PY -c 'import sys, vllm; sys.exit(0 if vllm.__version__.startswith("0.32.") else 1)' 2>/dev/null; then
  echo "== installing vllm==0.32.*"
  $PY -m pip install -q "vllm==0.32.*"
fi
if ! $PY -c 'import pyllumnix' 2>/dev/null; then
  echo "== installing pyllumnix (editable)"
  $PY -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
fi
$PY -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'

export LLUMNIX_TINY_MODEL=${LLUMNIX_TINY_MODEL:-/tmp/llumnix-tiny-llama}
$PY -m pyllumnix.tools.tiny_model "$LLUMNIX_TINY_MODEL"

# Two engines share the GPU: each gets a small KV cache and a share of the memory budget. float32 keeps greedy
# decoding bit-stable across batch compositions (the reference and the migrated run batch differently).
export VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 VLLM_LOGGING_LEVEL=WARNING
export LLUMNIX_VLLM_DTYPE=${LLUMNIX_VLLM_DTYPE:-float32}
export LLUMNIX_VLLM_GPU_MEMORY_UTILIZATION=${LLUMNIX_VLLM_GPU_MEMORY_UTILIZATION:-0.3}
export LLUMNIX_VLLM_LLUMLET_ARGS=${LLUMNIX_VLLM_LLUMLET_ARGS:-"--dtype $LLUMNIX_VLLM_DTYPE --gpu-memory-utilization 0.3"}

rc=0
echo "== in-process migration (two engines, one GPU)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_vllm_migration.py || rc=1
echo "== two vLLM llumlet processes, MigrateOut over gRPC + TCP data plane"
timeout 180 $PY -m pytest -q -p no:cacheprovider integration/test_vllm_processes.py || rc=1
if $PY -m pyllumnix.tools.cli bench migration --help 2>/dev/null | grep -q -- "vllm"; then
  echo "== llumnix bench migration --engine vllm"
  timeout 120 $PY -m pyllumnix.tools.cli bench migration --engine vllm --model "$LLUMNIX_TINY_MODEL" || rc=1
fi
echo "== gpu_check finished in $(( $(date +%s) - start )) s, rc=$rc"
exit $rc
