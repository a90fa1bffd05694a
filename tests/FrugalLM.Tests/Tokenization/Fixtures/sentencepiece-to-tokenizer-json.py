#!/usr/bin/python3
"""Writes the tokenizer.json that transformers' LlamaConverter (legacy Llama-2 layout) makes from a
SentencePiece BPE model: BPE over the pieces with merges from generate_merges, byte fallback, the
Prepend/Replace normaliser, the Replace/ByteFallback/Fuse/Strip decoder and a "<s> $A" template.
Usage: sentencepiece-to-tokenizer-json.py tokenizer.model tokenizer.json   (needs python3-sentencepiece)
"""
import json
import sys

import sentencepiece

model, out = sys.argv[1], sys.argv[2]
sp = sentencepiece.SentencePieceProcessor(model_file=model)
vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}

# transformers' generate_merges(vocab) without scores: every split of a piece into two pieces,
# ordered by the id of the merged piece, then by the lengths of the parts.
merges = []
for piece, piece_id in vocab.items():
    local = []
    for i in range(1, len(piece)):
        left, right = piece[:i], piece[i:]
        if left in vocab and right in vocab:
            local.append((left, right, piece_id))
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.extend(local)
merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))

def added(i):
    return {"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}

special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
bos = sp.bos_id()
tokenizer = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [added(i) for i in special],
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None,
    "post_processor": {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
              "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
              "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
              "merges": [[m[0], m[1]] for m in merges]},
}
with open(out, "w", encoding="utf-8") as f:
    json.dump(tokenizer, f, ensure_ascii=False, indent=2)
    f.write("\n")
