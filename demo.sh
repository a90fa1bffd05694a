#!/usr/bin/env bash
# The main job, the article's flow on the bundled model: estimate the memory of a LoRA fine-tune, measure the
# base model on a task it was never taught, fine-tune LoRA adapters (PEFT's OPT-6.7B recipe: r 16, alpha 32,
# dropout 0.05 on q_proj and v_proj) with the base frozen in int8, and measure again.
set -euo pipefail
cd "$(dirname "$0")"
tools/setup.sh
model=models/frugal-kjv-17m
task=tasks/testament/data.jsonl
out=runs/testament-lora
lora=(--lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --lora-targets q_proj,v_proj)
echo "== 1. what the fine-tune will cost (frugal estimate, the same plan frugal train runs)"
./frugal estimate --model "$model" --gpu cpu --quant int8 --lora-r 16 --lora-targets q_proj,v_proj --checkpoint-every 1 --batch 16 --seq 48
sample="$(printf 'Verse: And Jesus answered and said unto them, Go your way\nTestament:')"
echo "== 2. the base model on the held-out pairs of the task: which testament is this verse from? (it was never taught)"
./frugal eval --model "$model" --data "$task" --seq 48 --max-new-tokens 4 --quantize int8
echo "-- before, a sample:"
./frugal generate --model "$model" --quantize int8 --max-new-tokens 2 --temperature 0 --prompt "$sample"
echo "== 3. LoRA fine-tune on an int8 base (gradient checkpointing on, as PEFT's prepare_model_for_kbit_training)"
./frugal train --model "$model" --data "$task" --out "$out" --quantize int8 "${lora[@]}" \
    --steps 300 --batch 16 --seq 48 --lr 3e-3 --log-every 50
echo "== 4. the fine-tuned model on the same held-out pairs"
./frugal eval --model "$model" --adapter "$out" --data "$task" --seq 48 --max-new-tokens 4 --quantize int8
echo "-- after, the same sample:"
./frugal generate --model "$model" --adapter "$out" --quantize int8 --max-new-tokens 2 --temperature 0 --prompt "$sample"
