#!/usr/bin/env python3
"""Writes the bundled LoRA task: which testament is a verse from?

    tools/make_testament_task.py [--out tasks/testament/data.jsonl] [--count 2000] [--seed 1]

Each record is {"prompt": "Verse: <the first 24 words of a KJV verse>\\nTestament:", "completion": " Old"} (or
" New"): half the verses come from Genesis..Malachi, half from Matthew..Revelation, drawn without repetition.
The bundled model read every verse while it was trained, but never a label: the base model does not answer
" Old" or " New" (~0% exact match), and a LoRA adapter has to learn the format and the distinction from the
words (names, places, themes). `frugal train`/`frugal eval` hold out every 20th record.
Needs Debian's bible-kjv (`bible` program); deterministic for a given count and seed.
"""
import argparse
import json
import os
import random
import subprocess

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="tasks/testament/data.jsonl")
parser.add_argument("--count", type=int, default=2000)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--words", type=int, default=24)
args = parser.parse_args()

NEW_TESTAMENT_FIRST = "Mat"
text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True).stdout
old, new, seen_new = [], [], False
for line in text.splitlines():
    ref, _, verse = line.partition(" ")
    if ref.startswith(NEW_TESTAMENT_FIRST) and ref[len(NEW_TESTAMENT_FIRST)].isdigit():
        seen_new = True
    words = verse.split()
    if len(words) >= 6:
        (new if seen_new else old).append(" ".join(words[: args.words]))
rng = random.Random(args.seed)
records = [{"prompt": f"Verse: {v}\nTestament:", "completion": " Old"} for v in rng.sample(old, args.count // 2)]
records += [{"prompt": f"Verse: {v}\nTestament:", "completion": " New"} for v in rng.sample(new, args.count - args.count // 2)]
rng.shuffle(records)
os.makedirs(os.path.dirname(args.out), exist_ok=True)
tmp = args.out + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
        f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, args.out)
print(f"wrote {len(records)} records to {args.out} ({len(old)} Old and {len(new)} New Testament verses to draw from)")
