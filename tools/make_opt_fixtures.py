#!/usr/bin/python3
"""Independent PyTorch reference for FrugalLM's OPT runtime: writes the OPT parity fixtures.

Run it with Debian's interpreter, which is the one that has PyTorch (`apt-get install python3-torch`
gives 1.13), under the reference BLAS the machine's `libblas.so.3` points to:

    /usr/bin/python3 tools/make_opt_fixtures.py                 # writes tests/fixtures/parity/opt-*/
    /usr/bin/python3 tools/make_opt_fixtures.py --out /tmp/p    # anywhere else

Each fixture is a small random OPTForCausalLM saved as a Hugging Face folder (config.json and
model.safetensors) plus expected.safetensors: logits for fixed inputs, the loss, gradient norm and updated
weights of one clipped AdamW step, and a greedy continuation. tests/fixtures/parity/README.md describes
the files; its "OPT fixtures" section lists what differs from the LLaMA ones.

The model is written here from the definition of transformers' modeling_opt (eager attention, queries
scaled by head_dim^-0.5 before the product), without transformers or the safetensors package, so that it
is an independent check of the C# runtime. The safetensors writer and the optimizer step are those of
tools/make_fixtures.py, so both families follow one definition. The output is deterministic: rerunning
reproduces the same bytes (single-threaded CPU math, seeded generators, sorted JSON and tensor order).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the LLaMA fixtures' writer, step and constants)

DEFAULT_OUT = mf.DEFAULT_OUT

# OPTLearnedPositionalEmbedding: the table has max_position_embeddings + 2 rows and position p reads row
# p + 2 (fairseq reserved the first rows for padding).
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default; OPTConfig has no eps field

# Initialisation scales chosen so that activations, logits and gradients are O(1) (see make_fixtures.py).
# Biases and LayerNorm shifts are drawn too: zero biases would not test that they are loaded and applied.
LINEAR_STD, BIAS_STD, NORM_JITTER, POSITION_STD = 0.15, 0.1, 0.1, 0.3
EMBED_STD, TIED_EMBED_STD = 1.0, 0.3


def hf_config(vocab, hidden, ffn, layers, heads, max_positions, word_embed_proj_dim, layer_norm_before, tied):
    """The config.json that transformers' OPTConfig.save_pretrained writes for these sizes (dropouts 0 so
    that one training step is deterministic)."""
    return {
        "_remove_final_layer_norm": False,
        "activation_dropout": 0.0,
        "activation_function": "relu",
        "architectures": ["OPTForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "do_layer_norm_before": layer_norm_before,
        "dropout": 0.0,
        "enable_bias": True,
        "eos_token_id": 2,
        "ffn_dim": ffn,
        "hidden_size": hidden,
        "init_std": 0.02,
        "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0,
        "max_position_embeddings": max_positions,
        "model_type": "opt",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
        "word_embed_proj_dim": word_embed_proj_dim,
    }


FIXTURES = [
    # The layout of every OPT size but 350M: LayerNorm before attention and MLP, a final LayerNorm, the
    # head tied to the embedding, no projections.
    {
        "name": "opt-tiny",
        "seed": 4000,
        "config": hf_config(vocab=96, hidden=64, ffn=128, layers=2, heads=4, max_positions=64,
                            word_embed_proj_dim=64, layer_norm_before=True, tied=True),
    },
    # The 350M shape: LayerNorm after each residual sum, no final LayerNorm, embeddings narrower than the
    # hidden size (project_in / project_out). Untied, so that lm_head.weight ([vocab, word_embed_proj_dim],
    # acting after project_out) is loaded and trained too. Narrow to keep both OPT fixtures near 1 MB.
    {
        "name": "opt-postln-proj",
        "seed": 5000,
        "config": hf_config(vocab=96, hidden=32, ffn=64, layers=2, heads=4, max_positions=64,
                            word_embed_proj_dim=24, layer_norm_before=False, tied=False),
    },
]


# ----------------------------------------------------------------------------------------------------
# OPT (transformers' OPTForCausalLM, eager attention), fp32
# ----------------------------------------------------------------------------------------------------

def parameter_shapes(cfg):
    """HF state-dict names and shapes in OPTForCausalLM's module order. A tied model has no lm_head.weight
    entry: the head is model.decoder.embed_tokens.weight."""
    h, f, e = cfg["hidden_size"], cfg["ffn_dim"], cfg["word_embed_proj_dim"]
    d = "model.decoder."
    shapes = {
        d + "embed_tokens.weight": (cfg["vocab_size"], e),
        d + "embed_positions.weight": (cfg["max_position_embeddings"] + POSITION_OFFSET, h),
    }
    if e != h:
        shapes[d + "project_out.weight"] = (e, h)
        shapes[d + "project_in.weight"] = (h, e)
    if cfg["do_layer_norm_before"] and not cfg["_remove_final_layer_norm"]:
        shapes[d + "final_layer_norm.weight"] = (h,)
        shapes[d + "final_layer_norm.bias"] = (h,)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"{d}layers.{layer}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
            shapes[p + f"self_attn.{proj}.bias"] = (h,)
        shapes[p + "self_attn_layer_norm.weight"] = (h,)
        shapes[p + "self_attn_layer_norm.bias"] = (h,)
        shapes[p + "fc1.weight"] = (f, h)
        shapes[p + "fc1.bias"] = (f,)
        shapes[p + "fc2.weight"] = (h, f)
        shapes[p + "fc2.bias"] = (h,)
        shapes[p + "final_layer_norm.weight"] = (h,)
        shapes[p + "final_layer_norm.bias"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], e)
    return shapes


def init_parameters(cfg, gen):
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        if "layer_norm.weight" in name:
            params[name] = 1.0 + NORM_JITTER * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            params[name] = BIAS_STD * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            std = TIED_EMBED_STD if cfg["tie_word_embeddings"] else EMBED_STD
            params[name] = std * torch.randn(shape, generator=gen)
        elif name.endswith("embed_positions.weight"):
            params[name] = POSITION_STD * torch.randn(shape, generator=gen)
        else:
            params[name] = LINEAR_STD * torch.randn(shape, generator=gen)
    return params


def layer_norm(x, p, prefix):
    return F.layer_norm(x, (x.shape[-1],), p[prefix + ".weight"], p[prefix + ".bias"], LAYER_NORM_EPS)


def linear(x, p, prefix):
    return F.linear(x, p[prefix + ".weight"], p.get(prefix + ".bias"))


def attention(x, p, prefix, cfg, cache=None):
    """OPTAttention: q = q_proj(x) * head_dim^-0.5, causal softmax(q kᵀ) v, out_proj. `cache`, when given,
    is this layer's KV cache (a dict, empty before the first call) that the new keys and values extend."""
    batch, seq, hidden = x.shape
    heads = cfg["num_attention_heads"]
    d = hidden // heads
    q = (linear(x, p, prefix + "q_proj") * d ** -0.5).view(batch, seq, heads, d).transpose(1, 2)
    k = linear(x, p, prefix + "k_proj").view(batch, seq, heads, d).transpose(1, 2)
    v = linear(x, p, prefix + "v_proj").view(batch, seq, heads, d).transpose(1, 2)
    past = 0
    if cache is not None:
        if cache:
            past = cache["k"].shape[2]
            k = torch.cat((cache["k"], k), dim=2)
            v = torch.cat((cache["v"], v), dim=2)
        cache["k"], cache["v"] = k, v
    scores = torch.matmul(q, k.transpose(2, 3))
    # Query i sits at position past + i and sees keys 0 .. past + i.
    causal = torch.ones(seq, past + seq, dtype=torch.bool).triu(1 + past)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=mf.compute_dtype(scores.dtype)).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, hidden)
    return linear(out, p, prefix + "out_proj")


def decoder_layer(h, p, prefix, cfg, cache=None):
    """OPTDecoderLayer with dropout 0: pre-LN (do_layer_norm_before) or post-LN (350M)."""
    before = cfg["do_layer_norm_before"]
    residual = h
    x = layer_norm(h, p, prefix + "self_attn_layer_norm") if before else h
    h = residual + attention(x, p, prefix + "self_attn.", cfg, cache)
    if not before:
        h = layer_norm(h, p, prefix + "self_attn_layer_norm")
    residual = h
    x = layer_norm(h, p, prefix + "final_layer_norm") if before else h
    h = residual + linear(F.relu(linear(x, p, prefix + "fc1")), p, prefix + "fc2")
    if not before:
        h = layer_norm(h, p, prefix + "final_layer_norm")
    return h


def forward(p, cfg, ids, cache=None, position_offset=POSITION_OFFSET):
    """Returns (logits, final hidden states before project_out). `cache`: one dict per layer (empty at
    first) that the call extends; ids are then the tokens after the cached ones."""
    d = "model.decoder."
    past = cache[0]["k"].shape[2] if cache is not None and cache[0] else 0
    # padding_idx only changes the gradient: the pad row gets none from lookups.
    h = F.embedding(ids, p[d + "embed_tokens.weight"], padding_idx=cfg["pad_token_id"])
    if d + "project_in.weight" in p:
        h = linear(h, p, d + "project_in")
    positions = torch.arange(past, past + ids.shape[1], dtype=torch.int64) + position_offset
    h = h + F.embedding(positions, p[d + "embed_positions.weight"])
    for layer in range(cfg["num_hidden_layers"]):
        h = decoder_layer(h, p, f"{d}layers.{layer}.", cfg, None if cache is None else cache[layer])
    if d + "final_layer_norm.weight" in p:
        h = layer_norm(h, p, d + "final_layer_norm")
    hidden = h
    if d + "project_out.weight" in p:
        h = linear(h, p, d + "project_out")
    head = p["lm_head.weight"] if "lm_head.weight" in p else p[d + "embed_tokens.weight"]
    return F.linear(h, head), hidden


def causal_lm_loss(p, cfg, ids):
    # OPTForCausalLM's loss: predict token t+1 from positions <= t, mean over every position.
    logits, _ = forward(p, cfg, ids)
    vocab = cfg["vocab_size"]
    shifted = logits[:, :-1].reshape(-1, vocab)
    return F.cross_entropy(shifted.to(mf.compute_dtype(shifted.dtype)), ids[:, 1:].reshape(-1))


def gradients(params, cfg, ids):
    p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    loss = causal_lm_loss(p, cfg, ids)
    loss.backward()
    return loss.detach(), {n: t.grad.clone() for n, t in p.items()}


def train_step(params, cfg, ids):
    """One step: loss, backward, then make_fixtures.py's clip_grad_norm_(1.0) and AdamW (decay on
    ndim >= 2 only: the matrices and both embeddings; not biases or LayerNorms).
    Returns (loss, pre-clip gradient norm, pre-clip gradients, updated parameters)."""
    loss, grads = gradients(params, cfg, ids)
    grad_norm, updated = mf.optimizer_step(params, grads)
    return loss, grad_norm, grads, updated


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

def precision_report(params, cfg, input_ids, logits, train_ids, loss, grad_norm, grads, updated):
    """make_fixtures.precision_report for OPT: the fixture recomputed in float64, and the float64 step
    repeated from gradients jittered by twice each element's own fp32 rounding error."""
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
        _, other = mf.optimizer_step(p64, jittered)
        jittered_err = max(jittered_err, max(mf.rel_err(other[n], updated64[n]) for n in params))
    # A key bias adds q·b to every score of a query, which softmax ignores: its exact gradient is zero, so
    # both precisions hold only rounding noise there (and its AdamW step is ~lr * noise / eps, negligible).
    keyless = [n for n in params if not n.endswith("k_proj.bias")]
    for n in params:
        if n.endswith("k_proj.bias"):
            assert grads64[n].norm() < 1e-12 * grads64["model.decoder.embed_tokens.weight"].norm(), n
    return {
        "logits": mf.rel_err(logits, logits64),
        "loss": abs(loss.item() - loss64.item()) / abs(loss64.item()),
        "grad_norm": abs(grad_norm.item() - norm64.item()) / norm64.item(),
        "grads": max(mf.rel_err(grads[n], grads64[n]) for n in keyless),
        "updated": max(mf.rel_err(updated[n], updated64[n]) for n in params),
        "step_conditioning": jittered_err,
    }


def check_architecture_matters(params, cfg, input_ids, train_ids, updated):
    """The fixture must catch the OPT-specific slips by far more than the C# tolerances (logits 1e-4,
    updated weights 1e-5): positions without the +2 offset, the other LayerNorm placement, and a pad row
    that learns from its lookups."""
    with torch.no_grad():
        logits, _ = forward(params, cfg, input_ids)
        unshifted, _ = forward(params, cfg, input_ids, position_offset=0)
        assert mf.rel_err(unshifted, logits) > 1e-2, "the position offset barely changes the logits"
        flipped, _ = forward(params, dict(cfg, do_layer_norm_before=not cfg["do_layer_norm_before"]), input_ids)
        assert mf.rel_err(flipped, logits) > 1e-2, "LayerNorm placement barely changes the logits"
    assert (train_ids == cfg["pad_token_id"]).any(), "the training batch must contain the pad token"
    _, _, _, leaky = train_step(params, dict(cfg, pad_token_id=None), train_ids)
    name = "model.decoder.embed_tokens.weight"
    assert mf.rel_err(leaky[name], updated[name]) > 1e-4, "the pad row's gradient rule is not visible"


# ----------------------------------------------------------------------------------------------------
# Fixture assembly
# ----------------------------------------------------------------------------------------------------

def build(fixture):
    """Draws a model and inputs from successive seeds until the fixture is a sharp test (as make_fixtures.py
    does): an unambiguous, varied greedy continuation without EOS, an active gradient clip, and a reference
    whose fp32 rounding sits well inside the C# tolerances. The training batch always contains the pad
    token, whose embedding row gets no gradient from lookups."""
    cfg = fixture["config"]
    for attempt in range(mf.MAX_SEED_TRIES):
        seed = fixture["seed"] + attempt
        gen = torch.Generator().manual_seed(seed)
        params = init_parameters(cfg, gen)
        vocab = cfg["vocab_size"]
        input_ids = torch.randint(0, vocab, mf.LOGITS_SHAPE, generator=gen, dtype=torch.int64)
        train_ids = torch.randint(0, vocab, mf.TRAIN_SHAPE, generator=gen, dtype=torch.int64)
        train_ids[0, 3] = cfg["pad_token_id"]
        prompt = torch.randint(0, vocab, mf.PROMPT_SHAPE, generator=gen, dtype=torch.int64)
        tokens, margin = greedy(params, cfg, prompt, mf.NEW_TOKENS)
        loss, grad_norm, grads, updated = train_step(params, cfg, train_ids)
        with torch.no_grad():
            logits, _ = forward(params, cfg, input_ids)
        precision = precision_report(params, cfg, input_ids, logits, train_ids, loss, grad_norm, grads, updated)
        reasons = []
        if margin <= mf.MIN_GREEDY_MARGIN:
            reasons.append(f"greedy margin {margin:.2e}")
        distinct = len(set(tokens.flatten().tolist()))
        if distinct < mf.MIN_DISTINCT_GREEDY:
            reasons.append(f"greedy uses only {distinct} distinct tokens")
        if (tokens == cfg["eos_token_id"]).any():
            reasons.append("greedy emits EOS")
        if grad_norm.item() <= mf.MAX_GRAD_NORM:
            reasons.append(f"grad norm {grad_norm.item():.3f} would not be clipped")
        if precision["logits"] > mf.MAX_LOGITS_ERR:
            reasons.append(f"fp32 logits {precision['logits']:.1e} from float64")
        worst_step = max(precision["loss"], precision["grad_norm"], precision["updated"],
                         precision["step_conditioning"])
        if worst_step > mf.MAX_STEP_ERR:
            reasons.append(f"training step ill-conditioned ({worst_step:.1e})")
        if reasons:
            print(f"  {fixture['name']}: seed {seed} rejected ({', '.join(reasons)})")
            continue
        return {
            "seed": seed, "params": params, "input_ids": input_ids, "logits": logits,
            "train_ids": train_ids, "loss": loss, "grad_norm": grad_norm, "grads": grads, "updated": updated,
            "prompt": prompt, "tokens": tokens, "margin": margin, "precision": precision,
        }
    raise RuntimeError(f"{fixture['name']}: no seed in {mf.MAX_SEED_TRIES} tries gives an unambiguous fixture")


def check_cache(params, cfg, ids):
    """The reference's own KV-cache path (prefix, then a 3-token chunk, then single tokens) reproduces the
    full pass, so the greedy tokens do not depend on how the C# side splits the sequence."""
    with torch.no_grad():
        full, _ = forward(params, cfg, ids)
        cache = [{} for _ in range(cfg["num_hidden_layers"])]
        pieces, start = [], 0
        for size in (4, 3) + (1,) * (ids.shape[1] - 7):
            logits, _ = forward(params, cfg, ids[:, start:start + size], cache)
            pieces.append(logits)
            start += size
        assert mf.rel_err(torch.cat(pieces, dim=1), full) < 1e-6, "KV-cache logits differ from the full pass"


def write_fixture(root, fixture, result):
    cfg = fixture["config"]
    folder = os.path.join(root, fixture["name"])
    os.makedirs(folder, exist_ok=True)
    mf.write_json(os.path.join(folder, "config.json"), cfg)
    mf.write_safetensors(os.path.join(folder, "model.safetensors"), result["params"], {"format": "pt"})
    expected = {
        "input_ids": result["input_ids"],
        "logits": result["logits"],
        "train_input_ids": result["train_ids"],
        "loss": result["loss"].reshape(()),
        "grad_norm": result["grad_norm"].reshape(()).float(),
        "greedy_prompt": result["prompt"],
        "greedy_tokens": result["tokens"],
    }
    expected.update({f"updated.{n}": t for n, t in result["updated"].items()})
    for name, t in expected.items():
        assert t.dtype in (torch.float32, torch.int64), f"{name}: {t.dtype}"
    meta = {
        "format": "pt",
        "generator": "tools/make_opt_fixtures.py",
        "seed": result["seed"],
        "greedy_min_margin": f"{result['margin']:.6g}",
        "torch_version": torch.__version__,
        "adamw_lr": repr(mf.LR),
        "adamw_betas": f"{mf.BETAS[0]!r},{mf.BETAS[1]!r}",
        "adamw_eps": repr(mf.ADAM_EPS),
        "adamw_weight_decay": repr(mf.WEIGHT_DECAY),
        "max_grad_norm": repr(mf.MAX_GRAD_NORM),
    }
    mf.write_safetensors(os.path.join(folder, "expected.safetensors"), expected, meta)


def reload_and_compare(root, fixture, result):
    """Reads the folder back with the independent parser and checks the model is unchanged."""
    folder = os.path.join(root, fixture["name"])
    loaded, _ = mf.read_safetensors(os.path.join(folder, "model.safetensors"))
    assert sorted(loaded) == sorted(parameter_shapes(fixture["config"])), "weights file holds other tensors"
    for name, t in result["params"].items():
        assert mf.bit_equal(loaded[name], t), name
    with torch.no_grad():
        logits, _ = forward(loaded, fixture["config"], result["input_ids"])
    assert mf.bit_equal(logits, result["logits"]), "reloaded model gives other logits"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: tests/fixtures/parity)")
    args = parser.parse_args()

    # One thread: BLAS reductions then run in a fixed order, so the bytes do not depend on the core count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    total = 0
    for fixture in FIXTURES:
        cfg = fixture["config"]
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
        result = build(fixture)
        check_architecture_matters(result["params"], cfg, result["input_ids"], result["train_ids"], result["updated"])
        mf.check_step_matters(result["params"], result["grads"], result["updated"])
        check_cache(result["params"], cfg, torch.cat((result["prompt"], result["tokens"]), dim=1))
        write_fixture(args.out, fixture, result)
        reload_and_compare(args.out, fixture, result)
        n_params = sum(t.numel() for t in result["params"].values())
        folder = os.path.join(args.out, fixture["name"])
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        total += size
        print(f"{fixture['name']}: seed {result['seed']}, {n_params} parameters, loss {result['loss'].item():.4f}, "
              f"grad norm {result['grad_norm'].item():.4f}, greedy margin >= {result['margin']:.4f}, "
              f"{len(set(result['tokens'].flatten().tolist()))} distinct greedy tokens, {size / 1e3:.0f} kB")
        print("  fp32 vs float64 (relative, worst tensor): "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["precision"].items()))
    print(f"wrote {len(FIXTURES)} OPT fixtures under {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
