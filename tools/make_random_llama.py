#!/usr/bin/env python3
"""Writes a LLaMA model folder with random bf16 weights, tensor by tensor, without PyTorch or NumPy.

Usage: tools/make_random_llama.py CONFIG.json OUT_FOLDER [SEED]

For memory measurements of models larger than RAM budgets (docs/offload.md): building such a model in a framework
would hold it whole (in fp32) first. Weights are +-2^-7 x (1 + m/128) with random sign and mantissa (|w| in
[0.0078, 0.0156), about what N(0, 0.02) gives), norms 1.0. Tokenizer files are not written: copy them in.
"""
import json
import os
import random
import shutil
import struct
import sys

HIGH = bytes(((v & 0x80) | 0x3C) for v in range(256))  # sign, exponent 0x78 (2^-7), top bits
LOW = bytes((v & 0x7F) for v in range(256))            # exponent's last bit 0, 7 mantissa bits


def random_bf16(count, rng):
    raw = bytearray(rng.randbytes(2 * count))
    raw[1::2] = raw[1::2].translate(HIGH)
    raw[0::2] = raw[0::2].translate(LOW)
    return raw


def main():
    config_path, out = sys.argv[1], sys.argv[2]
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    c = json.load(open(config_path))
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    d = c.get("head_dim", h // heads)
    tensors = [("model.embed_tokens.weight", [c["vocab_size"], h], "w")]
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors += [
            (p + "self_attn.q_proj.weight", [heads * d, h], "w"),
            (p + "self_attn.k_proj.weight", [kv * d, h], "w"),
            (p + "self_attn.v_proj.weight", [kv * d, h], "w"),
            (p + "self_attn.o_proj.weight", [h, heads * d], "w"),
            (p + "mlp.gate_proj.weight", [i, h], "w"),
            (p + "mlp.up_proj.weight", [i, h], "w"),
            (p + "mlp.down_proj.weight", [h, i], "w"),
            (p + "input_layernorm.weight", [h], "one"),
            (p + "post_attention_layernorm.weight", [h], "one"),
        ]
    tensors.append(("model.norm.weight", [h], "one"))
    if not c.get("tie_word_embeddings", False):
        tensors.append(("lm_head.weight", [c["vocab_size"], h], "w"))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        count = 1
        for s in shape:
            count *= s
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, kind in tensors:
            count = header[name]["data_offsets"][1] // 2 - header[name]["data_offsets"][0] // 2
            f.write(random_bf16(count, rng) if kind == "w" else b"\x80\x3f" * count)
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    c["torch_dtype"] = "bfloat16"
    with open(os.path.join(out, "config.json.tmp"), "w") as f:
        json.dump(c, f, indent=2)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))
    print(f"{out}: {offset / 1e9:.2f} GB of bf16 weights, {offset // 2:,} parameters")


if __name__ == "__main__":
    main()
