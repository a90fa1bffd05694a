#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (issue 9): what works there today, in under 10 minutes.
#   tools/gpu-check.sh [OUT]        writes OUT/gpu-check.log (default: $OUT or ./gpu-check)
# 1. the GPU and driver (nvidia-smi); 2. the CPU build and the default test suite (everything must pass without CUDA);
# 3. the CUDA build of libtorch (-p:FrugalRuntimeIdentifier=linux-x64-cuda), which needs a NuGet feed serving
#    libtorch-cuda-12.8-linux-x64 (ours does not); 4. --device cuda, which says what is missing; 5. the quick bench on CPU.
# Each step has its own time limit and the script goes on after a failure, so one run shows every step's state.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
log="$out/gpu-check.log"
: > "$log"
step() { # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
}
step "gpu" 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step "setup" 150 bash tools/setup.sh
step "build (cpu)" 120 dotnet build FrugalLM.slnx -c Release --nologo -v q -clp:ErrorsOnly
step "tests (cpu)" 240 ./test.sh
step "restore (cuda libtorch)" 60 dotnet restore src/FrugalLM.Cli -p:FrugalRuntimeIdentifier=linux-x64-cuda
step "--device cuda" 30 ./frugal generate --model models/frugal-kjv-17m --prompt "And God said" --max-new-tokens 8 --device cuda
step "bench --quick (cpu)" 180 ./frugal bench --quick --peer none --out "$out/bench"
echo "log: $log"
