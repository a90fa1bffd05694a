#!/usr/bin/env python3
"""Writes the bundled LoRA task: swap two words.

    tools/make_swap_task.py [--corpus data/kjv.txt] [--out tasks/swap/data.jsonl] [--count 2000] [--seed 1]

Each record is {"prompt": "Swap: light darkness =>", "completion": " darkness light"}: the answer is the two
words of the prompt in the other order. The words are the 400 most frequent words of at least four letters in
the King James Bible (tools/kjv-corpus.sh), so the vocabulary is the bundled model's own, while the task is
new to it: the base model scores ~0% and a LoRA adapter has to learn to copy tokens out of order. Pairs are
drawn without repetition; `frugal train`/`frugal eval` hold out every 20th record, so the held-out pairs are
never trained on. Deterministic for a given corpus, count and seed. Needs only the standard library.
"""
import argparse
import collections
import json
import os
import random
import re

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--corpus", default="data/kjv.txt")
parser.add_argument("--out", default="tasks/swap/data.jsonl")
parser.add_argument("--count", type=int, default=2000)
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()

with open(args.corpus, encoding="utf-8") as f:
    counts = collections.Counter(w for w in re.findall(r"[a-z]+", f.read().lower()) if len(w) >= 4)
words = sorted(w for w, _ in counts.most_common(400))
rng = random.Random(args.seed)
pairs = set()
while len(pairs) < args.count:
    a, b = rng.sample(words, 2)
    pairs.add((a, b))
records = [{"prompt": f"Swap: {a} {b} =>", "completion": f" {b} {a}"} for a, b in sorted(pairs)]
rng.shuffle(records)
os.makedirs(os.path.dirname(args.out), exist_ok=True)
tmp = args.out + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
        f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, args.out)
print(f"wrote {len(records)} records to {args.out} ({len(words)} words)")
