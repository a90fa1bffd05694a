#!/usr/bin/env bash
# The main job on the bundled model: set up, show what running it costs in memory, then generate.
set -euo pipefail
cd "$(dirname "$0")"
tools/setup.sh
model=models/frugal-kjv-17m
echo "== memory estimate for generating with $model (fp32, CPU)"
./frugal estimate --model "$model" --mode generate --gpu cpu --seq 256
echo "== generation"
./frugal generate --model "$model" --prompt "And God said" --max-new-tokens 60 --seed 7
