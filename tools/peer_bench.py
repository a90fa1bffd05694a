#!/usr/bin/python3
"""The PyTorch side of `frugal bench --peer pytorch`: one training or generation configuration per process.

Run it with Debian's interpreter, which has PyTorch 1.13 (`apt-get install python3-torch
libopenblas0-pthread`); a pyenv `python3` earlier on PATH has no torch:

    /usr/bin/python3 tools/peer_bench.py --config models/configs/frugal-kjv-17m.json --mode train \\
        --precision bf16 --checkpointing 1 --lora-r 16 --batch 8 --seq 256 --steps 5 --warmup 1 --threads 2
    /usr/bin/python3 tools/peer_bench.py --config models/configs/frugal-kjv-17m.json --mode generate \\
        --quantize int8 --batch 1 --prompt-tokens 32 --new-tokens 64 --steps 5 --warmup 1 --threads 2
    /usr/bin/python3 tools/peer_bench.py --self-test

A run prints exactly one JSON line on stdout; an error prints a message on stderr and exits with status 2
(bad arguments or environment) or 1 (a failure inside PyTorch). tools/README.md lists the JSON fields.

The model is the independent LLaMA of tools/make_fixtures.py (transformers' LlamaForCausalLM, eager
attention, with a KV cache for generation), its weights held in torch.nn modules so that PyTorch's own
tools apply to it. What each flag maps to in PyTorch, and the FrugalLM setting it is the peer of:

  --mode train          random token batches [batch, seq + 1] (seeded, a new one every step); the model
                        reads the first seq tokens; the loss is the mean next-token cross-entropy over the
                        batch x seq targets, from fp32 logits; backward, clip_grad_norm_(1.0),
                        torch.optim.AdamW(lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
                        matrices and the embedding, 0 on norm weights), zero_grad(set_to_none=True)
                        = `frugal train` with --lr 1e-4 at a constant rate, --weight-decay 0.1 (also with
                        LoRA), --grad-clip 1.0, --loss-chunk 0 (full logits, as transformers).
  --precision bf16      torch.autocast("cpu", dtype=torch.bfloat16) around forward and loss, fp32 weights
                        and optimizer (PyTorch's standard CPU mixed precision) = `--precision bf16`.
  --checkpointing 1     torch.utils.checkpoint.checkpoint (reentrant, 1.13's default) around each decoder
                        layer; the layer input is made to require grad (PEFT's enable_input_require_grads),
                        or adapters under a frozen base would get no gradient
                        = `--grad-checkpointing --checkpoint-every 1`.
  --lora-r R            PEFT-style LoRA on --lora-targets (module names, or all-linear: every projection,
                        not lm_head): y = base(x) + B(A(x)) * alpha / r, alpha = 2r (--lora-alpha), A
                        kaiming-uniform (a = sqrt 5), B zeros, no dropout; every base weight frozen, only A
                        and B in AdamW = `--lora-r R --lora-targets ... --lora-alpha 2R --lora-dropout 0`.
  --mode generate       greedy decoding of --batch prompts of --prompt-tokens random tokens with a KV cache:
                        the prefill pass's last logits give the first new token, then --new-tokens - 1
                        one-token decode passes; no EOS stop. prefill tokens/s = batch x prompt / prefill
                        time, decode tokens/s = batch x (new - 1) / decode time, as FrugalLM's TextGenerator
                        counts them = `frugal generate` greedy (batch 1), never stopping early.
  --precision bf16      (generate) every weight stored and computed in bf16 (model.to(bfloat16)).
  --quantize int8       (generate) torch.quantization.quantize_dynamic(model, {nn.Linear}, qint8) on every
                        linear layer except lm_head (excluded to match LLM.int8's default, which keeps the
                        head in full precision; a tied head is the embedding and never a Linear); int8
                        weights per tensor, activations quantized per call = `--quantize int8` (LLM.int8:
                        FrugalLM's weights are per row, with outlier decomposition).

Weights: fp32 (bf16 when generating in bf16), drawn as transformers' _init_weights does (N(0,
initializer_range = 0.02) for matrices and the embedding, ones for norms) from a generator seeded with
--seed; a tied head is the embedding. Threads: torch.set_num_threads(--threads), OMP_NUM_THREADS and
OPENBLAS_NUM_THREADS; OMP_WAIT_POLICY=PASSIVE unless the environment sets it, as FrugalLM's TorchRuntime
does (with libgomp's spinning default a training step took 4x longer on this busy 2-core machine).

BLAS: Debian's libtorch links libblas.so.3, which is the netlib reference BLAS unless an optimized one is
installed (libtorch1.13 only recommends OpenBLAS). The reference BLAS makes fp32 matmuls ~13x slower here
(512x2048x2048: 0.80 s against 0.06 s with OpenBLAS) and would make the comparison meaningless, so by
default this script loads OpenBLAS (libopenblas0-pthread, or -openmp) before torch, whatever the system's
libblas.so.3 alternative says, and fails if it is absent; `--blas system` takes whatever libblas.so.3
resolves to. The JSON names the BLAS that was loaded. Debian's build has no fbgemm: quantize_dynamic runs
on the oneDNN engine.

Memory: baseline_rss_bytes is VmRSS after the data is built and before the model is; the peak (VmHWM) is
then reset (`5` into /proc/self/clear_refs) and read after the last step, so peak_rss_bytes covers model
construction, every step and the optimizer state. Python and torch's libraries are in the baseline:
compare peak minus baseline between runtimes, not raw peaks.

PyTorch 1.13 has no scaled_dot_product_attention: attention is explicit (matmul, mask, softmax, matmul), so
it materializes the [batch, heads, seq, seq] scores and probabilities, and training keeps them for backward.
"""

import argparse
import copy
import ctypes
import json
import math
import os
import statistics
import sys
import time

# Debian's OpenBLAS builds (libopenblas0-pthread, libopenblas0-openmp), each a drop-in libblas.so.3.
OPENBLAS_DIRS = [f"/usr/lib/{arch}-linux-gnu/openblas-{kind}"
                 for arch in ("x86_64", "aarch64") for kind in ("pthread", "openmp")]

LR, BETAS, ADAM_EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
INITIALIZER_RANGE = 0.02  # transformers' LlamaConfig default


class BenchError(Exception):
    """A bad argument or an unusable environment: a message on stderr and exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(description="PyTorch peer of FrugalLM's benchmark: one configuration per run, "
                                            "one JSON line on stdout (see the top of this file).")
    p.add_argument("--config", help="Hugging Face config.json of a LLaMA model (the weights are random)")
    p.add_argument("--mode", choices=("train", "generate"), default="train")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--checkpointing", type=int, choices=(0, 1), default=0)
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 trains every weight")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (prompts decoded together)")
    p.add_argument("--seq", type=int, default=256, help="training tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (one whole generation each, generating)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW decay of matrices and the embedding")
    p.add_argument("--blas", default="openblas",
                   help="'openblas' (default: Debian's OpenBLAS, loaded before torch), 'system' (whatever "
                        "libblas.so.3 resolves to), or a folder holding a libblas.so.3")
    p.add_argument("--self-test", action="store_true", help="check this implementation on tiny models")
    args = p.parse_args(argv)
    if not args.self_test:
        validate(args)
    return args


def validate(args):
    if not args.config:
        raise BenchError("--config is required (an HF config.json)")
    for name in ("batch", "seq", "steps", "threads", "new_tokens", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.lora_r < 0:
        raise BenchError("--warmup and --lora-r cannot be negative")
    if args.mode == "train" and args.quantize != "none":
        raise BenchError("--quantize int8 is for --mode generate: quantize_dynamic's modules have no backward, "
                         "and PyTorch's int8-base training (bitsandbytes) has no CPU build")
    if args.mode == "generate" and (args.checkpointing or args.lora_r):
        raise BenchError("--checkpointing and --lora-r apply to --mode train")
    if args.quantize == "int8" and args.precision != "fp32":
        raise BenchError("--quantize int8 computes activations in fp32: use --precision fp32")
    if args.lora_r and not lora_targets(args):
        raise BenchError("--lora-targets is empty")


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_targets(args):
    names = sorted({t.strip() for t in args.lora_targets.split(",") if t.strip()})
    # PEFT's all-linear: every linear layer but the output head.
    return list(LINEAR_NAMES) if names == ["all-linear"] else names


def load_blas(choice, threads):
    """Sets the OpenMP and OpenBLAS environment and loads the chosen libblas.so.3 (and liblapack.so.3) with
    RTLD_GLOBAL, so that libtorch's dependency on that soname binds to it when torch is imported: must run
    before that import (libgomp and OpenBLAS read their environment when they load). Returns the library's
    path, or None with --blas system."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # FrugalLM's TorchRuntime does the same: spinning OpenMP workers on a busy machine make every parallel
    # region wait for a descheduled thread (a training step here took 4x longer with libgomp's default).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if choice == "system":
        return None
    if choice == "openblas":
        found = [d for d in OPENBLAS_DIRS if os.path.exists(os.path.join(d, "libblas.so.3"))]
        if not found:
            raise BenchError("OpenBLAS not found (apt-get install libopenblas0-pthread); --blas system measures "
                             "with whatever libblas.so.3 is, e.g. the reference BLAS (fp32 matmuls ~13x slower)")
        folder = found[0]
    else:
        folder = choice
        if not os.path.exists(os.path.join(folder, "libblas.so.3")):
            raise BenchError(f"--blas {folder}: no libblas.so.3 there")
    for lib in ("libblas.so.3", "liblapack.so.3"):
        path = os.path.join(folder, lib)
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return os.path.join(folder, "libblas.so.3")


def fail(message):
    print(f"peer_bench: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    try:
        ARGS = parse_args(sys.argv[1:])
        BLAS = load_blas(ARGS.blas, ARGS.threads)
    except BenchError as e:
        fail(e)

# After load_blas(): importing torch loads libtorch, which binds libblas.so.3 to what is already loaded.
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the independent LLaMA)


def loaded_blas():
    """The BLAS libraries mapped into this process."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "blas" in line.split()[-1]}
    return sorted({os.path.realpath(p) for p in paths})


# ----------------------------------------------------------------------------------------------------
# Resident memory
# ----------------------------------------------------------------------------------------------------

def proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
    raise BenchError(f"/proc/self/status has no {field}")


def reset_peak_rss():
    # 5 resets VmHWM to the current VmRSS (Linux >= 4.0), the same reset FrugalLM's MemoryProbe uses.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

def normalize_config(raw, source):
    """A LLaMA config.json with transformers' LlamaConfig defaults filled in (as FrugalLM's LlamaConfig does),
    in the form tools/make_fixtures.py reads."""
    if raw.get("model_type", "llama") not in ("llama", "mistral"):
        raise BenchError(f"{source}: model_type {raw.get('model_type')!r} is not llama")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias") or raw.get("mlp_bias"):
        raise BenchError(f"{source}: only silu, bias-free LLaMA layers are implemented")
    try:
        heads = raw["num_attention_heads"]
        cfg = {key: raw[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    except KeyError as e:
        raise BenchError(f"{source}: required field {e} is missing") from e
    cfg.update({
        "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope_theta": raw.get("rope_theta", 10000.0),
        "rope_scaling": raw.get("rope_scaling"),
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        "initializer_range": raw.get("initializer_range", INITIALIZER_RANGE),
    })
    if heads % cfg["num_key_value_heads"]:
        raise BenchError(f"{source}: {heads} heads are not a multiple of {cfg['num_key_value_heads']} KV heads")
    return cfg


def load_config(path):
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: {e}") from e
    return normalize_config(raw, path)


def module_key(path):
    # nn.ModuleDict and nn.ParameterDict keys cannot contain '.'.
    return path.replace(".", "/")


class ReferenceLlama(nn.Module):
    """tools/make_fixtures.py's LLaMA with its weights in nn modules: every linear layer is an nn.Linear (so
    that quantize_dynamic and LoRA wrapping see it), the embedding and norm weights are Parameters. A tied
    model has no lm_head module: its head is the embedding."""

    def __init__(self, cfg, seed, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        std = cfg["initializer_range"]
        self.weights = nn.ParameterDict()
        self.linears = nn.ModuleDict()
        for name, shape in mf.parameter_shapes(cfg).items():
            # Drawn in fp32 (the same values whatever the dtype) and converted one tensor at a time, so that
            # construction never holds a second copy of the model.
            if len(shape) == 1:
                value = torch.ones(shape, dtype=dtype)
            else:
                value = torch.empty(shape).normal_(0.0, std, generator=gen).to(dtype)
            if name == "model.embed_tokens.weight" or len(shape) == 1:
                self.weights[module_key(name)] = nn.Parameter(value)
            else:
                layer = nn.Linear(shape[1], shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(value)
                self.linears[module_key(name[:-len(".weight")])] = layer

    def linear(self, x, _p, module):
        return self.linears[module_key(module)](x)

    def forward(self, ids, cache=None, checkpointing=False):
        p = {key.replace("/", "."): t for key, t in self.weights.items()}
        if "lm_head" in self.linears:
            p["lm_head.weight"] = None  # its presence makes mf.forward call linear(h, p, "lm_head")
        call_layer = checkpointed_layer if checkpointing else mf.call_directly
        logits, _ = mf.forward(p, self.cfg, ids, linear=self.linear, cache=cache, call_layer=call_layer)
        return logits


def checkpointed_layer(layer, h, *rest):
    # Reentrant checkpointing (1.13's default) builds a graph only when an input requires grad: under a
    # frozen base the embedding output does not, and the adapters would get no gradient (PEFT's
    # enable_input_require_grads does the same).
    if not h.requires_grad:
        h = h.detach().requires_grad_(True)
    return checkpoint(layer, h, *rest)


class LoraLinear(nn.Module):
    """PEFT's LoRA Linear without dropout: base(x) + lora_B(lora_A(x)) * alpha / r; A kaiming-uniform (a = sqrt 5,
    as PEFT's reset_lora_parameters), B zeros; the base layer frozen."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def apply_lora(model, r, alpha, targets, seed):
    """Freezes every weight and wraps the linear layers whose name (last path component) is a target.
    Returns the wrapped module paths."""
    for param in model.parameters():
        param.requires_grad_(False)
    torch.manual_seed(seed)  # lora_A's initialization draws from the global generator, as in PEFT
    wrapped = []
    for key in list(model.linears.keys()):
        if key.split("/")[-1] in targets:
            model.linears[key] = LoraLinear(model.linears[key], r, alpha)
            wrapped.append(key.replace("/", "."))
    if not wrapped:
        raise BenchError(f"--lora-targets {','.join(targets)} matches no linear layer")
    return wrapped


def quantize_int8(model):
    """quantize_dynamic on every linear layer but lm_head, in place (no deep copy of the fp32 model)."""
    spec = {f"linears.{key}": torch.quantization.default_dynamic_qconfig
            for key in model.linears.keys() if key != "lm_head"}
    torch.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def count(params):
    return sum(t.numel() for t in params)


# ----------------------------------------------------------------------------------------------------
# Training and generation
# ----------------------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay):
    trainable = [t for t in model.parameters() if t.requires_grad]
    groups = [{"params": [t for t in trainable if t.ndim >= 2], "weight_decay": weight_decay},
              {"params": [t for t in trainable if t.ndim < 2], "weight_decay": 0.0}]
    return trainable, torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=BETAS, eps=ADAM_EPS)


def loss_of(model, batch, bf16, checkpointing):
    """Mean next-token cross-entropy of batch [b, s + 1]: the model reads the first s tokens."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs, checkpointing=checkpointing)
        # transformers upcasts the logits to fp32 for the loss.
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def train_step(model, trainable, optimizer, batch, bf16, checkpointing):
    loss = loss_of(model, batch, bf16, checkpointing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    return loss.item()


def new_cache(cfg):
    return [{} for _ in range(cfg["num_hidden_layers"])]


@torch.no_grad()
def greedy_generate(model, prompt, new_tokens):
    """Greedy decoding with the KV cache: the prefill pass over the prompt gives the first token, each decode
    pass one more. Returns (tokens [batch, new_tokens], each token's logits, prefill s, decode s)."""
    cache = new_cache(model.cfg)
    start = time.perf_counter()
    last = model(prompt, cache=cache)[:, -1]
    token = last.argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    tokens, logits = [token], [last]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        last = model(token, cache=cache)[:, -1]
        token = last.argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(last)
    decode = time.perf_counter() - start
    return torch.cat(tokens, dim=1), logits, prefill, decode


@torch.no_grad()
def greedy_recompute(model, prompt, new_tokens):
    """Greedy decoding that reruns the whole sequence for every token (no cache): the reference."""
    ids, logits = prompt, []
    for _ in range(new_tokens):
        last = model(ids)[:, -1]
        logits.append(last)
        ids = torch.cat((ids, last.argmax(-1, keepdim=True)), dim=1)
    return ids[:, prompt.shape[1]:], logits


def run(args, cfg):
    """One configuration, measured. Returns the JSON object."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = cfg["vocab_size"]
    if args.mode == "train":
        data = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=gen)
                for _ in range(args.warmup + args.steps)]
    else:
        data = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=gen)

    baseline = proc_status_bytes("VmRSS")
    reset_peak_rss()

    bf16 = args.precision == "bf16"
    model = ReferenceLlama(cfg, args.seed, torch.bfloat16 if bf16 and args.mode == "generate" else torch.float32)
    result = {"peer": "pytorch", "torch_version": torch.__version__, "threads": torch.get_num_threads(),
              "mode": args.mode, "precision": args.precision, "checkpointing": args.checkpointing,
              "lora_r": args.lora_r, "quantize": args.quantize, "batch": args.batch,
              "seq": args.seq if args.mode == "train" else None,
              "steps": args.steps, "warmup": args.warmup, "seed": args.seed}

    if args.mode == "train":
        if args.lora_r:
            alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r
            apply_lora(model, args.lora_r, alpha, lora_targets(args), args.seed)
            result.update({"lora_alpha": alpha, "lora_targets": lora_targets(args)})
        parameters = count(model.parameters())
        model.train()
        trainable, optimizer = make_optimizer(model, args.lr, args.weight_decay)
        times, losses = [], []
        for step, batch in enumerate(data):
            start = time.perf_counter()
            losses.append(train_step(model, trainable, optimizer, batch, bf16, bool(args.checkpointing)))
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        trainable_count = count(trainable)
        result.update({"tokens_per_second": args.batch * args.seq / statistics.median(times),
                       "step_seconds": times, "loss_first": losses[0], "loss_last": losses[-1]})
    else:
        parameters, trainable_count = count(model.parameters()), 0
        if args.quantize == "int8":
            quantize_int8(model)
            result["quantized_engine"] = torch.backends.quantized.engine
        model.eval()
        prefill, decode = [], []
        for step in range(args.warmup + args.steps):
            _, _, p, d = greedy_generate(model, data, args.new_tokens)
            if step >= args.warmup:
                prefill.append(p)
                decode.append(d)
        result.update({
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "prefill_tokens_per_second": args.batch * args.prompt_tokens / statistics.median(prefill),
            # One new token comes from the prefill pass, as in FrugalLM's TextGenerator.
            "decode_tokens_per_second": (args.batch * (args.new_tokens - 1) / statistics.median(decode)
                                         if args.new_tokens > 1 else None),
            "step_seconds": [p + d for p, d in zip(prefill, decode)], "prefill_seconds": prefill,
            "decode_seconds": decode, "loss_first": None, "loss_last": None,
        })

    result["peak_rss_bytes"] = proc_status_bytes("VmHWM")
    result.update({"parameters": parameters, "trainable_parameters": trainable_count,
                   "baseline_rss_bytes": baseline, "blas": ",".join(loaded_blas()) or "none",
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    return result


# ----------------------------------------------------------------------------------------------------
# Self-test
# ----------------------------------------------------------------------------------------------------

# Tiny models from tools/make_fixtures.py: GQA with an untied head (vocab 96, hidden 64), and a tied head with
# Llama 3.1 RoPE scaling (vocab 80, hidden 48).
SELF_TEST_CONFIGS = {f["name"]: f["config"] for f in mf.FIXTURES if f["name"] in ("gqa-untied", "tied-llama3rope")}
# The benchmark's 1e-4 moves a 0.02-scale model too little in a few steps to show; rank-4 adapters on q and v
# (B starts at zero) need a larger step than full training for a clear fall.
SELF_TEST_LR, SELF_TEST_LORA_LR = 1e-3, 1e-2


def self_test_args(**overrides):
    args = parse_args(["--self-test"])
    args.__dict__.update(dict(batch=2, seq=16, steps=1, warmup=0, prompt_tokens=5, new_tokens=4), **overrides)
    return args


def grads_rel_err(a, b):
    """Worst relative L2 error between the gradients of two models' trainable parameters (inf if one lacks a
    gradient the other has)."""
    worst = 0.0
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if not pa.requires_grad:
            continue
        if pa.grad is None or pb.grad is None:
            return math.inf
        worst = max(worst, mf.rel_err(pa.grad, pb.grad))
    return worst


def self_test(threads):
    torch.set_num_threads(threads)
    failures = []

    def check(name, ok, detail):
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    for cfg_name, raw in SELF_TEST_CONFIGS.items():
        cfg = normalize_config(raw, cfg_name)
        batch = torch.randint(0, cfg["vocab_size"], (4, 17), generator=torch.Generator().manual_seed(1))

        # Every mode and technique, one step each, through the same code path as a benchmark run.
        for mode, precision, checkpointing, lora_r, quantize in (
                [("train", p, c, r, "none") for p in ("fp32", "bf16") for c in (0, 1) for r in (0, 4)]
                + [("generate", "fp32", 0, 0, "none"), ("generate", "bf16", 0, 0, "none"),
                   ("generate", "fp32", 0, 0, "int8")]):
            args = self_test_args(mode=mode, precision=precision, checkpointing=checkpointing, lora_r=lora_r,
                                  quantize=quantize, threads=threads)
            validate_args = copy.copy(args)
            validate_args.config = cfg_name
            validate(validate_args)
            r = run(args, cfg)
            speeds = [r["tokens_per_second"]] if mode == "train" else [r["prefill_tokens_per_second"],
                                                                       r["decode_tokens_per_second"]]
            ok = (all(math.isfinite(s) and s > 0 for s in speeds) and r["peak_rss_bytes"] >= r["baseline_rss_bytes"]
                  and len(r["step_seconds"]) == 1 and (mode == "generate" or math.isfinite(r["loss_first"]))
                  and 0 <= r["trainable_parameters"] <= r["parameters"] and json.loads(json.dumps(r)) == r)
            check(f"{cfg_name} run {mode} {precision} ckpt={checkpointing} lora={lora_r} {quantize}", ok,
                  f"{', '.join(f'{s:.0f}' for s in speeds)} tokens/s, {r['parameters']} parameters "
                  f"({r['trainable_parameters']} trainable), peak - baseline "
                  f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:.1f} MiB")

        # (a) The loss falls over a few steps on one repeated batch.
        for precision, checkpointing, lora_r in (("fp32", 0, 0), ("bf16", 0, 0), ("fp32", 1, 0), ("fp32", 0, 4),
                                                 ("bf16", 1, 4)):
            model = ReferenceLlama(cfg, seed=0)
            if lora_r:
                apply_lora(model, lora_r, 2.0 * lora_r, ["q_proj", "v_proj"], seed=0)
            trainable, optimizer = make_optimizer(model, SELF_TEST_LORA_LR if lora_r else SELF_TEST_LR, WEIGHT_DECAY)
            losses = [train_step(model, trainable, optimizer, batch, precision == "bf16", bool(checkpointing))
                      for _ in range(8)]
            # Every step lower, and a fall (2.8% at the least here) far beyond bf16 rounding (~1e-4 of the loss).
            falling = all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.98 * losses[0]
            check(f"{cfg_name} loss falls ({precision} ckpt={checkpointing} lora={lora_r})", falling,
                  "every step lower, the last 2% below the first: " + " ".join(f"{x:.4f}" for x in losses))

        # (b) Greedy decoding with the KV cache equals decoding by full recomputation.
        model = ReferenceLlama(cfg, seed=0).eval()
        prompt = batch[:2, :5]
        cached, cached_logits, _, _ = greedy_generate(model, prompt, 12)
        full, full_logits = greedy_recompute(model, prompt, 12)
        margin = min((l.topk(2, -1).values[:, 0] - l.topk(2, -1).values[:, 1]).min().item() for l in full_logits)
        err = max(mf.rel_err(a, b) for a, b in zip(cached_logits, full_logits))
        check(f"{cfg_name} KV cache = recomputation (fp32)", torch.equal(cached, full) and err < 1e-5,
              f"12 tokens x 2 prompts equal: {torch.equal(cached, full)}, logits rel. error {err:.1e} (< 1e-5), "
              f"smallest top-2 margin {margin:.1e}")

        # int8: every linear layer but lm_head is a dynamic quantized Linear; the logits stay close to fp32.
        quantized = ReferenceLlama(cfg, seed=0).eval()
        quantize_int8(quantized)
        kinds = {key: type(m).__module__ + "." + type(m).__name__ for key, m in quantized.linears.items()}
        dynamic = [k for k, v in kinds.items() if ".quantized." in v and "dynamic" in v]
        head_ok = "lm_head" not in kinds or kinds["lm_head"] == "torch.nn.modules.linear.Linear"
        with torch.no_grad():
            err = mf.rel_err(quantized(prompt), model(prompt))
        check(f"{cfg_name} int8 quantize_dynamic", len(dynamic) == 7 * cfg["num_hidden_layers"] and head_ok
              and err < 0.05, f"{len(dynamic)} dynamic int8 Linear, lm_head "
              f"{kinds.get('lm_head', 'tied (embedding)')}, logits rel. error vs fp32 {err:.1e} (< 5e-2)")

        # (c) Checkpointed gradients equal plain ones (all weights, and adapters with a non-zero B so that A
        # gets a gradient too).
        for precision, lora_r, tolerance in (("fp32", 0, 1e-5), ("fp32", 4, 1e-5), ("bf16", 0, 1e-5)):
            plain = ReferenceLlama(cfg, seed=0)
            if lora_r:
                apply_lora(plain, lora_r, 2.0 * lora_r, ["q_proj", "v_proj"], seed=0)
                with torch.no_grad():
                    for m in plain.modules():
                        if isinstance(m, LoraLinear):
                            m.lora_B.weight.normal_(0.0, 0.02)
            ckpt = copy.deepcopy(plain)
            loss_of(plain, batch, precision == "bf16", False).backward()
            loss_of(ckpt, batch, precision == "bf16", True).backward()
            err = grads_rel_err(ckpt, plain)
            check(f"{cfg_name} checkpointed gradients ({precision} lora={lora_r})", err < tolerance,
                  f"worst relative error over {count(p for p in plain.parameters() if p.requires_grad)} "
                  f"trainable values: {err:.1e} (< {tolerance:.0e})")

        # (d) LoRA trains A and B only: the base is bit-for-bit unchanged and has no gradient.
        model = ReferenceLlama(cfg, seed=0)
        wrapped = apply_lora(model, 4, 8.0, ["q_proj", "v_proj"], seed=0)
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        lora_before = {n: p.detach().clone() for n, p in lora.items()}
        trainable, optimizer = make_optimizer(model, SELF_TEST_LR, WEIGHT_DECAY)
        for _ in range(3):
            train_step(model, trainable, optimizer, batch, False, True)
        params = dict(model.named_parameters())
        frozen = all(mf.bit_equal(params[n], t) and not params[n].requires_grad and params[n].grad is None
                     for n, t in base.items())
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in lora.values()}
        moved = all(not torch.equal(lora[n], t) for n, t in lora_before.items())
        expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features)
                       for m in model.modules() if isinstance(m, LoraLinear))
        check(f"{cfg_name} LoRA freezes the base", frozen and optimized and moved
              and count(trainable) == expected and len(wrapped) == 2 * cfg["num_hidden_layers"],
              f"{len(base)} base tensors unchanged without gradients: {frozen}; optimizer holds exactly the "
              f"{len(lora)} adapter tensors: {optimized}; every A and B moved: {moved}; "
              f"{count(trainable)} trainable values")

    print(f"self-test: {'all passed' if not failures else f'{len(failures)} FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0


def main(args, blas):
    try:
        if blas is not None and os.path.realpath(blas) not in loaded_blas():
            raise BenchError(f"loaded {blas}, but the process maps {loaded_blas()}")
        if args.self_test:
            return self_test(args.threads)
        result = run(args, load_config(args.config))
    except BenchError as e:
        fail(e)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS, BLAS))
