#!/usr/bin/env bash
# Regenerates the tiny SentencePiece models and their reference encodings used by SentencePieceTests.
# Needs Debian's `sentencepiece` (spm_train, spm_encode, spm_decode), `python3-sentencepiece` and `bible-kjv`
# (the `bible` program):
#   apt-get install -y sentencepiece python3-sentencepiece bible-kjv
# The reference ids come from Google's own spm_encode, independently of the C# code under test.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Training text: the first 8,000 verses of the KJV, without their "Ge1:1 " references.
bible -f Gen1:1-Rev22:21 </dev/null >"$work/kjv.txt"
head -n 8000 "$work/kjv.txt" | sed 's/^[^ ]* //' >"$work/train.txt"

# LLaMA-1/2 style: BPE, byte fallback, digits split, identity normalisation, dummy prefix, <unk>=0 <s>=1 </s>=2.
spm_train --input="$work/train.txt" --model_prefix="$work/llama" --model_type=bpe --vocab_size=1000 \
  --byte_fallback=true --split_digits=true --normalization_rule_name=identity --add_dummy_prefix=true \
  --remove_extra_whitespaces=false --allow_whitespace_only_pieces=true --character_coverage=1.0 \
  --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --minloglevel=2 >/dev/null
mkdir -p "$here/sp-llama"
cp "$work/llama.model" "$here/sp-llama/tokenizer.model"

# The same model as transformers' LlamaConverter turns it into a tokenizer.json (Llama-2 layout).
mkdir -p "$here/hf-llama"
/usr/bin/python3 "$here/sentencepiece-to-tokenizer-json.py" "$here/sp-llama/tokenizer.model" "$here/hf-llama/tokenizer.json"

# Unigram with SentencePiece's default nmt_nfkc normalisation.
spm_train --input="$work/train.txt" --model_prefix="$work/nfkc" --model_type=unigram --vocab_size=1000 \
  --character_coverage=1.0 --minloglevel=2 >/dev/null
mkdir -p "$here/sp-unigram-nfkc"
cp "$work/nfkc.model" "$here/sp-unigram-nfkc/tokenizer.model"

# Reference encodings (no BOS/EOS: spm_encode adds none) of each sample line.
for model in sp-llama sp-unigram-nfkc; do
  spm_encode --model="$here/$model/tokenizer.model" --output_format=id <"$here/sentencepiece-samples.txt" >"$here/$model/expected-ids.txt"
  spm_decode --model="$here/$model/tokenizer.model" --input_format=id <"$here/$model/expected-ids.txt" >"$here/$model/expected-decoded.txt"
done
