#!/usr/bin/python3
"""PEFT-format LoRA fixtures for FrugalLM, and a checker for the adapters FrugalLM writes.

PEFT cannot be installed here, so this script does what PEFT 0.14 does, from its source
(src/peft/tuners/lora/{config,layer}.py, src/peft/utils/save_and_load.py, src/peft/tuners/tuners_utils.py):
it selects target modules with check_target_module_exists, computes each wrapped layer as
base(x) + lora_B(lora_A(dropout(x))) * scaling with scaling = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora, both per module through rank_pattern / alpha_pattern), and writes adapter_config.json and
adapter_model.safetensors exactly as PeftModel.save_pretrained does. The LLaMA model is the independent
implementation of tools/make_fixtures.py. Run it with Debian's interpreter (the one with PyTorch 1.13):

    /usr/bin/python3 tools/make_peft_fixtures.py              # writes tests/fixtures/peft/
    /usr/bin/python3 tools/make_peft_fixtures.py --out DIR    # anywhere else
    /usr/bin/python3 tools/make_peft_fixtures.py --check-adapter ADAPTER_DIR --expected FILE [--model DIR]

--check-adapter loads an adapter folder the way PEFT would (config fields, key names, dtypes, shapes),
applies it to the base model (--model, or the adapter's base_model_name_or_path), computes logits for the
input_ids in FILE (a safetensors file with int64 "input_ids" and float32 "logits") and compares them with
FILE's logits: exit status 0 when the relative error is within 1e-4, 1 otherwise (with the reason).

The fixtures are deterministic: rerunning reproduces the same bytes. tests/fixtures/peft/README.md
describes them.
"""

import argparse
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the independent LLaMA and the safetensors reader/writer)

DEFAULT_OUT = os.path.join(mf.REPO_ROOT, "tests", "fixtures", "peft")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # PeftModel's name for the first adapter
KEY_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel).model (the LlamaForCausalLM)

# Every field PEFT 0.14.0's LoraConfig.to_dict() returns (PeftConfigMixin, PeftConfig and LoraConfig
# dataclass fields; to_dict pops runtime_config), with its default.
PEFT_LORA_CONFIG_DEFAULTS = {
    "alpha_pattern": {},
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": False,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": None,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "task_type": None,
    "use_dora": False,
    "use_rslora": False,
}

# The base model: small, untied, GQA. Its linear layers have 32, 16 or 64 features, so ranks up to 16 fit.
MODEL_CONFIG = mf.hf_config(vocab=64, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2,
                            rope_theta=10000.0, rope_scaling=None, tied=False, max_positions=64)
MODEL_SEED = 5000
LOGITS_SHAPE = (2, 9)

# Stand-ins for trained adapters: A as PEFT initializes it, B ~ N(0, B_STD) instead of zeros, so that every
# adapter moves the logits far beyond the 1e-4 tolerance (checked below).
B_STD = 0.2
TOLERANCE = 1e-4

ADAPTERS = [
    # The article's example: q and v projections by name.
    {"name": "adapter-qv", "seed": 5100,
     "config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}},
    # A regex target with an excluded module, rank-stabilized scaling, and per-module rank and alpha:
    # down_proj gets rank 2 (rank_pattern), layer 1's o_proj alpha 4 (alpha_pattern), the rest r 8, alpha 16.
    {"name": "adapter-rslora-patterns", "seed": 5200,
     "config": {"r": 8, "lora_alpha": 16, "target_modules": r".*\.(self_attn\.(k|o)_proj|mlp\.(up|down)_proj)",
                "exclude_modules": ["model.layers.1.mlp.up_proj"], "use_rslora": True,
                "rank_pattern": {"down_proj": 2}, "alpha_pattern": {r"model\.layers\.1\.self_attn\.o_proj": 4}}},
    # Layer 1 only (layers_to_transform with layers_pattern), and a fractional alpha.
    {"name": "adapter-layer1", "seed": 5300,
     "config": {"r": 2, "lora_alpha": 6.5, "target_modules": ["gate_proj", "o_proj"],
                "layers_to_transform": [1], "layers_pattern": "layers"}},
]


# ----------------------------------------------------------------------------------------------------
# PEFT's config and module selection
# ----------------------------------------------------------------------------------------------------

def peft_adapter_config(base_model_name_or_path, **kwargs):
    """The dict PeftModel.save_pretrained writes for LoraConfig(task_type="CAUSAL_LM", **kwargs)."""
    unknown = set(kwargs) - set(PEFT_LORA_CONFIG_DEFAULTS)
    assert not unknown, f"not LoraConfig fields: {unknown}"
    cfg = json.loads(json.dumps(PEFT_LORA_CONFIG_DEFAULTS))  # a deep copy
    cfg.update(kwargs)
    cfg["task_type"] = "CAUSAL_LM"
    cfg["peft_type"] = "LORA"  # LoraConfig.__post_init__
    # __post_init__ turns target/exclude lists into sets; save_pretrained turns sets back into lists (in the
    # set's arbitrary order: sorted here, so the bytes are reproducible).
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg[key], list):
            cfg[key] = sorted(set(cfg[key]))
    # PeftModel.save_pretrained records the base model and saves with inference_mode switched on.
    cfg["base_model_name_or_path"] = base_model_name_or_path
    cfg["inference_mode"] = True
    return cfg


def linear_modules(cfg):
    """Paths of LlamaForCausalLM's nn.Linear modules, in module order."""
    names = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [p + "self_attn." + n for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [p + "mlp." + n for n in ("gate_proj", "up_proj", "down_proj")]
    if not cfg["tie_word_embeddings"]:
        names.append("lm_head")
    return names


def check_target_module_exists(config, key):
    """PEFT 0.14's tuners_utils.check_target_module_exists, for list and regex targets."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes, pattern = config.get("layers_to_transform"), config.get("layers_pattern")
    using_indexes = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using_indexes and found:
        index = None
        if pattern is None or len(pattern) == 0:
            index = re.match(r".*\.[^.]*\.(\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                index = re.match(rf".*\.{p}\.(\d+)\.", key)
                if index is not None:
                    break
        if index is None:
            return False
        index = int(index.group(1))
        return index == indexes if isinstance(indexes, int) else index in indexes
    return found


def selected_modules(config, model_cfg):
    """The modules PEFT wraps: all-linear expands to the linear layers' names but the output head (as
    _maybe_include_all_linear_layers does in 0.14), then check_target_module_exists decides."""
    config = dict(config)
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        config["target_modules"] = {m.rsplit(".", 1)[-1] for m in linear_modules(model_cfg)} - {"lm_head"}
    return [m for m in linear_modules(model_cfg) if check_target_module_exists(config, m)]


def rank_and_alpha(config, module):
    """LoraModel._create_and_replace: get_pattern_key over rank_pattern then alpha_pattern keys."""
    keys = list(config["rank_pattern"]) + list(config["alpha_pattern"])
    key = next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), module)
    return config["rank_pattern"].get(key, config["r"]), config["alpha_pattern"].get(key, config["lora_alpha"])


def scaling(config, r, alpha):
    # LoraLayer.update_layer
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def in_out(model_cfg, module):
    h, i = model_cfg["hidden_size"], model_cfg["intermediate_size"]
    q = model_cfg["num_attention_heads"] * model_cfg["head_dim"]
    kv = model_cfg["num_key_value_heads"] * model_cfg["head_dim"]
    name = module.rsplit(".", 1)[-1]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, model_cfg["vocab_size"])}[name]


# ----------------------------------------------------------------------------------------------------
# LoRA forward and PEFT's state dict
# ----------------------------------------------------------------------------------------------------

def lora_linear(lora):
    """A make_fixtures `linear` that adds LoRA as PEFT's lora.Linear.forward does in eval mode (dropout is
    the identity): result = base_layer(x); result = result + lora_B(lora_A(dropout(x))) * scaling."""
    def linear(x, p, module):
        result = F.linear(x, p[module + ".weight"])
        if module in lora:
            a, b, scale = lora[module]
            result = result + F.linear(F.linear(x.to(a.dtype), a), b) * scale
        return result
    return linear


def peft_state_dict(lora):
    """get_peft_model_state_dict (bias "none") of a PeftModel whose adapter "default" has these factors:
    the model's lora_ keys that contain the adapter name, with ".default" then removed."""
    state = {}
    for module, (a, b, _) in lora.items():
        state[f"{KEY_PREFIX}{module}.lora_A.{ADAPTER_NAME}.weight"] = a
        state[f"{KEY_PREFIX}{module}.lora_B.{ADAPTER_NAME}.weight"] = b
    to_return = {k: v for k, v in state.items() if "lora_" in k and ADAPTER_NAME in k}
    return {k.replace(f".{ADAPTER_NAME}", ""): v for k, v in to_return.items()}


def insert_adapter_name(state):
    """set_peft_model_state_dict's _insert_adapter_name_into_state_dict (parameter prefix "lora_")."""
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            suffix = key.split("lora_")[1]
            if "." in suffix:
                rest = ".".join(suffix.split(".")[1:])
                key = key.replace(rest, f"{ADAPTER_NAME}.{rest}")
            else:
                key = f"{key}.{ADAPTER_NAME}"
        out[key] = value
    return out


def build_lora(config, model_cfg, gen, dtype=torch.float32):
    """Factors for every selected module: A as PEFT's reset_lora_parameters (kaiming_uniform_ with
    a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B a trained-like N(0, B_STD) instead of zeros."""
    lora = {}
    for module in selected_modules(config, model_cfg):
        r, alpha = rank_and_alpha(config, module)
        fan_in, fan_out = in_out(model_cfg, module)
        bound = 1 / math.sqrt(fan_in)
        a = torch.empty(r, fan_in, dtype=dtype).uniform_(-bound, bound, generator=gen)
        b = B_STD * torch.randn(fan_out, r, generator=gen, dtype=dtype)
        lora[module] = (a, b, scaling(config, r, alpha))
    return lora


# ----------------------------------------------------------------------------------------------------
# Reading an adapter folder as PEFT does, and checking it
# ----------------------------------------------------------------------------------------------------

class AdapterError(Exception):
    pass


def read_model(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("rope_scaling", None)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    params = {}
    for file in files:
        tensors, _ = mf.read_safetensors(os.path.join(folder, file))
        params.update({n: t.float() for n, t in tensors.items()})
    return cfg, params


def read_adapter(folder, model_cfg):
    """Reads an adapter folder the way PEFT 0.14 would and returns (config, {module: (A, B, scaling)}),
    raising AdapterError on anything PEFT would write differently or load wrongly."""
    path = os.path.join(folder, CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    config = json.loads(text)
    problems = []
    if text != json.dumps(config, indent=2, sort_keys=True):
        problems.append(f"{CONFIG_NAME} is not formatted as PEFT's json.dumps(indent=2, sort_keys=True)")
    if set(config) != set(PEFT_LORA_CONFIG_DEFAULTS):
        problems.append(f"{CONFIG_NAME} fields differ from PEFT 0.14's LoraConfig: "
                        f"extra {sorted(set(config) - set(PEFT_LORA_CONFIG_DEFAULTS))}, "
                        f"missing {sorted(set(PEFT_LORA_CONFIG_DEFAULTS) - set(config))}")
    expected_values = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True, "fan_in_fan_out": False,
                       "use_dora": False, "lora_bias": False, "init_lora_weights": True, "modules_to_save": None,
                       "layer_replication": None, "megatron_core": "megatron.core", "loftq_config": {}}
    for key, value in expected_values.items():
        if config.get(key) != value:
            problems.append(f"{CONFIG_NAME}: {key} is {config.get(key)!r}, PEFT writes {value!r} here")
    for key, kind in (("r", int), ("lora_alpha", (int, float)), ("lora_dropout", float), ("use_rslora", bool),
                      ("rank_pattern", dict), ("alpha_pattern", dict), ("bias", str)):
        if not isinstance(config.get(key), kind) or (kind is int and isinstance(config.get(key), bool)):
            problems.append(f"{CONFIG_NAME}: {key} is {config.get(key)!r}, not of PEFT's type")
    if config.get("bias") != "none":
        problems.append(f"{CONFIG_NAME}: bias {config.get('bias')!r}; this checker handles 'none'")
    if problems:
        raise AdapterError("; ".join(problems))

    tensors, metadata = mf.read_safetensors(os.path.join(folder, WEIGHTS_NAME))
    if metadata != {"format": "pt"}:
        problems.append(f"{WEIGHTS_NAME}: __metadata__ is {metadata}, PEFT writes {{'format': 'pt'}}")
    modules = selected_modules(config, model_cfg)
    if not modules:
        raise AdapterError(f"target_modules {config['target_modules']!r} select no module of the model")
    # PEFT's load: insert the adapter name into the keys, then load_state_dict(strict=False) into the
    # model's lora parameters; here every key must land and every parameter must be filled.
    loaded = insert_adapter_name(tensors)
    lora = {}
    for module in modules:
        r, alpha = rank_and_alpha(config, module)
        fan_in, fan_out = in_out(model_cfg, module)
        factors = []
        for name, shape in (("lora_A", (r, fan_in)), ("lora_B", (fan_out, r))):
            key = f"{KEY_PREFIX}{module}.{name}.{ADAPTER_NAME}.weight"
            t = loaded.pop(key, None)
            if t is None:
                problems.append(f"{WEIGHTS_NAME}: missing {key.replace('.' + ADAPTER_NAME, '')}")
            elif tuple(t.shape) != shape or t.dtype != torch.float32:
                problems.append(f"{WEIGHTS_NAME}: {key} is {t.dtype} {tuple(t.shape)}, PEFT expects float32 {shape}")
            factors.append(t)
        lora[module] = (factors[0], factors[1], scaling(config, r, alpha))
    problems += [f"{WEIGHTS_NAME}: unexpected tensor {k}" for k in sorted(loaded)]
    if problems:
        raise AdapterError("; ".join(problems))
    return config, lora


def check_adapter(adapter_dir, expected_path, model_dir):
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    if model_dir is None:
        with open(config_path) as f:
            model_dir = json.load(f).get("base_model_name_or_path")
        if not model_dir:
            raise AdapterError("no --model given and the adapter records no base_model_name_or_path")
    model_cfg, params = read_model(model_dir)
    config, lora = read_adapter(adapter_dir, model_cfg)
    expected, _ = mf.read_safetensors(expected_path)
    with torch.no_grad():
        logits, _ = mf.forward(params, model_cfg, expected["input_ids"], linear=lora_linear(lora))
        base, _ = mf.forward(params, model_cfg, expected["input_ids"])
    error = mf.rel_err(logits, expected["logits"])
    max_abs = (logits.double() - expected["logits"].double()).abs().max().item()
    effect = mf.rel_err(base, expected["logits"])
    print(f"{adapter_dir}: {len(lora)} LoRA layers ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in lora}))}), "
          f"config and keys as PEFT 0.14 writes them; logits max abs error {max_abs:.3e}, "
          f"relative error {error:.3e} (tolerance {TOLERANCE:g}); the adapter moves the logits by {effect:.3e}")
    if not error <= TOLERANCE:
        raise AdapterError(f"logits differ from the expected ones by {error:.3e} (relative) > {TOLERANCE:g}")
    if not effect > 100 * TOLERANCE:
        raise AdapterError(f"the adapter barely changes the logits ({effect:.3e}): the check would prove nothing")


# ----------------------------------------------------------------------------------------------------
# Fixture generation
# ----------------------------------------------------------------------------------------------------

def write_adapter(folder, config, lora):
    os.makedirs(folder, exist_ok=True)
    mf.write_safetensors(os.path.join(folder, WEIGHTS_NAME), peft_state_dict(lora), {"format": "pt"})
    # PeftConfigMixin.save_pretrained: json.dumps(output_dict, indent=2, sort_keys=True), no newline at the end.
    mf.write_atomic(os.path.join(folder, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))


def sharpness(params, cfg, ids, lora, logits):
    """How little the logits move when one wrapped layer's LoRA is dropped (the smallest over the layers):
    every layer must matter by far more than the tolerance, or a loader that skipped one would pass."""
    worst = math.inf
    with torch.no_grad():
        for module in lora:
            fewer = {m: f for m, f in lora.items() if m != module}
            other, _ = mf.forward(params, cfg, ids, linear=lora_linear(fewer))
            worst = min(worst, mf.rel_err(other, logits))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: tests/fixtures/peft)")
    parser.add_argument("--check-adapter", metavar="DIR", help="check an adapter folder written by FrugalLM")
    parser.add_argument("--expected", metavar="FILE", help="with --check-adapter: safetensors with input_ids and logits")
    parser.add_argument("--model", metavar="DIR", help="with --check-adapter: the base model folder "
                                                       "(default: the adapter's base_model_name_or_path)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    if args.check_adapter:
        if not args.expected:
            parser.error("--check-adapter needs --expected")
        try:
            check_adapter(args.check_adapter, args.expected, args.model)
        except (AdapterError, OSError, KeyError, ValueError) as e:
            print(f"FAIL {args.check_adapter}: {e}", file=sys.stderr)
            return 1
        print("OK")
        return 0

    cfg = MODEL_CONFIG
    gen = torch.Generator().manual_seed(MODEL_SEED)
    params = mf.init_parameters(cfg, gen)
    ids = torch.randint(0, cfg["vocab_size"], LOGITS_SHAPE, generator=gen, dtype=torch.int64)
    model_dir = os.path.join(args.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    mf.write_json(os.path.join(model_dir, "config.json"), cfg)
    mf.write_safetensors(os.path.join(model_dir, "model.safetensors"), params, {"format": "pt"})
    with torch.no_grad():
        base, _ = mf.forward(params, cfg, ids)
    expected = {"input_ids": ids, "logits.base": base}
    base_name = os.path.relpath(model_dir, mf.REPO_ROOT) if model_dir.startswith(mf.REPO_ROOT) else model_dir

    for spec in ADAPTERS:
        config = peft_adapter_config(base_name, **spec["config"])
        lora = build_lora(config, cfg, torch.Generator().manual_seed(spec["seed"]))
        with torch.no_grad():
            logits, _ = mf.forward(params, cfg, ids, linear=lora_linear(lora))
            lora64 = {m: (a.double(), b.double(), s) for m, (a, b, s) in lora.items()}
            logits64, _ = mf.forward({n: t.double() for n, t in params.items()}, cfg, ids, linear=lora_linear(lora64))
        precision = mf.rel_err(logits, logits64)
        effect = mf.rel_err(logits, base)
        worst_layer = sharpness(params, cfg, ids, lora, logits)
        assert precision < TOLERANCE / 10, f"{spec['name']}: fp32 reference {precision:.1e} from float64"
        assert effect > 0.05, f"{spec['name']}: the adapter barely moves the logits ({effect:.1e})"
        assert worst_layer > 10 * TOLERANCE, f"{spec['name']}: a wrapped layer barely matters ({worst_layer:.1e})"
        if config["use_rslora"]:
            plain = {m: (a, b, s * math.sqrt(a.shape[0]) / a.shape[0]) for m, (a, b, s) in lora.items()}
            with torch.no_grad():
                other, _ = mf.forward(params, cfg, ids, linear=lora_linear(plain))
            assert mf.rel_err(other, logits) > 10 * TOLERANCE, f"{spec['name']}: rslora scaling is not visible"
        folder = os.path.join(args.out, spec["name"])
        write_adapter(folder, config, lora)
        expected[f"logits.{spec['name']}"] = logits
        # Read back as PEFT would, and compute the same logits from the files.
        _, back = read_adapter(folder, cfg)
        assert sorted(back) == sorted(lora)
        with torch.no_grad():
            again, _ = mf.forward(params, cfg, ids, linear=lora_linear(back))
        assert mf.bit_equal(again, logits), f"{spec['name']}: the written adapter gives other logits"
        ranks = sorted({a.shape[0] for a, _, _ in lora.values()})
        print(f"{spec['name']}: {len(lora)} layers, ranks {ranks}, moves logits by {effect:.3f} (relative), "
              f"dropping one layer's LoRA moves them by >= {worst_layer:.1e}, fp32 vs float64 {precision:.1e}")

    mf.write_safetensors(os.path.join(args.out, "expected.safetensors"), expected,
                         {"format": "pt", "generator": "tools/make_peft_fixtures.py", "torch_version": torch.__version__})
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.out) for f in files)
    print(f"wrote {args.out} ({total / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
