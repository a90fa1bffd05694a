#!/usr/bin/python3
"""Independent PyTorch reference for FrugalLM's LLaMA runtime: writes the parity fixtures.

Run it with Debian's interpreter, which is the one that has PyTorch (`apt-get install python3-torch`
gives 1.13); a pyenv `python3` earlier on PATH has no torch:

    /usr/bin/python3 tools/make_fixtures.py                 # writes tests/fixtures/parity/
    /usr/bin/python3 tools/make_fixtures.py --out /tmp/p    # anywhere else

Each fixture is a small random LlamaForCausalLM saved as a Hugging Face folder (config.json and
safetensors weights, one of them sharded with model.safetensors.index.json) plus expected.safetensors:
logits for fixed inputs, the loss, gradient norm and updated weights of one clipped AdamW step, and a
greedy continuation. tests/fixtures/parity/README.md describes every file and tensor.

The model is written here from the definition of transformers' modeling_llama (eager attention path),
without transformers or the safetensors package, so that it is an independent check of the C# runtime.
The output is deterministic: rerunning reproduces the same bytes (single-threaded CPU math, seeded
generators, sorted JSON and tensor order).
"""

import argparse
import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "parity")

# Inputs and the training step every fixture records.
LOGITS_SHAPE = (2, 11)
TRAIN_SHAPE = (2, 12)
PROMPT_SHAPE = (1, 5)
NEW_TOKENS = 16
# AdamW's eps is 1e-4, not the usual 1e-8. The first AdamW step moves each weight by
# lr * g / (|g| + eps) (bias correction makes m_hat = g, v_hat = g^2). With eps = 1e-8 that is lr * sign(g)
# almost everywhere, so (a) the clip coefficient and eps's placement leave no trace in the updated weights,
# and (b) for the handful of weights whose clipped gradient is within a few eps of zero, fp32 rounding of
# the gradient is amplified by lr / (4 eps): another correct fp32 implementation then lands up to 5e-4
# away (measured here), and a 1e-5 comparison is ill-posed. With eps = 1e-4 a few percent of the weights
# take a scaled step, which exposes clipping and eps, and the step is well conditioned (checked below).
LR, BETAS, ADAM_EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-2, (0.9, 0.95), 1e-4, 0.1, 1.0
# The C# parity tests compare logits at 1e-4 and updated weights at 1e-5 (relative). The reference must
# sit well inside those: fp32 against a float64 recomputation, and the step against gradient noise.
MAX_LOGITS_ERR, MAX_STEP_ERR = 1e-5, 2e-6
# The C# side must reproduce greedy decoding token for token, so every step's winner has to beat the
# runner-up by far more than fp32 noise (logits are O(1), their rounding errors O(1e-6)).
MIN_GREEDY_MARGIN = 1e-3
MAX_SEED_TRIES = 50

# A greedy continuation that repeats one or two tokens would hardly test decoding (a broken KV cache can
# still repeat a token), so it must use at least this many distinct tokens.
MIN_DISTINCT_GREEDY = 8

# Initialisation scales chosen so that activations, logits and gradients are O(1): relative errors
# are then meaningful (tiny weights would make every logit nearly equal).
LINEAR_STD, EMBED_STD, NORM_JITTER = 0.15, 1.0, 0.1
# A tied embedding is also the LM head: at std 1.0 its logits are ~7 wide (sqrt(hidden)), the loss ~23
# and greedy decoding copies the last token forever in most seeds. 0.3 keeps logits O(1).
TIED_EMBED_STD = 0.3


def hf_config(vocab, hidden, intermediate, layers, heads, kv_heads, rope_theta, rope_scaling, tied,
              max_positions):
    """The config.json that transformers' LlamaConfig.save_pretrained writes for these sizes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
    }


FIXTURES = [
    # GQA (2 query heads per KV head), untied LM head, plain RoPE. Weights (419 KB) in two shards; the
    # 300 kB limit splits layer 1 between them (attention in the first file, MLP in the second), as real
    # checkpoints do.
    {
        "name": "gqa-untied",
        "seed": 1000,
        "max_shard_size": 300_000,
        "config": hf_config(vocab=96, hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2,
                            rope_theta=10000.0, rope_scaling=None, tied=False, max_positions=128),
    },
    # GQA (3 per KV head), tied embeddings, Llama 3.1 RoPE scaling. original_max_position_embeddings is
    # 256 (not Llama 3's 8192) so that, with head_dim 8 and theta 5e5, the four frequencies fall in all
    # three llama3 bands: wavelength 2*pi (< 256/4, kept), ~167 (between, smoothed), ~4.4e3 and ~1.2e5
    # (> 256/1, divided by the factor). The script asserts this.
    {
        "name": "tied-llama3rope",
        "seed": 2000,
        "max_shard_size": None,
        "config": hf_config(vocab=80, hidden=48, intermediate=128, layers=2, heads=6, kv_heads=2,
                            rope_theta=500000.0,
                            rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                          "original_max_position_embeddings": 256, "rope_type": "llama3"},
                            tied=True, max_positions=2048),
    },
    # Multi-head attention (as many KV heads as query heads), untied, linear RoPE scaling. Narrower than
    # gqa-untied (hidden 32, head_dim 8) to keep all fixtures together well under 2 MB.
    {
        "name": "linear-rope",
        "seed": 3000,
        "max_shard_size": None,
        "config": hf_config(vocab=96, hidden=32, intermediate=88, layers=2, heads=4, kv_heads=4,
                            rope_theta=10000.0, rope_scaling={"factor": 2.0, "rope_type": "linear"},
                            tied=False, max_positions=128),
    },
]


# ----------------------------------------------------------------------------------------------------
# safetensors, by hand
# ----------------------------------------------------------------------------------------------------

# torch dtype -> (safetensors dtype string, little-endian numpy dtype; None: stored through a same-width
# integer view because numpy has no bfloat16).
ST_DTYPES = {
    torch.float32: ("F32", "<f4"),
    torch.float16: ("F16", "<f2"),
    torch.bfloat16: ("BF16", None),
    torch.int64: ("I64", "<i8"),
    torch.int32: ("I32", "<i4"),
    torch.int8: ("I8", "i1"),
    torch.uint8: ("U8", "u1"),
    torch.bool: ("BOOL", "?"),
}
ST_FROM_NAME = {name: (dtype, np_dtype) for dtype, (name, np_dtype) in ST_DTYPES.items()}
ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_bytes(t):
    """The raw little-endian bytes of a tensor in row-major order."""
    t = t.detach().contiguous()
    name, np_dtype = ST_DTYPES[t.dtype]
    if np_dtype is None:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    return t.numpy().astype(np_dtype, copy=False).tobytes()


def safetensors_bytes(tensors, metadata=None):
    """A safetensors file: u64 LE header length, JSON header padded with spaces to a multiple of 8,
    then every tensor's data, contiguous, in sorted name order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = tensor_bytes(t)
        header[name] = {"dtype": ST_DTYPES[t.dtype][0], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def read_safetensors(path):
    """Parses a safetensors file strictly (independently of the writer) into (tensors, metadata)."""
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) >= 8, f"{path}: shorter than the header length field"
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and 8 + n <= len(raw), f"{path}: bad header length {n}"
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", None)
    tensors, expected_begin = {}, 0
    # The data section must be exactly the tensors, back to back, in the order of their offsets.
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        assert begin == expected_begin and end >= begin, f"{path}: {name} offsets {begin}..{end} not contiguous"
        numel = math.prod(info["shape"])
        assert end - begin == numel * ST_ITEMSIZE[info["dtype"]], f"{path}: {name} byte count != shape x dtype"
        dtype, np_dtype = ST_FROM_NAME[info["dtype"]]
        chunk = data[begin:end]
        if np_dtype is None:
            arr = np.frombuffer(chunk, dtype="<i2").astype(np.int16)
            t = torch.from_numpy(arr.copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(chunk, dtype=np_dtype).copy())
        assert t.dtype == dtype
        tensors[name] = t.reshape(info["shape"])
        expected_begin = end
    assert expected_begin == len(data), f"{path}: {len(data) - expected_begin} trailing bytes"
    return tensors, metadata


def bit_equal(a, b):
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def write_atomic(path, data):
    """Temp file in the same folder, fsync, rename: a reader never sees a half-written file."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_safetensors(path, tensors, metadata):
    write_atomic(path, safetensors_bytes(tensors, metadata))
    back, back_meta = read_safetensors(path)
    assert sorted(back) == sorted(tensors), f"{path}: tensor names changed on the round trip"
    assert back_meta == ({str(k): str(v) for k, v in metadata.items()} if metadata else None)
    for name, t in tensors.items():
        assert bit_equal(back[name], t.detach().contiguous()), f"{path}: {name} differs after re-reading"


def write_json(path, obj):
    # transformers writes config.json and the shard index with indent=2, sorted keys, trailing newline.
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# ----------------------------------------------------------------------------------------------------
# LLaMA (transformers' LlamaForCausalLM, eager attention), fp32
# ----------------------------------------------------------------------------------------------------

def parameter_shapes(cfg):
    """HF state-dict names and shapes in LlamaForCausalLM's module order. A tied model has no
    lm_head.weight entry: the head is model.embed_tokens.weight."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def init_parameters(cfg, gen):
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        if len(shape) == 1:
            params[name] = 1.0 + NORM_JITTER * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            std = TIED_EMBED_STD if cfg["tie_word_embeddings"] else EMBED_STD
            params[name] = std * torch.randn(shape, generator=gen)
        else:
            params[name] = LINEAR_STD * torch.randn(shape, generator=gen)
    return params


def default_inv_freq(head_dim, theta):
    # Exactly transformers' _compute_default_rope_parameters, which works in float32 throughout:
    #   inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    # i.e. the exponents k/dim are float32, base ** exponent is a float32 pow with a Python-float base,
    # and the reciprocal is float32. (It is NOT computed in float64 and rounded; the two can differ in the
    # last bit. main() prints the largest such difference, which is far below the 1e-4 logits tolerance.)
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_inv_freq(cfg):
    """transformers' ROPE_INIT_FUNCTIONS for 'default', 'linear' and 'llama3', all float32 tensor math."""
    inv_freq = default_inv_freq(cfg["head_dim"], cfg["rope_theta"])
    scaling = cfg["rope_scaling"]
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind is None or kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # _compute_llama3_parameters, term for term.
        factor = scaling["factor"]
        low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are divided by the factor; short ones are kept.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        # In between (bounds inclusive), interpolate linearly in old_context_len / wavelen.
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}")


def llama3_bands(cfg):
    """Which llama3 band each frequency falls in: 'kept', 'smoothed' or 'divided'."""
    s = cfg["rope_scaling"]
    wavelen = 2 * math.pi / default_inv_freq(cfg["head_dim"], cfg["rope_theta"])
    low = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high = s["original_max_position_embeddings"] / s["high_freq_factor"]
    return ["kept" if w < high else "divided" if w > low else "smoothed" for w in wavelen.tolist()]


def compute_dtype(dtype):
    """HF upcasts norms and softmax to float32; float64 (the precision self-check) stays float64."""
    return torch.promote_types(dtype, torch.float32)


def rope_cos_sin(inv_freq, seq_len, dtype):
    # LlamaRotaryEmbedding.forward: freqs = positions x inv_freq in float32, emb = cat(freqs, freqs),
    # cos/sin in float32 (attention_scaling is 1.0 for default, linear and llama3).
    inv_freq = inv_freq.to(dtype)
    positions = torch.arange(seq_len, dtype=torch.int64).to(dtype)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    # First half / second half (GPT-NeoX layout), not interleaved pairs.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x, weight, eps):
    xc = x.to(compute_dtype(x.dtype))
    xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xc.to(x.dtype)


def plain_linear(x, p, module):
    """The linear layer at module path `module` (no bias: LLaMA has none). forward() takes another
    function of the same signature to add adapters (tools/make_peft_fixtures.py adds LoRA)."""
    return F.linear(x, p[module + ".weight"])


def attention(x, p, prefix, cfg, cos, sin, linear=plain_linear, cache=None):
    """`cache`, when given, is this layer's KV cache (a dict, empty before the first call): the new keys
    and values (after RoPE, before repeat_kv) are appended to it and the queries attend to all of them.
    cos and sin are those of the new positions."""
    batch, seq, _ = x.shape
    heads, kv_heads, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = linear(x, p, prefix + "q_proj").view(batch, seq, heads, d).transpose(1, 2)
    k = linear(x, p, prefix + "k_proj").view(batch, seq, kv_heads, d).transpose(1, 2)
    v = linear(x, p, prefix + "v_proj").view(batch, seq, kv_heads, d).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    past = 0
    if cache is not None:
        if cache:
            past = cache["k"].shape[2]
            k = torch.cat((cache["k"], k), dim=2)
            v = torch.cat((cache["v"], v), dim=2)
        cache["k"], cache["v"] = k, v
    total = past + seq
    # repeat_kv: KV head j serves query heads j*g .. j*g+g-1.
    g = heads // kv_heads
    k = k[:, :, None].expand(batch, kv_heads, g, total, d).reshape(batch, heads, total, d)
    v = v[:, :, None].expand(batch, kv_heads, g, total, d).reshape(batch, heads, total, d)
    scores = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5
    # Query i sits at position past + i and sees keys 0 .. past + i.
    causal = torch.ones(seq, total, dtype=torch.bool).triu(1 + past)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(scores.dtype)).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, heads * d)
    return linear(out, p, prefix + "o_proj")


def mlp(x, p, prefix, linear=plain_linear):
    gate = F.silu(linear(x, p, prefix + "gate_proj"))
    return linear(gate * linear(x, p, prefix + "up_proj"), p, prefix + "down_proj")


def lm_head_weight(p):
    return p["lm_head.weight"] if "lm_head.weight" in p else p["model.embed_tokens.weight"]


def decoder_layer(h, p, prefix, cfg, cos, sin, linear=plain_linear, cache=None):
    eps = cfg["rms_norm_eps"]
    h = h + attention(rms_norm(h, p[prefix + "input_layernorm.weight"], eps), p, prefix + "self_attn.", cfg,
                      cos, sin, linear, cache)
    return h + mlp(rms_norm(h, p[prefix + "post_attention_layernorm.weight"], eps), p, prefix + "mlp.", linear)


def call_directly(layer, *args):
    return layer(*args)


def forward(p, cfg, ids, inv_freq=None, linear=plain_linear, cache=None, call_layer=call_directly):
    """Returns (logits, final normed hidden states). `linear(x, p, module)` computes each linear layer.
    `cache`: a KV cache (one dict per layer, empty at first, see attention()) that the call extends; ids
    are then the tokens after the cached ones. `call_layer(decoder_layer, *args)` runs each decoder layer
    (tools/peer_bench.py wraps it in activation checkpointing)."""
    eps = cfg["rms_norm_eps"]
    embed = p["model.embed_tokens.weight"]
    inv_freq = rope_inv_freq(cfg) if inv_freq is None else inv_freq
    past = cache[0]["k"].shape[2] if cache is not None and cache[0] else 0
    # cos and sin in float32 (float64 in the precision check), then in the weights' dtype, as
    # LlamaRotaryEmbedding returns them (a no-op for float32 and float64; bf16 positions would be inexact).
    cos, sin = rope_cos_sin(inv_freq, past + ids.shape[1], compute_dtype(embed.dtype))
    cos, sin = cos.to(embed.dtype), sin.to(embed.dtype)
    if past:
        cos, sin = cos[past:], sin[past:]
    h = F.embedding(ids, embed)
    for layer in range(cfg["num_hidden_layers"]):
        h = call_layer(decoder_layer, h, p, f"model.layers.{layer}.", cfg, cos, sin, linear,
                       None if cache is None else cache[layer])
    h = rms_norm(h, p["model.norm.weight"], eps)
    if "lm_head.weight" in p:
        return linear(h, p, "lm_head"), h
    return F.linear(h, lm_head_weight(p)), h


def causal_lm_loss(p, cfg, ids):
    # LlamaForCausalLM's loss: predict token t+1 from positions <= t, mean over every position.
    logits, _ = forward(p, cfg, ids)
    vocab = cfg["vocab_size"]
    shifted = logits[:, :-1].reshape(-1, vocab)
    return F.cross_entropy(shifted.to(compute_dtype(shifted.dtype)), ids[:, 1:].reshape(-1))


def train_step(params, cfg, ids):
    """One step: loss, backward, clip_grad_norm_(1.0), AdamW with decay on ndim >= 2 only.
    Returns (loss, pre-clip gradient norm, pre-clip gradients, updated parameters)."""
    p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    loss = causal_lm_loss(p, cfg, ids)
    loss.backward()
    grads = {n: t.grad.clone() for n, t in p.items()}
    grad_norm, updated = optimizer_step(params, grads)
    return loss.detach(), grad_norm, grads, updated


def optimizer_step(params, grads):
    """clip_grad_norm_ then one AdamW step, from the given gradients."""
    p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    for n, t in p.items():
        t.grad = grads[n].clone()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(p.values()), max_norm=MAX_GRAD_NORM)
    groups = [
        {"params": [t for t in p.values() if t.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [t for t in p.values() if t.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=ADAM_EPS)
    optimizer.step()
    return grad_norm.detach(), {n: t.detach().clone() for n, t in p.items()}


@torch.no_grad()
def greedy(params, cfg, prompt, steps):
    """Greedy argmax decoding, recomputing the whole sequence each step (no KV cache)."""
    ids, margins = prompt, []
    for _ in range(steps):
        logits, _ = forward(params, cfg, ids)
        last = logits[:, -1, :]
        top = last.topk(2, dim=-1).values
        margins.append((top[:, 0] - top[:, 1]).min().item())
        ids = torch.cat((ids, last.argmax(dim=-1, keepdim=True)), dim=1)
    return ids[:, prompt.shape[1]:], min(margins)


# ----------------------------------------------------------------------------------------------------
# Self-checks
# ----------------------------------------------------------------------------------------------------

def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_tied(params, cfg, ids):
    """The tied head is the embedding matrix, in the forward pass and in the gradient."""
    assert "lm_head.weight" not in params
    with torch.no_grad():
        logits, hidden = forward(params, cfg, ids)
        assert bit_equal(logits, hidden @ params["model.embed_tokens.weight"].T), "tied lm_head != hidden @ embed.T"
    # Its gradient is the sum of the embedding-lookup and LM-head gradients of an untied twin.
    untied = {n: t.clone() for n, t in params.items()}
    untied["lm_head.weight"] = params["model.embed_tokens.weight"].clone()
    _, _, twin_grads, _ = train_step(untied, dict(cfg, tie_word_embeddings=False), ids)
    _, _, tied_grads, _ = train_step(params, cfg, ids)
    both = twin_grads["model.embed_tokens.weight"] + twin_grads["lm_head.weight"]
    assert rel_err(tied_grads["model.embed_tokens.weight"], both) < 1e-5, "tied embedding gradient"


def precision_report(params, cfg, input_ids, logits, train_ids, loss, grad_norm, grads, updated):
    """Recomputes the fixture in float64 from the same weights, to see how much of the C# tolerances the
    fp32 reference itself uses, and how well conditioned the training step is: the float64 step is
    repeated from gradients jittered by twice each element's own fp32 rounding error (what another
    correct fp32 implementation could produce). Returns the worst relative L2 errors over tensors."""
    p64 = {n: t.double() for n, t in params.items()}
    with torch.no_grad():
        logits64, _ = forward(p64, cfg, input_ids)
    loss64, norm64, grads64, updated64 = train_step(p64, cfg, train_ids)
    jitter_gen = torch.Generator().manual_seed(0)
    jittered_err = 0.0
    for _ in range(3):
        jittered = {n: g + 2 * (grads[n].double() - g).abs() * torch.randn(g.shape, generator=jitter_gen,
                                                                            dtype=torch.float64)
                    for n, g in grads64.items()}
        _, other = optimizer_step(p64, jittered)
        jittered_err = max(jittered_err, max(rel_err(other[n], updated64[n]) for n in params))
    return {
        "logits": rel_err(logits, logits64),
        "loss": abs(loss.item() - loss64.item()) / abs(loss64.item()),
        "grad_norm": abs(grad_norm.item() - norm64.item()) / norm64.item(),
        "grads": max(rel_err(grads[n], grads64[n]) for n in params),
        "updated": max(rel_err(updated[n], updated64[n]) for n in params),
        "step_conditioning": jittered_err,
    }


def check_step_matters(params, grads, updated):
    """Each plausible slip in the optimizer must move some updated tensor by over 10x the C# tolerance
    (1e-5), or the fixture would not catch it."""
    def variant(clip=True, eps=ADAM_EPS, decay_norms=False, coupled=False, eps_before_correction=False):
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        for n, t in p.items():
            t.grad = grads[n].clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(p.values()), max_norm=MAX_GRAD_NORM)
        with torch.no_grad():
            for t in p.values():
                g, decay = t.grad, WEIGHT_DECAY if (t.ndim >= 2 or decay_norms) else 0.0
                if coupled:  # Adam with L2 regularisation instead of decoupled decay
                    g = g + decay * t
                else:
                    t.mul_(1 - LR * decay)
                m, v = (1 - BETAS[0]) * g, (1 - BETAS[1]) * g * g
                c1, c2 = 1 - BETAS[0], 1 - BETAS[1]
                if eps_before_correction:
                    denom = (v.sqrt() + eps) / math.sqrt(c2)
                else:
                    denom = v.sqrt() / math.sqrt(c2) + eps
                t.sub_(LR / c1 * m / denom)
        return {n: t.detach() for n, t in p.items()}

    exact = variant()
    assert max(rel_err(exact[n], updated[n]) for n in updated) < 1e-6, "hand-written AdamW != torch.optim.AdamW"
    for slip in ({"clip": False}, {"eps": 1e-8}, {"decay_norms": True}, {"coupled": True},
                 {"eps_before_correction": True}):
        other = variant(**slip)
        assert max(rel_err(other[n], updated[n]) for n in updated) > 1e-4, f"the step does not expose {slip}"


def check_rope_matters(params, cfg, ids):
    """The fixture must tell its RoPE variant apart from the plain one (and, for llama3, every band
    from its neighbours) by far more than the 1e-4 parity tolerance."""
    if cfg["rope_scaling"] is None:
        return
    with torch.no_grad():
        logits, _ = forward(params, cfg, ids)
        plain, _ = forward(params, cfg, ids, default_inv_freq(cfg["head_dim"], cfg["rope_theta"]))
        assert rel_err(plain, logits) > 1e-2, f"{cfg['rope_scaling']} barely changes the logits"
        if cfg["rope_scaling"]["rope_type"] != "llama3":
            return
        bands = llama3_bands(cfg)
        assert set(bands) == {"kept", "smoothed", "divided"}, f"llama3 bands not all exercised: {bands}"
        # Flip the highest frequency of each band to another band's rule and require a visible change.
        base = default_inv_freq(cfg["head_dim"], cfg["rope_theta"])
        actual = rope_inv_freq(cfg)
        factor = cfg["rope_scaling"]["factor"]
        for band in ("kept", "smoothed", "divided"):
            j = bands.index(band)
            alternative = base[j] / factor if band == "kept" else base[j]
            changed = actual.clone()
            changed[j] = alternative
            other, _ = forward(params, cfg, ids, changed)
            assert rel_err(other, logits) > 5e-4, f"llama3 band '{band}' (frequency {j}) is not visible"


# ----------------------------------------------------------------------------------------------------
# Fixture assembly
# ----------------------------------------------------------------------------------------------------

def build(fixture):
    """Draws a model and inputs from successive seeds until the fixture is a sharp test: an unambiguous,
    varied greedy continuation without EOS, an active gradient clip, and a reference whose fp32 rounding
    sits well inside the C# tolerances."""
    cfg = fixture["config"]
    for attempt in range(MAX_SEED_TRIES):
        seed = fixture["seed"] + attempt
        gen = torch.Generator().manual_seed(seed)
        params = init_parameters(cfg, gen)
        vocab = cfg["vocab_size"]
        input_ids = torch.randint(0, vocab, LOGITS_SHAPE, generator=gen, dtype=torch.int64)
        train_ids = torch.randint(0, vocab, TRAIN_SHAPE, generator=gen, dtype=torch.int64)
        prompt = torch.randint(0, vocab, PROMPT_SHAPE, generator=gen, dtype=torch.int64)
        tokens, margin = greedy(params, cfg, prompt, NEW_TOKENS)
        loss, grad_norm, grads, updated = train_step(params, cfg, train_ids)
        with torch.no_grad():
            logits, _ = forward(params, cfg, input_ids)
        precision = precision_report(params, cfg, input_ids, logits, train_ids, loss, grad_norm, grads, updated)
        reasons = []
        if margin <= MIN_GREEDY_MARGIN:
            reasons.append(f"greedy margin {margin:.2e}")
        distinct = len(set(tokens.flatten().tolist()))
        if distinct < MIN_DISTINCT_GREEDY:
            reasons.append(f"greedy uses only {distinct} distinct tokens")
        if (tokens == cfg["eos_token_id"]).any():
            # A generator that stops at EOS would then emit fewer than NEW_TOKENS tokens.
            reasons.append("greedy emits EOS")
        if grad_norm.item() <= MAX_GRAD_NORM:
            # Clipping must be active so that the C# step is checked with it.
            reasons.append(f"grad norm {grad_norm.item():.3f} would not be clipped")
        if precision["logits"] > MAX_LOGITS_ERR:
            reasons.append(f"fp32 logits {precision['logits']:.1e} from float64")
        worst_step = max(precision["loss"], precision["grad_norm"], precision["updated"],
                         precision["step_conditioning"])
        if worst_step > MAX_STEP_ERR:
            reasons.append(f"training step ill-conditioned ({worst_step:.1e})")
        if reasons:
            print(f"  {fixture['name']}: seed {seed} rejected ({', '.join(reasons)})")
            continue
        return {
            "seed": seed, "params": params, "input_ids": input_ids, "logits": logits,
            "train_ids": train_ids, "loss": loss, "grad_norm": grad_norm, "grads": grads, "updated": updated,
            "prompt": prompt, "tokens": tokens, "margin": margin, "precision": precision,
        }
    raise RuntimeError(f"{fixture['name']}: no seed in {MAX_SEED_TRIES} tries gives an unambiguous fixture")


def shard(params, max_shard_size):
    """transformers/huggingface_hub sharding: walk the state dict in module order and start a new shard
    when the next tensor would push the current one past max_shard_size bytes."""
    shards, current, current_size = [], [], 0
    for name, t in params.items():
        size = t.numel() * t.element_size()
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    shards.append(current)
    return shards


def write_fixture(root, fixture, result):
    cfg = fixture["config"]
    folder = os.path.join(root, fixture["name"])
    os.makedirs(folder, exist_ok=True)
    params = result["params"]
    weights_meta = {"format": "pt"}  # what transformers' save_pretrained puts in every weights file

    write_json(os.path.join(folder, "config.json"), cfg)
    if fixture["max_shard_size"] is None:
        write_safetensors(os.path.join(folder, "model.safetensors"), params, weights_meta)
    else:
        groups = shard(params, fixture["max_shard_size"])
        assert len(groups) == 2, f"max_shard_size gives {len(groups)} shards, the fixture wants 2"
        weight_map = {}
        for index, names in enumerate(groups, start=1):
            file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(os.path.join(folder, file), {n: params[n] for n in names}, weights_meta)
            weight_map.update({n: file for n in names})
        assert sorted(weight_map) == sorted(parameter_shapes(cfg)), "index weight_map must cover every parameter"
        total = sum(t.numel() * t.element_size() for t in params.values())
        write_json(os.path.join(folder, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})

    expected = {
        "input_ids": result["input_ids"],
        "logits": result["logits"],
        "train_input_ids": result["train_ids"],
        "loss": result["loss"].reshape(()),
        "grad_norm": result["grad_norm"].reshape(()).float(),
        "greedy_prompt": result["prompt"],
        "greedy_tokens": result["tokens"],
        "rope_inv_freq": rope_inv_freq(cfg),
    }
    expected.update({f"updated.{n}": t for n, t in result["updated"].items()})
    for name, t in expected.items():
        assert t.dtype in (torch.float32, torch.int64), f"{name}: {t.dtype}"
    meta = {
        "format": "pt",
        "generator": "tools/make_fixtures.py",
        "seed": result["seed"],
        "greedy_min_margin": f"{result['margin']:.6g}",
        "torch_version": torch.__version__,
        # The training step's hyperparameters, so that a test reads them instead of restating them.
        "adamw_lr": repr(LR),
        "adamw_betas": f"{BETAS[0]!r},{BETAS[1]!r}",
        "adamw_eps": repr(ADAM_EPS),
        "adamw_weight_decay": repr(WEIGHT_DECAY),
        "max_grad_norm": repr(MAX_GRAD_NORM),
    }
    write_safetensors(os.path.join(folder, "expected.safetensors"), expected, meta)


def reload_and_compare(root, fixture, result):
    """Reads the folder back the way a loader would (index -> shards) and checks the model is unchanged."""
    folder = os.path.join(root, fixture["name"])
    index_path = os.path.join(folder, "model.safetensors.index.json")
    loaded = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        for file in sorted(set(index["weight_map"].values())):
            tensors, _ = read_safetensors(os.path.join(folder, file))
            assert all(index["weight_map"][n] == file for n in tensors), f"{file}: holds tensors not mapped to it"
            loaded.update(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    else:
        loaded, _ = read_safetensors(os.path.join(folder, "model.safetensors"))
    assert sorted(loaded) == sorted(result["params"]), "weights files hold other tensors than the model"
    for name, t in result["params"].items():
        assert bit_equal(loaded[name], t), name
    with torch.no_grad():
        logits, _ = forward(loaded, fixture["config"], result["input_ids"])
    assert bit_equal(logits, result["logits"]), "reloaded model gives other logits"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: tests/fixtures/parity)")
    args = parser.parse_args()

    # One thread: BLAS reductions then run in a fixed order, so the bytes do not depend on the machine's
    # core count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    for fixture in FIXTURES:
        cfg = fixture["config"]
        assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
        result = build(fixture)
        if cfg["tie_word_embeddings"]:
            check_tied(result["params"], cfg, result["train_ids"])
        check_rope_matters(result["params"], cfg, result["input_ids"])
        check_step_matters(result["params"], result["grads"], result["updated"])
        write_fixture(args.out, fixture, result)
        reload_and_compare(args.out, fixture, result)

        inv32 = default_inv_freq(cfg["head_dim"], cfg["rope_theta"])
        exponents = torch.arange(0, cfg["head_dim"], 2, dtype=torch.float64) / cfg["head_dim"]
        inv64 = 1.0 / cfg["rope_theta"] ** exponents
        ulp_gap = ((inv32.double() - inv64).abs() / inv64).max().item()
        n_params = sum(t.numel() for t in result["params"].values())
        print(f"{fixture['name']}: seed {result['seed']}, {n_params} parameters, loss {result['loss'].item():.4f}, "
              f"grad norm {result['grad_norm'].item():.4f}, greedy margin >= {result['margin']:.4f}, "
              f"{len(set(result['tokens'].flatten().tolist()))} distinct greedy tokens, "
              f"inv_freq fp32 vs fp64 max rel diff {ulp_gap:.1e}")
        print("  fp32 vs float64 (relative, worst tensor): "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["precision"].items()))

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.out) for f in files)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
