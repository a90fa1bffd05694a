using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Lora;

/// <summary>What an adapter folder's <c>adapter_config.json</c> says.</summary>
/// <param name="Folder">The adapter folder.</param>
/// <param name="Config">The LoRA settings.</param>
/// <param name="BaseModelNameOrPath">The base model it was trained on (a folder or hub id), if recorded.</param>
public sealed record LoraAdapterInfo(string Folder, LoraConfig Config, string? BaseModelNameOrPath);

/// <summary>
/// Reads and writes LoRA adapters in Hugging Face PEFT's folder format, so an adapter trained here loads with
/// <c>PeftModel.from_pretrained</c> and the reverse: <c>adapter_config.json</c> with exactly the fields PEFT
/// 0.14's <c>LoraConfig</c> saves (the first PEFT that ignores fields it does not know, so every later
/// version reads the file too, and each field that later versions added keeps its default), and
/// <c>adapter_model.safetensors</c> with PEFT's keys: <c>base_model.model.&lt;module path&gt;.lora_A.weight</c>
/// [r, in] and <c>….lora_B.weight</c> [out, r] in float32, the adapter name removed as PEFT's
/// <c>get_peft_model_state_dict</c> removes it.
/// </summary>
public static class LoraAdapter
{
    /// <summary>The config file's name.</summary>
    public const string ConfigFile = "adapter_config.json";

    /// <summary>The weights file's name.</summary>
    public const string WeightsFile = "adapter_model.safetensors";

    /// <summary>The pickle weights file older PEFT wrote (not read here).</summary>
    public const string PickleWeightsFile = "adapter_model.bin";

    /// <summary>The prefix PEFT's <c>PeftModel</c> puts before module paths.</summary>
    public const string KeyPrefix = "base_model.model.";

    // Fields whose non-default values change what the adapter computes in ways FrugalLM does not implement
    // (or that change the base model itself): such an adapter is refused rather than loaded wrong.
    private static readonly (string Field, string Why)[] Unsupported =
    [
        ("use_dora", "DoRA adapters (use_dora) are not supported"),
        ("fan_in_fan_out", "fan_in_fan_out adapters (transposed Conv1D weights, GPT-2 style) are not supported"),
        ("lora_bias", "adapters with a bias on lora_B (lora_bias) are not supported"),
        ("layer_replication", "layer_replication is not supported"),
        ("modules_to_save", "modules_to_save (full copies of other modules saved with the adapter) is not supported"),
        ("trainable_token_indices", "trainable_token_indices is not supported"),
        ("target_parameters", "target_parameters (LoRA on parameters rather than modules) is not supported"),
        ("use_qalora", "QALoRA adapters are not supported"),
        ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) is not supported"),
        ("use_bdlora", "block-diagonal LoRA (use_bdlora) is not supported"),
        ("arrow_config", "Arrow routing (arrow_config) is not supported"),
    ];

    /// <summary>
    /// Writes adapter <paramref name="adapterName"/> (default: the active one) of <paramref name="lora"/> to
    /// <paramref name="folder"/>: the weights first, then the config, each atomically.
    /// </summary>
    /// <param name="lora">The model's adapters.</param>
    /// <param name="folder">The adapter folder (created if needed).</param>
    /// <param name="adapterName">The adapter to save; null means the active one.</param>
    /// <param name="baseModelNameOrPath">Recorded as <c>base_model_name_or_path</c> (the base model folder or hub id).</param>
    /// <param name="sources">Tensors to write instead of the layers' own, by model parameter name (mixed precision's
    /// fp32 masters of 16-bit compute copies). Weights are written in fp32, as PEFT writes them by default.</param>
    /// <exception cref="InvalidOperationException">The model has no adapter (an adapter is never saved empty), or its weights are not finite.</exception>
    /// <exception cref="ArgumentException">The model has no adapter named <paramref name="adapterName"/>.</exception>
    public static void Save(LoraModel lora, string folder, string? adapterName = null, string? baseModelNameOrPath = null,
        IEnumerable<(string Name, Tensor Tensor)>? sources = null)
    {
        var replaced = (sources ?? []).ToDictionary(s => s.Name, s => s.Tensor);
        var name = AdapterToSave(lora, adapterName, folder);
        var tensors = new List<(string Name, Tensor Tensor)>();
        foreach (var (key, parameter, own) in Entries(lora, name))
        {
            tensors.Add((key, replaced.GetValueOrDefault(parameter) ?? own));
        }
        foreach (var (key, tensor) in tensors)
        {
            using var scope = NewDisposeScope();
            if (!tensor.isfinite().all().item<bool>())
            {
                throw new InvalidOperationException($"cannot save LoRA adapter '{name}': tensor '{key}' has NaN or infinite values (training diverged?)");
            }
        }
        Directory.CreateDirectory(folder);
        SafeTensors.Write(Path.Combine(folder, WeightsFile), tensors, dtype: ScalarType.Float32);
        SaveConfig(lora, folder, name, baseModelNameOrPath);
    }

    /// <summary>
    /// What <see cref="Save"/> writes to <c>adapter_model.safetensors</c>, as (PEFT key, model parameter name) pairs:
    /// lets a sharded checkpoint, which stores parameters by model name, be turned into the adapter file without the model.
    /// </summary>
    public static IReadOnlyList<(string Key, string Parameter)> Keys(LoraModel lora, string? adapterName = null) =>
        Entries(lora, AdapterToSave(lora, adapterName, "an adapter folder")).Select(e => (e.Key, e.Parameter)).ToList();

    /// <summary>Writes the <c>adapter_config.json</c> that <see cref="Save"/> writes (atomically).</summary>
    public static void SaveConfig(LoraModel lora, string folder, string? adapterName = null, string? baseModelNameOrPath = null)
    {
        var name = AdapterToSave(lora, adapterName, folder);
        var json = PythonJson.Dumps(ConfigJson(lora.Config(name), lora.LayersOf(name).Select(l => l.Path).ToList(), baseModelNameOrPath));
        AtomicFile.WriteText(Path.Combine(folder, ConfigFile), json);
    }

    private static string AdapterToSave(LoraModel lora, string? adapterName, string folder)
    {
        var adapters = lora.Adapters;
        if (adapters.Count == 0)
        {
            throw new InvalidOperationException($"cannot save a LoRA adapter to {folder}: the model has no adapters (an adapter file is never written empty)");
        }
        return adapterName ?? lora.ActiveAdapter ?? (adapters.Count == 1 ? adapters[0]
            : throw new InvalidOperationException($"no adapter is active: name the one to save ({string.Join(", ", adapters)})"));
    }

    // The adapter's tensors: PEFT key, the model's parameter name, and the layer's own tensor.
    private static List<(string Key, string Parameter, Tensor Tensor)> Entries(LoraModel lora, string name)
    {
        var layers = lora.LayersOf(name);
        var entries = new List<(string, string, Tensor)>();
        foreach (var (path, layer) in layers)
        {
            entries.Add((KeyPrefix + path + ".lora_A.weight", $"{path}.lora_A.{name}.weight", layer.LoraA(name)));
            entries.Add((KeyPrefix + path + ".lora_B.weight", $"{path}.lora_B.{name}.weight", layer.LoraB(name)));
        }
        entries.AddRange(Biases(lora, lora.Config(name).Bias, layers).Select(b => (KeyPrefix + b.Name, b.Name, (Tensor)b.Parameter)));
        return entries;
    }

    /// <summary>Reads an adapter folder's <c>adapter_config.json</c>.</summary>
    /// <exception cref="CheckpointFormatException">The file is missing, malformed, not LoRA, or uses a feature FrugalLM does not implement.</exception>
    public static LoraAdapterInfo ReadConfig(string folder)
    {
        var path = Path.Combine(folder, ConfigFile);
        if (!Directory.Exists(folder))
        {
            throw new CheckpointFormatException(folder, "adapter folder not found");
        }
        if (!File.Exists(path))
        {
            throw new CheckpointFormatException(path, "file not found: an adapter folder holds adapter_config.json and adapter_model.safetensors (as PEFT's save_pretrained writes them)");
        }
        JsonObject root;
        try
        {
            root = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new CheckpointFormatException(path, "not a JSON object");
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException(path, $"not valid JSON ({e.Message})", e);
        }
        try
        {
            return new LoraAdapterInfo(folder, ParseConfig(root), String(root, "base_model_name_or_path"));
        }
        catch (Exception e) when (e is FormatException or InvalidOperationException or ArgumentException)
        {
            throw new CheckpointFormatException(path, e.Message, e);
        }
    }

    /// <summary>
    /// Loads the adapter in <paramref name="folder"/> onto <paramref name="model"/> as adapter
    /// <paramref name="adapterName"/>: its config decides which layers are wrapped (as PEFT does), and the
    /// weights file must hold exactly A and B for each of them with matching shapes. Keys are accepted in
    /// every form PEFT and transformers write: with or without the <c>base_model.model.</c> prefix, with or
    /// without the adapter name (<c>lora_A.default.weight</c>), and with the module path relative to the
    /// decoder (<c>base_model.model.layers.0…</c>). The model's first adapter becomes active; a later one is
    /// added inactive (switch with <see cref="LoraModel.SetActive"/>). Nothing in the model changes unless
    /// everything matches.
    /// </summary>
    /// <exception cref="CheckpointFormatException">
    /// A file is missing or malformed, or the adapter does not fit the model (the message names the file, the
    /// tensor and both shapes).
    /// </exception>
    public static LoraModel Load(string folder, nn.Module model, string adapterName = LoraModel.DefaultAdapter)
    {
        var info = ReadConfig(folder);
        var weightsPath = Path.Combine(folder, WeightsFile);
        if (!File.Exists(weightsPath))
        {
            throw new CheckpointFormatException(weightsPath, File.Exists(Path.Combine(folder, PickleWeightsFile))
                ? $"not found; the folder has {PickleWeightsFile} (a PyTorch pickle), which FrugalLM does not read: convert it in Python with "
                  + "PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
                : "not found (an adapter folder holds adapter_config.json and adapter_model.safetensors)");
        }
        using var file = SafeTensorsFile.Open(weightsPath);
        IReadOnlyList<(string Path, nn.Module Module, int Rank, double Alpha)> plan;
        try
        {
            plan = LoraPlanner.Plan(model, info.Config, strictTargets: false);
        }
        catch (ArgumentException e)
        {
            throw new CheckpointFormatException(Path.Combine(folder, ConfigFile), $"the adapter does not fit this model: {e.Message}", e);
        }
        var (factors, biases) = MatchTensors(file, model, plan);
        var lora = LoraPlanner.Add(model, info.Config, adapterName, seed: null, strictTargets: false);
        using var noGrad = no_grad();
        foreach (var (path, _, _, _) in plan)
        {
            var layer = (LoraLinear)Models.ModuleTree.Get(model, path);
            file.CopyTo(factors[(path, true)], layer.LoraA(adapterName));
            file.CopyTo(factors[(path, false)], layer.LoraB(adapterName));
        }
        foreach (var (key, parameter) in biases)
        {
            file.CopyTo(key, parameter);
        }
        return lora;
    }

    /// <summary>
    /// Maps every tensor of the file to an A or B factor of a planned layer, or to a bias; anything else, a
    /// missing factor or a shape mismatch is an error listing the problems.
    /// </summary>
    private static (Dictionary<(string Path, bool IsA), string> Factors, List<(string Key, Parameter Parameter)> Biases) MatchTensors(
        SafeTensorsFile file, nn.Module model, IReadOnlyList<(string Path, nn.Module Module, int Rank, double Alpha)> plan)
    {
        var planned = plan.ToDictionary(p => p.Path, StringComparer.Ordinal);
        var linearPaths = LoraPlanner.Candidates(model).Select(c => c.Path).ToHashSet(StringComparer.Ordinal);
        // Bias parameters by their HF name (a wrapped layer's bias is "….base_layer.bias" in the model).
        var modelBiases = model.named_parameters().Where(p => LoraModel.IsBias(p.name))
            .ToDictionary(p => p.name.Replace(".base_layer.", ".", StringComparison.Ordinal), p => p.parameter, StringComparer.Ordinal);
        var factors = new Dictionary<(string, bool), string>();
        var biases = new List<(string, Parameter)>();
        var problems = new List<string>();
        string FileName() => Path.GetFileName(file.Path);
        string Resolve(string path) =>
            linearPaths.Contains(path) || !linearPaths.Contains("model." + path) ? path : "model." + path;
        foreach (var (key, info) in file.Tensors.OrderBy(t => t.Key, StringComparer.Ordinal))
        {
            var logical = key.StartsWith(KeyPrefix, StringComparison.Ordinal) ? key[KeyPrefix.Length..] : key;
            var parts = logical.Split('.');
            int factor = Array.FindLastIndex(parts, p => p is "lora_A" or "lora_B");
            if (factor > 0 && (parts.Length == factor + 2 || parts.Length == factor + 3) && parts[^1] == "weight")
            {
                var path = Resolve(string.Join('.', parts[..factor]));
                bool isA = parts[factor] == "lora_A";
                if (!planned.TryGetValue(path, out var target))
                {
                    problems.Add(linearPaths.Contains(path)
                        ? $"tensor '{key}' is for '{path}', which the adapter's target_modules do not select on this model"
                        : $"tensor '{key}' is for '{path}', which is not a linear layer of this model");
                    continue;
                }
                if (!factors.TryAdd((path, isA), key))
                {
                    problems.Add($"tensors '{factors[(path, isA)]}' and '{key}' are both {parts[factor]} of '{path}'");
                    continue;
                }
                var (inFeatures, outFeatures) = target.Module is LoraLinear w ? (w.InFeatures, w.OutFeatures) : Models.LinearLayers.Describe(target.Module)!.Value;
                long[] expected = isA ? [target.Rank, inFeatures] : [outFeatures, target.Rank];
                if (!info.Shape.SequenceEqual(expected))
                {
                    problems.Add($"tensor '{key}' has shape {info.ShapeText} but the model expects {SafeTensors.ShapeText(expected)} (rank {target.Rank} on a [{outFeatures}, {inFeatures}] layer)");
                }
                if (!IsFloat(info.Dtype))
                {
                    problems.Add($"tensor '{key}' is {info.Dtype}; LoRA factors are floating point");
                }
            }
            else if (parts[^1] == "bias" && !logical.Contains("lora_", StringComparison.Ordinal))
            {
                var name = Resolve(logical[..^".bias".Length].Replace(".base_layer", "", StringComparison.Ordinal)) + ".bias";
                if (!modelBiases.TryGetValue(name, out var parameter))
                {
                    problems.Add($"tensor '{key}' is a bias the model does not have ('{name}')");
                }
                else if (!info.Shape.SequenceEqual(parameter.shape))
                {
                    problems.Add($"tensor '{key}' has shape {info.ShapeText} but the model's '{name}' is {SafeTensors.ShapeText(parameter.shape)}");
                }
                else
                {
                    biases.Add((key, parameter));
                }
            }
            else
            {
                problems.Add(logical.Contains("lora_", StringComparison.Ordinal)
                    ? $"tensor '{key}' is not a LoRA factor FrugalLM implements (only lora_A / lora_B of linear layers; no DoRA magnitudes, embeddings or lora_B biases)"
                    : $"unexpected tensor '{key}' (not a LoRA factor or bias)");
            }
        }
        foreach (var (path, _, rank, _) in plan)
        {
            foreach (var isA in new[] { true, false })
            {
                if (!factors.ContainsKey((path, isA)))
                {
                    problems.Add($"missing tensor '{KeyPrefix}{path}.lora_{(isA ? "A" : "B")}.weight' (the adapter's target_modules select '{path}', rank {rank})");
                }
            }
        }
        if (problems.Count > 0)
        {
            var shown = string.Join("; ", problems.Take(8)) + (problems.Count > 8 ? $"; and {problems.Count - 8} more" : "");
            throw new CheckpointFormatException(file.Path, $"the adapter does not match the model ({FileName()}): {shown}");
        }
        return (factors, biases);
    }

    private static bool IsFloat(string dtype) => dtype is "F64" or "F32" or "F16" or "BF16";

    private static IEnumerable<(string Name, Parameter Parameter)> Biases(LoraModel lora, LoraBias bias, IReadOnlyList<(string Path, LoraLinear Layer)> layers) => bias switch
    {
        LoraBias.All => lora.Model.named_parameters().Where(p => LoraModel.IsBias(p.name)),
        LoraBias.LoraOnly => layers
            .Where(l => l.Layer.BaseLayer is Linear { bias: not null })
            .Select(l => (l.Path + ".base_layer.bias", ((Linear)l.Layer.BaseLayer).bias!)),
        _ => [],
    };

    /// <summary>The fields PEFT 0.14's <c>LoraConfig.to_dict()</c> returns, as <c>PeftModel.save_pretrained</c> writes them.</summary>
    private static Dictionary<string, object?> ConfigJson(LoraConfig config, IReadOnlyList<string> wrappedPaths, string? baseModelNameOrPath)
    {
        object targets = config.Targets.Kind switch
        {
            LoraTargetKind.Names => config.Targets.Names.Order(StringComparer.Ordinal).ToList(),
            LoraTargetKind.Regex => config.Targets.RegexPattern!,
            // PEFT 0.14 expands all-linear to the names of the linear layers it found (the output head left out).
            _ => wrappedPaths.Select(p => p[(p.LastIndexOf('.') + 1)..]).Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList(),
        };
        object? exclude = config.Exclude switch
        {
            null => null,
            { Kind: LoraTargetKind.Regex } e => e.RegexPattern,
            var e => e.Names.Order(StringComparer.Ordinal).ToList(),
        };
        return new Dictionary<string, object?>
        {
            ["alpha_pattern"] = config.AlphaPattern.ToDictionary(kv => kv.Key, kv => Number(kv.Value)),
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = baseModelNameOrPath,
            ["bias"] = config.Bias switch { LoraBias.All => "all", LoraBias.LoraOnly => "lora_only", _ => "none" },
            ["eva_config"] = null,
            ["exclude_modules"] = exclude,
            ["fan_in_fan_out"] = false,
            ["inference_mode"] = true,
            ["init_lora_weights"] = true,
            ["layer_replication"] = null,
            ["layers_pattern"] = config.LayersPattern?.ToList(),
            ["layers_to_transform"] = config.LayersToTransform?.ToList(),
            ["loftq_config"] = new Dictionary<string, object?>(),
            ["lora_alpha"] = Number(config.Alpha),
            ["lora_bias"] = false,
            ["lora_dropout"] = config.Dropout,
            ["megatron_config"] = null,
            ["megatron_core"] = "megatron.core",
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = config.Rank,
            ["rank_pattern"] = config.RankPattern.ToDictionary(kv => kv.Key, kv => (object?)kv.Value),
            ["revision"] = null,
            ["target_modules"] = targets,
            ["task_type"] = "CAUSAL_LM",
            ["use_dora"] = false,
            ["use_rslora"] = config.UseRsLora,
        };
    }

    // PEFT types lora_alpha as int: write an integral alpha as one (32, not 32.0), as Python would have it.
    private static object Number(double value) => value == Math.Floor(value) && Math.Abs(value) < 1e15 ? (long)value : (object)value;

    private static LoraConfig ParseConfig(JsonObject root)
    {
        var peftType = String(root, "peft_type");
        if (peftType != "LORA")
        {
            throw new FormatException($"peft_type is '{peftType ?? "missing"}', not LORA: FrugalLM loads LoRA adapters only");
        }
        var taskType = String(root, "task_type");
        if (taskType is not null and not "CAUSAL_LM")
        {
            throw new FormatException($"task_type is '{taskType}': FrugalLM loads causal-LM adapters (CAUSAL_LM)");
        }
        foreach (var (field, why) in Unsupported)
        {
            if (root[field] is JsonNode node && !IsDefault(node))
            {
                throw new FormatException($"{why} ({field}: {node.ToJsonString()})");
            }
        }
        if (root["init_lora_weights"] is JsonValue init && init.TryGetValue<string>(out var method)
            && new[] { "pissa", "olora", "corda", "loftq", "lora_ga" }.Any(m => method.StartsWith(m, StringComparison.OrdinalIgnoreCase)))
        {
            throw new FormatException($"init_lora_weights '{method}' also changed the base model's weights, so the adapter only works on that modified base; "
                + "save it from PEFT with path_initial_model_for_weight_conversion to get a plain LoRA adapter");
        }
        var rank = Int(root, "r") ?? throw new FormatException("r (the rank) is missing");
        var config = new LoraConfig
        {
            Rank = rank,
            Alpha = Double(root, "lora_alpha") ?? 8,
            Dropout = Double(root, "lora_dropout") ?? 0,
            Targets = Targets(root["target_modules"], "target_modules")
                ?? throw new FormatException("target_modules is missing: FrugalLM needs the adapter to name its target modules"),
            Exclude = Targets(root["exclude_modules"], "exclude_modules"),
            Bias = String(root, "bias") switch
            {
                null or "none" => LoraBias.None,
                "lora_only" => LoraBias.LoraOnly,
                "all" => LoraBias.All,
                var other => throw new FormatException($"bias '{other}' is not none, lora_only or all"),
            },
            UseRsLora = root["use_rslora"] is JsonValue rs && rs.GetValue<bool>(),
            RankPattern = Pattern(root["rank_pattern"], "rank_pattern", v => v.GetValue<int>()),
            AlphaPattern = Pattern(root["alpha_pattern"], "alpha_pattern", v => v.GetValue<double>()),
            LayersToTransform = root["layers_to_transform"] switch
            {
                null => null,
                JsonArray a => a.Select(i => i!.GetValue<int>()).ToList(),
                var v => [v.GetValue<int>()],
            },
            LayersPattern = root["layers_pattern"] switch
            {
                null => null,
                JsonArray a => a.Select(i => i!.GetValue<string>()).ToList(),
                var v => [v.GetValue<string>()],
            },
        };
        config.Validate();
        return config;
    }

    private static bool IsDefault(JsonNode node) => node switch
    {
        JsonValue v when v.TryGetValue<bool>(out var b) => !b,
        JsonArray a => a.Count == 0,
        JsonObject o => o.Count == 0,
        _ => false,
    };

    private static LoraTargets? Targets(JsonNode? node, string field) => node switch
    {
        null => null,
        JsonArray list => LoraTargets.FromNames(list.Select(n => n is JsonValue v && v.TryGetValue<string>(out var s) ? s
            : throw new FormatException($"{field} holds {n?.ToJsonString() ?? "null"}, not a module name"))),
        JsonValue v when v.TryGetValue<string>(out var s) =>
            s.Equals(LoraTargets.AllLinearName, StringComparison.OrdinalIgnoreCase) ? LoraTargets.AllLinear : LoraTargets.FromRegex(s),
        _ => throw new FormatException($"{field} is {node.ToJsonString()}: expected a list of names or a regex string"),
    };

    private static Dictionary<string, T> Pattern<T>(JsonNode? node, string field, Func<JsonValue, T> read) => node switch
    {
        null => [],
        JsonObject o => o.ToDictionary(kv => kv.Key, kv => kv.Value is JsonValue v ? read(v) : throw new FormatException($"{field}['{kv.Key}'] is not a number")),
        _ => throw new FormatException($"{field} is not an object"),
    };

    private static string? String(JsonObject root, string field) =>
        root[field] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    private static int? Int(JsonObject root, string field) =>
        root[field] is JsonValue v ? (v.TryGetValue<int>(out var i) ? i : v.TryGetValue<double>(out var d) && d == Math.Floor(d) ? (int)d
            : throw new FormatException($"{field} is {v.ToJsonString()}, not an integer")) : null;

    private static double? Double(JsonObject root, string field) =>
        root[field] is JsonValue v ? (v.TryGetValue<double>(out var d) ? d : throw new FormatException($"{field} is {v.ToJsonString()}, not a number")) : null;
}
