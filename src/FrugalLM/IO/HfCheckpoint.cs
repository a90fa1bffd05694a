using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Models.Opt;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using static TorchSharp.torch;

namespace FrugalLM.IO;

/// <summary>
/// A Hugging Face model folder: <c>config.json</c>, optional <c>generation_config.json</c>, and weights in
/// <c>model.safetensors</c> or shards listed by <c>model.safetensors.index.json</c>. Opening reads headers
/// only; tensors are copied into the model one at a time in the dtype the model was created with.
/// </summary>
public sealed class HfCheckpoint : IDisposable
{
    /// <summary>Name of the single-file weights.</summary>
    public const string SingleFile = "model.safetensors";

    /// <summary>Name of the shard index.</summary>
    public const string IndexFile = "model.safetensors.index.json";

    // Keys that older transformers versions saved but that are derived, not learned.
    private static readonly string[] IgnoredSuffixes = [".rotary_emb.inv_freq"];

    private readonly List<SafeTensorsFile> files = [];
    private readonly Dictionary<string, SafeTensorsFile> tensorFiles = new(StringComparer.Ordinal);

    private readonly LlamaConfig? llama;

    private HfCheckpoint(string folder, JsonObject raw, LlamaConfig? llama, OptConfig? opt, GenerationConfig? generation)
    {
        Folder = folder;
        RawConfig = raw;
        this.llama = llama;
        Opt = opt;
        Generation = generation;
    }

    /// <summary>HF <c>model_type</c> (llama, mistral, opt).</summary>
    public string ModelType => RawConfig["model_type"]?.GetValue<string>() ?? "";

    /// <summary>The OPT configuration, for an OPT checkpoint.</summary>
    public OptConfig? Opt { get; }

    /// <summary>config.json as read, for fields outside the architecture (<c>quantization_config</c>).</summary>
    public JsonObject RawConfig { get; }

    /// <summary>The model folder.</summary>
    public string Folder { get; }

    /// <summary>The LLaMA-family architecture from <c>config.json</c>.</summary>
    /// <exception cref="ModelConfigException">The checkpoint is of another architecture (see <see cref="ModelType"/>).</exception>
    public LlamaConfig Config => llama ?? throw new ModelConfigException($"{Folder}: a {ModelType} checkpoint has no LLaMA configuration");

    /// <summary>
    /// The architecture of whichever family the folder holds (LLaMA, Mistral or OPT), named
    /// <paramref name="name"/> (default: the folder's name): what plans, estimates and a command's checks
    /// (vocabulary, context length) need without knowing the family.
    /// </summary>
    public ModelSpec Spec(string? name = null)
    {
        name ??= Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(Folder)));
        return Opt is { } opt ? ModelSpec.FromOpt(opt, name) : ModelSpec.FromLlama(Config, name);
    }

    /// <summary>The <c>torch_dtype</c> the weights were saved in, whatever the architecture.</summary>
    public string TorchDtype => Opt?.TorchDtype ?? Config.TorchDtype;

    /// <summary>The folder's generation defaults, if it has any.</summary>
    public GenerationConfig? Generation { get; }

    /// <summary>Every tensor name in the checkpoint.</summary>
    public IReadOnlyCollection<string> TensorNames => tensorFiles.Keys;

    /// <summary>Opens a model folder: reads the configs and validates every weight file's header.</summary>
    /// <exception cref="CheckpointFormatException">A file is missing, truncated or inconsistent.</exception>
    /// <exception cref="ModelConfigException">config.json is missing, malformed or unsupported.</exception>
    public static HfCheckpoint Open(string folder)
    {
        if (!Directory.Exists(folder))
        {
            throw new CheckpointFormatException(folder, "model folder not found");
        }
        var configPath = Path.Combine(folder, "config.json");
        if (!File.Exists(configPath))
        {
            throw new ModelConfigException($"{configPath}: no config.json found");
        }
        var text = File.ReadAllText(configPath);
        JsonObject raw;
        try
        {
            raw = JsonNode.Parse(text) as JsonObject ?? throw new ModelConfigException($"{configPath}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new ModelConfigException($"{configPath}: not valid JSON ({e.Message})");
        }
        bool isOpt = raw["model_type"] is JsonValue v && v.TryGetValue<string>(out var type) && type == "opt";
        var checkpoint = new HfCheckpoint(folder, raw,
            isOpt ? null : LlamaConfig.Parse(text, configPath),
            isOpt ? OptConfig.Parse(text, configPath) : null,
            GenerationConfig.Load(folder));
        try
        {
            checkpoint.OpenWeights();
            return checkpoint;
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Opens <paramref name="folder"/> and loads it into a new model whose floating weights are
    /// <paramref name="dtype"/>. A folder saved 8-bit (bitsandbytes layout) gets int8 linear layers.
    /// </summary>
    public static CausalLM LoadModel(string folder, ScalarType dtype = ScalarType.Float32)
    {
        using var checkpoint = Open(folder);
        return checkpoint.CreateModel(dtype);
    }


    /// <summary>
    /// A new model shaped as this checkpoint (<see cref="OptForCausalLM"/> for OPT, <see cref="LlamaForCausalLM"/>
    /// otherwise; int8 linear layers when it was saved 8-bit) with its weights loaded, floating ones in
    /// <paramref name="dtype"/>.
    /// </summary>
    /// <param name="dtype">Dtype of the floating weights.</param>
    /// <param name="quantize">Quantize a float checkpoint's linear layers to int8 while loading (each float
    /// weight is read and quantized one at a time, so the float model never exists in memory).</param>
    /// <param name="deferred">Tensors (by checkpoint name) left unloaded: their memory is allocated but never touched,
    /// so it is not resident, until a technique takes them over (disk offload streams them). They are still checked
    /// against the file's shapes.</param>
    public CausalLM CreateModel(ScalarType dtype = ScalarType.Float32, Int8Options? quantize = null, Func<string, bool>? deferred = null)
    {
        var model = CausalLM.Create(Spec(), dtype);
        try
        {
            if ((Int8Checkpoint.Options(this) ?? quantize) is { } int8)
            {
                Int8Checkpoint.ReplaceWithEmpty(model, int8);
            }
            LoadInto(model, deferred);
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>Materializes one tensor, converted to <paramref name="dtype"/> when given.</summary>
    public Tensor Load(string name, ScalarType? dtype = null) =>
        tensorFiles.TryGetValue(name, out var file)
            ? file.Load(name, dtype)
            : throw new CheckpointFormatException(Folder, $"tensor '{name}' is not in the checkpoint");

    /// <summary>The file holding tensor <paramref name="name"/> and its header entry, or false when the checkpoint lacks it.</summary>
    public bool TryLocate(string name, out SafeTensorsFile file, out SafeTensorInfo info)
    {
        if (tensorFiles.TryGetValue(name, out var found))
        {
            file = found;
            info = found.Get(name);
            return true;
        }
        file = null!;
        info = null!;
        return false;
    }

    /// <summary>Every parameter and persistent buffer of a model by name: what a checkpoint holds.</summary>
    public static IEnumerable<(string Name, Tensor Tensor)> State(nn.Module model) =>
        model.named_parameters().Select(p => (p.name, (Tensor)p.parameter))
            .Concat(model.named_buffers(include_nonpersistent: false).Select(b => (b.name, b.buffer)));

    /// <summary>
    /// Copies every parameter and persistent buffer of <paramref name="model"/> from the checkpoint. Strict: a missing key, an
    /// unexpected key or a shape mismatch is an error naming the file, the tensor and both shapes, raised
    /// before any weight is written, so a failed load never leaves a half-loaded model.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="deferred">Tensors validated but not copied (see <see cref="CreateModel"/>).</param>
    public void LoadInto(nn.Module model, Func<string, bool>? deferred = null)
    {
        var parameters = State(model).ToDictionary(p => p.Name, p => p.Tensor, StringComparer.Ordinal);
        // Int8 layers over a float checkpoint quantize their weight while loading; their SCB and format come
        // from that, not from the file.
        var quantizeOnLoad = model.named_modules()
            .Where(m => m.module is Int8Linear && tensorFiles.TryGetValue(m.name + ".weight", out var f) && f.Get(m.name + ".weight").Dtype is "F32" or "F16" or "BF16")
            .Select(m => (m.name, (Int8Linear)m.module))
            .ToList();
        var quantized = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (path, _) in quantizeOnLoad)
        {
            parameters.Remove(path + ".weight");
            parameters.Remove(path + ".SCB");
            parameters.Remove(path + ".weight_format");
            quantized.Add(path + ".weight");
        }
        var problems = new List<string>();
        foreach (var (name, parameter) in parameters)
        {
            if (!tensorFiles.TryGetValue(name, out var file))
            {
                problems.Add($"missing tensor '{name}' (model expects {SafeTensors.ShapeText(parameter.shape)})");
                continue;
            }
            var info = file.Get(name);
            if (!info.Shape.SequenceEqual(parameter.shape))
            {
                problems.Add($"{Path.GetFileName(file.Path)}: tensor '{name}' has shape {info.ShapeText} but the model expects {SafeTensors.ShapeText(parameter.shape)}");
            }
        }
        foreach (var (path, layer) in quantizeOnLoad)
        {
            var info = tensorFiles[path + ".weight"].Get(path + ".weight");
            if (!info.Shape.SequenceEqual(layer.Weight.shape))
            {
                problems.Add($"{Path.GetFileName(tensorFiles[path + ".weight"].Path)}: tensor '{path}.weight' has shape {info.ShapeText} but the model expects {SafeTensors.ShapeText(layer.Weight.shape)}");
            }
        }
        foreach (var name in tensorFiles.Keys.Where(n => !parameters.ContainsKey(n) && !quantized.Contains(n) && !Ignorable(n)).Order(StringComparer.Ordinal))
        {
            problems.Add($"{Path.GetFileName(tensorFiles[name].Path)}: unexpected tensor '{name}' (the model has no such parameter)");
        }
        if (problems.Count > 0)
        {
            var shown = string.Join("; ", problems.Take(8)) + (problems.Count > 8 ? $"; and {problems.Count - 8} more" : "");
            throw new CheckpointFormatException(Folder, $"checkpoint does not match the model: {shown}");
        }
        using var noGrad = no_grad();
        foreach (var (name, parameter) in parameters)
        {
            if (deferred?.Invoke(name) != true)
            {
                tensorFiles[name].CopyTo(name, parameter);
            }
        }
        foreach (var (path, layer) in quantizeOnLoad.Where(q => deferred?.Invoke(q.name + ".weight") != true))
        {
            using var weight = Load(path + ".weight");
            layer.LoadFloatWeight(weight);
        }
    }

    // A tied model's head is the embedding; some writers still store lm_head.weight. It is ignored when tied.
    private bool Ignorable(string name) =>
        IgnoredSuffixes.Any(s => name.EndsWith(s, StringComparison.Ordinal))
        || ((llama?.TieWordEmbeddings ?? Opt?.TieWordEmbeddings ?? false) && name == "lm_head.weight");

    /// <summary>
    /// Saves <paramref name="model"/> as an HF folder: config.json, generation_config.json (when given), and
    /// safetensors weights in <paramref name="dtype"/> (default: the model's), split into shards of at most
    /// <paramref name="maxShardBytes"/> with an index when larger. Each file is written atomically; weights
    /// come first and config.json last, and weight files of an earlier save that the new one does not use
    /// are removed at the end.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="folder">The output folder.</param>
    /// <param name="dtype">Dtype of the saved weights (default: the model's).</param>
    /// <param name="generation">Generation defaults to write beside the weights.</param>
    /// <param name="maxShardBytes">Largest shard.</param>
    /// <param name="sources">Tensors to save instead of the model's own, by name (mixed precision's fp32 masters).</param>
    /// <param name="extraConfig">Fields added to config.json (an int8 model's <c>quantization_config</c>).</param>
    public static void Save(CausalLM model, string folder, ScalarType? dtype = null, GenerationConfig? generation = null, long maxShardBytes = 2L << 30,
        IEnumerable<(string Name, Tensor Tensor)>? sources = null, JsonObject? extraConfig = null)
    {
        Directory.CreateDirectory(folder);
        var type = dtype ?? model.Dtype;
        long elementSize = type switch
        {
            ScalarType.Float32 => 4,
            ScalarType.Float16 or ScalarType.BFloat16 => 2,
            _ => throw new ArgumentException($"weights can be saved as float32, float16 or bfloat16, not {type}", nameof(dtype)),
        };
        var replaced = (sources ?? []).ToDictionary(s => s.Name, s => s.Tensor);
        var parameters = State(model).Select(p => (p.Name, replaced.GetValueOrDefault(p.Name) ?? p.Tensor)).ToList();
        // Buffers (an int8 layer's weight, SCB and format) are stored as they are; only parameters change dtype.
        var buffers = model.named_buffers(include_nonpersistent: false).Select(b => b.name).ToHashSet(StringComparer.Ordinal);
        var byName = parameters.ToDictionary(p => p.Name, p => p.Item2, StringComparer.Ordinal);
        var plan = PlanWeightFiles(parameters.Select(p => (p.Name,
            p.Item2.numel() * (p.Item2.is_floating_point() && !buffers.Contains(p.Name) ? elementSize : p.Item2.element_size()))).ToList(), maxShardBytes);
        var written = new List<string>();
        foreach (var (file, names) in plan.Files)
        {
            SafeTensors.Write(Path.Combine(folder, file), names.Select(n => (n, byName[n])).ToList(), dtype: type, keepDtype: buffers);
            written.Add(file);
        }
        FinishFolder(model, folder, plan, written, type, generation, extraConfig);
    }

    /// <summary>
    /// Saves <paramref name="model"/> as <see cref="Save"/> does, byte for byte, but takes the tensors that
    /// <paramref name="stream"/> declares one group at a time (an FSDP unit gathered from its shards), so the writer
    /// never holds more than one group: every file's layout is declared from the names and shapes up front and the
    /// data is filled in as groups arrive. Tensors that the stream does not declare come from the model itself.
    /// Every rank that takes part in the stream's collectives must run <see cref="FetchStream"/> meanwhile, which
    /// fetches the same groups in the same order.
    /// </summary>
    /// <param name="model">The model (its structure, buffers and unstreamed parameters).</param>
    /// <param name="folder">The output folder.</param>
    /// <param name="stream">The streamed tensors and how to fetch them.</param>
    /// <param name="dtype">Dtype of the saved weights (default: the model's).</param>
    /// <param name="generation">Generation defaults to write beside the weights.</param>
    /// <param name="maxShardBytes">Largest shard.</param>
    /// <param name="extraConfig">Fields added to config.json.</param>
    public static void SaveStreamed(CausalLM model, string folder, WeightStream stream, ScalarType? dtype = null, GenerationConfig? generation = null,
        long maxShardBytes = 2L << 30, JsonObject? extraConfig = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var (type, layout, plan) = PlanStream(model, stream, dtype, maxShardBytes);
        Directory.CreateDirectory(folder);
        var held = State(model).ToDictionary(p => p.Name, p => p.Tensor, StringComparer.Ordinal);
        var groups = stream.Tensors.ToDictionary(t => t.Name, t => t.Group, StringComparer.Ordinal);
        var written = new List<string>();
        foreach (var (file, names) in plan.Files)
        {
            var inFile = names.ToHashSet(StringComparer.Ordinal);
            SafeTensors.Write(Path.Combine(folder, file), names.Select(n => layout[n]).ToList(), null, (_, put) =>
            {
                foreach (var name in names.Where(n => !groups.ContainsKey(n)))
                {
                    put(name, held[name]);
                }
                // A group that spans two files is fetched once for each (the ranks replay exactly this order).
                foreach (var group in StreamGroups(names, groups))
                {
                    stream.Fetch(group, (name, value) =>
                    {
                        if (inFile.Contains(name))
                        {
                            put(name, value);
                        }
                    });
                }
            });
            written.Add(file);
        }
        FinishFolder(model, folder, plan, written, type, generation, extraConfig);
    }

    /// <summary>
    /// What a rank that does not write runs while another runs <see cref="SaveStreamed"/> with the same arguments:
    /// fetches the same groups in the same order (their collectives must match) and discards them.
    /// </summary>
    /// <param name="model">The model (the same structure as the writer's).</param>
    /// <param name="stream">The streamed tensors (the same declarations as the writer's).</param>
    /// <param name="dtype">The writer's dtype.</param>
    /// <param name="maxShardBytes">The writer's largest shard.</param>
    public static void FetchStream(CausalLM model, WeightStream stream, ScalarType? dtype = null, long maxShardBytes = 2L << 30)
    {
        ArgumentNullException.ThrowIfNull(stream);
        var (_, _, plan) = PlanStream(model, stream, dtype, maxShardBytes);
        var groups = stream.Tensors.ToDictionary(t => t.Name, t => t.Group, StringComparer.Ordinal);
        foreach (var (_, names) in plan.Files)
        {
            foreach (var group in StreamGroups(names, groups))
            {
                stream.Fetch(group, static (_, _) => { });
            }
        }
    }

    // The groups a file needs, in the order of their first tensor in it: the one order every rank fetches them in.
    private static List<string> StreamGroups(IReadOnlyList<string> names, Dictionary<string, string> groups)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var order = new List<string>();
        foreach (var name in names)
        {
            if (groups.TryGetValue(name, out var group) && seen.Add(group))
            {
                order.Add(group);
            }
        }
        return order;
    }

    // Save's file plan and each tensor's declared layout, from the stream's shapes where it has them: the same names,
    // dtypes, shapes and order that Save gives the list writer, so both produce the same bytes. It reads no parameter
    // data, and is the same on every rank.
    private static (ScalarType Type, Dictionary<string, SafeTensorLayout> Layout, WeightFilePlan Plan) PlanStream(CausalLM model, WeightStream stream, ScalarType? dtype, long maxShardBytes)
    {
        var type = dtype ?? model.Dtype;
        if (type is not (ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16))
        {
            throw new ArgumentException($"weights can be saved as float32, float16 or bfloat16, not {type}", nameof(dtype));
        }
        var shapes = stream.Tensors.ToDictionary(t => t.Name, t => t.Shape, StringComparer.Ordinal);
        var buffers = model.named_buffers(include_nonpersistent: false).Select(b => b.name).ToHashSet(StringComparer.Ordinal);
        var layout = new Dictionary<string, SafeTensorLayout>(StringComparer.Ordinal);
        var sizes = new List<(string Name, long Bytes)>();
        foreach (var (name, tensor) in State(model))
        {
            // A streamed tensor is a floating parameter (its stored dtype is the save's); anything else keeps Save's rule.
            var entry = shapes.TryGetValue(name, out var shape)
                ? new SafeTensorLayout(name, type, shape)
                : new SafeTensorLayout(name, tensor.is_floating_point() && !buffers.Contains(name) ? type : tensor.dtype, tensor.shape);
            layout[name] = entry;
            sizes.Add((name, entry.Shape.Aggregate(1L, (a, b) => a * b) * SafeTensors.ElementSize(SafeTensors.FromScalarType(entry.Dtype))!.Value));
        }
        return (type, layout, PlanWeightFiles(sizes, maxShardBytes));
    }

    // After the weight files: their index, generation_config.json, config.json, and no weight file of an earlier save
    // that this one did not write (a model saved once in 2 files and now in 1).
    private static void FinishFolder(CausalLM model, string folder, WeightFilePlan plan, List<string> written, ScalarType type,
        GenerationConfig? generation, JsonObject? extraConfig)
    {
        written.AddRange(WriteWeightIndex(folder, plan));
        generation?.Save(folder);
        SaveConfig(model, folder, type, extraConfig);
        foreach (var stale in Directory.EnumerateFiles(folder, "model*.safetensors*"))
        {
            if (!written.Contains(Path.GetFileName(stale)))
            {
                File.Delete(stale);
            }
        }
    }

    /// <summary>Writes the <c>config.json</c> that <see cref="Save"/> writes for weights stored in <paramref name="dtype"/>.</summary>
    /// <param name="model">The model.</param>
    /// <param name="folder">The folder.</param>
    /// <param name="dtype">The saved weights' dtype (its <c>torch_dtype</c>).</param>
    /// <param name="extraConfig">Fields added to the config.</param>
    public static void SaveConfig(CausalLM model, string folder, ScalarType dtype, JsonObject? extraConfig = null)
    {
        var config = model.ConfigJson(DtypeName(dtype));
        foreach (var (key, value) in extraConfig ?? [])
        {
            config[key] = value?.DeepClone();
        }
        AtomicFile.WriteText(Path.Combine(folder, "config.json"), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }

    /// <summary>How <see cref="Save"/> splits weights into files: in order, a new file whenever the next tensor would take
    /// the current one past <paramref name="maxShardBytes"/>; one file is <c>model.safetensors</c>, several are
    /// <c>model-0000i-of-0000n.safetensors</c> with an index.</summary>
    /// <param name="tensors">Tensor names and stored bytes, in the model's order.</param>
    /// <param name="maxShardBytes">Largest file.</param>
    public static WeightFilePlan PlanWeightFiles(IReadOnlyList<(string Name, long Bytes)> tensors, long maxShardBytes = 2L << 30)
    {
        var shards = new List<List<string>> { new() };
        long shardBytes = 0, totalBytes = 0;
        foreach (var (name, bytes) in tensors)
        {
            if (shardBytes > 0 && shardBytes + bytes > maxShardBytes)
            {
                shards.Add([]);
                shardBytes = 0;
            }
            shards[^1].Add(name);
            shardBytes += bytes;
            totalBytes += bytes;
        }
        var files = shards.Select((names, i) => (shards.Count == 1
            ? SingleFile
            : string.Create(CultureInfo.InvariantCulture, $"model-{i + 1:D5}-of-{shards.Count:D5}.safetensors"), (IReadOnlyList<string>)names)).ToList();
        return new WeightFilePlan(files, totalBytes);
    }

    /// <summary>Writes <c>model.safetensors.index.json</c> when <paramref name="plan"/> has several files; returns the file names written.</summary>
    public static IReadOnlyList<string> WriteWeightIndex(string folder, WeightFilePlan plan)
    {
        if (plan.Files.Count <= 1)
        {
            return [];
        }
        var weightMap = new JsonObject();
        foreach (var (file, names) in plan.Files)
        {
            foreach (var name in names)
            {
                weightMap[name] = file;
            }
        }
        var index = new JsonObject { ["metadata"] = new JsonObject { ["total_size"] = plan.TotalBytes }, ["weight_map"] = weightMap };
        AtomicFile.WriteText(Path.Combine(folder, IndexFile), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        return [IndexFile];
    }

    /// <summary>The HF <c>torch_dtype</c> name of a dtype.</summary>
    public static string DtypeName(ScalarType type) => type switch
    {
        ScalarType.Float32 => "float32",
        ScalarType.Float16 => "float16",
        ScalarType.BFloat16 => "bfloat16",
        _ => type.ToString().ToLowerInvariant(),
    };

    /// <summary>The dtype for an HF <c>torch_dtype</c> name.</summary>
    public static ScalarType ParseDtype(string name) => name switch
    {
        "float32" or "fp32" => ScalarType.Float32,
        "float16" or "fp16" or "half" => ScalarType.Float16,
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        _ => throw new ArgumentException($"unknown dtype '{name}' (use float32, float16 or bfloat16)", nameof(name)),
    };

    private void OpenWeights()
    {
        var indexPath = Path.Combine(Folder, IndexFile);
        var singlePath = Path.Combine(Folder, SingleFile);
        if (File.Exists(indexPath))
        {
            JsonObject weightMap;
            try
            {
                weightMap = (JsonNode.Parse(File.ReadAllText(indexPath)) as JsonObject)?["weight_map"] as JsonObject
                    ?? throw new CheckpointFormatException(indexPath, "no weight_map object");
            }
            catch (JsonException e)
            {
                throw new CheckpointFormatException(indexPath, $"not valid JSON ({e.Message})", e);
            }
            var opened = new Dictionary<string, SafeTensorsFile>(StringComparer.Ordinal);
            foreach (var (name, node) in weightMap)
            {
                var fileName = node is JsonValue v && v.TryGetValue<string>(out var s) ? s
                    : throw new CheckpointFormatException(indexPath, $"weight_map entry '{name}' is not a file name");
                if (fileName.Contains('/') || fileName.Contains('\\'))
                {
                    throw new CheckpointFormatException(indexPath, $"weight_map entry '{name}' points outside the folder ({fileName})");
                }
                if (!opened.TryGetValue(fileName, out var file))
                {
                    file = SafeTensorsFile.Open(Path.Combine(Folder, fileName));
                    files.Add(file);
                    opened[fileName] = file;
                }
                if (!file.Tensors.ContainsKey(name))
                {
                    throw new CheckpointFormatException(file.Path, $"the index says tensor '{name}' is in this file, but it is not");
                }
                tensorFiles[name] = file;
            }
        }
        else if (File.Exists(singlePath))
        {
            var file = SafeTensorsFile.Open(singlePath);
            files.Add(file);
            foreach (var name in file.Tensors.Keys)
            {
                tensorFiles[name] = file;
            }
        }
        else
        {
            var other = Directory.EnumerateFiles(Folder, "*.bin").Concat(Directory.EnumerateFiles(Folder, "*.pt")).FirstOrDefault();
            throw new CheckpointFormatException(Folder, other is null
                ? $"no {SingleFile} or {IndexFile}"
                : $"no safetensors weights (found {Path.GetFileName(other)}; FrugalLM reads safetensors only: convert with transformers' save_pretrained(safe_serialization=True))");
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var file in files)
        {
            file.Dispose();
        }
    }
}

/// <summary>Weight files of an HF folder: each file's name and the tensors it holds, and the total bytes.</summary>
/// <param name="Files">File name and tensor names, in order.</param>
/// <param name="TotalBytes">Bytes of all tensors.</param>
public sealed record WeightFilePlan(IReadOnlyList<(string File, IReadOnlyList<string> Names)> Files, long TotalBytes);

/// <summary>
/// Tensors that <see cref="HfCheckpoint.SaveStreamed"/> fetches one group at a time instead of holding them all (an FSDP
/// run's units, gathered from their shards): declared up front by name, shape and group, supplied by <see cref="Fetch"/>.
/// </summary>
/// <param name="Tensors">Every streamed tensor: its name in the model, its shape and the group it is fetched with.</param>
/// <param name="Fetch">Fetches one group and hands each of its tensors to the callback as (name, value); a value may be a
/// view that lives only until <see cref="Fetch"/> returns. A rank that holds no data (not the writer) calls nothing.</param>
public sealed record WeightStream(IReadOnlyList<(string Name, long[] Shape, string Group)> Tensors, Action<string, Action<string, Tensor>> Fetch);
