using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace FrugalLM.Planning;

/// <summary>How rotary position frequencies are rescaled (HF <c>rope_scaling</c>).</summary>
public enum RopeScalingKind
{
    /// <summary>No scaling.</summary>
    None,

    /// <summary>Position interpolation: every frequency divided by <see cref="RopeScaling.Factor"/>.</summary>
    Linear,

    /// <summary>Llama 3.1's frequency-dependent scaling.</summary>
    Llama3,
}

/// <summary>HF <c>rope_scaling</c>.</summary>
/// <param name="Kind">The scaling rule.</param>
/// <param name="Factor">Scale factor.</param>
/// <param name="LowFreqFactor">Llama 3: wavelengths longer than original/low are fully scaled.</param>
/// <param name="HighFreqFactor">Llama 3: wavelengths shorter than original/high are kept.</param>
/// <param name="OriginalMaxPositionEmbeddings">Llama 3: the context the model was pre-trained with.</param>
public sealed record RopeScaling(
    RopeScalingKind Kind,
    double Factor = 1.0,
    double LowFreqFactor = 1.0,
    double HighFreqFactor = 4.0,
    int OriginalMaxPositionEmbeddings = 8192)
{
    /// <summary>No scaling.</summary>
    public static RopeScaling None { get; } = new(RopeScalingKind.None);
}

/// <summary>Thrown when a model configuration is missing, malformed or describes an unsupported model.</summary>
public sealed class ModelConfigException(string message) : Exception(message);

/// <summary>
/// The architecture hyper-parameters of a LLaMA-family model, read from (and written to) a Hugging Face
/// <c>config.json</c>. Field meanings and defaults follow transformers' <c>LlamaConfig</c>; Mistral configs
/// (same layout plus an optional sliding window) load too.
/// </summary>
public sealed record LlamaConfig
{
    /// <summary>HF <c>model_type</c>: <c>llama</c> or <c>mistral</c>.</summary>
    public string ModelType { get; init; } = "llama";

    /// <summary>HF <c>vocab_size</c>.</summary>
    public int VocabSize { get; init; } = 32000;

    /// <summary>HF <c>hidden_size</c>.</summary>
    public int HiddenSize { get; init; } = 4096;

    /// <summary>HF <c>intermediate_size</c> (the SwiGLU width).</summary>
    public int IntermediateSize { get; init; } = 11008;

    /// <summary>HF <c>num_hidden_layers</c>.</summary>
    public int NumHiddenLayers { get; init; } = 32;

    /// <summary>HF <c>num_attention_heads</c>.</summary>
    public int NumAttentionHeads { get; init; } = 32;

    /// <summary>HF <c>num_key_value_heads</c> (grouped-query attention); defaults to the head count.</summary>
    public int NumKeyValueHeads { get; init; } = 32;

    /// <summary>HF <c>head_dim</c>; defaults to hidden_size / num_attention_heads.</summary>
    public int HeadDim { get; init; } = 128;

    /// <summary>HF <c>max_position_embeddings</c>.</summary>
    public int MaxPositionEmbeddings { get; init; } = 2048;

    /// <summary>HF <c>rms_norm_eps</c>.</summary>
    public double RmsNormEps { get; init; } = 1e-6;

    /// <summary>HF <c>rope_theta</c>.</summary>
    public double RopeTheta { get; init; } = 10000.0;

    /// <summary>HF <c>rope_scaling</c>.</summary>
    public RopeScaling RopeScaling { get; init; } = RopeScaling.None;

    /// <summary>HF <c>tie_word_embeddings</c>: the LM head reuses the embedding matrix.</summary>
    public bool TieWordEmbeddings { get; init; }

    /// <summary>HF <c>attention_bias</c>: q/k/v/o projections carry biases.</summary>
    public bool AttentionBias { get; init; }

    /// <summary>HF <c>mlp_bias</c>: gate/up/down projections carry biases.</summary>
    public bool MlpBias { get; init; }

    /// <summary>Mistral's <c>sliding_window</c>; null when attention is global.</summary>
    public int? SlidingWindow { get; init; }

    /// <summary>HF <c>bos_token_id</c>.</summary>
    public int? BosTokenId { get; init; }

    /// <summary>HF <c>eos_token_id</c>, which may be a list.</summary>
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];

    /// <summary>HF <c>pad_token_id</c>.</summary>
    public int? PadTokenId { get; init; }

    /// <summary>HF <c>torch_dtype</c> (the dtype the checkpoint was saved in), e.g. <c>float32</c>.</summary>
    public string TorchDtype { get; init; } = "float32";

    /// <summary>Model types whose layout this runtime implements.</summary>
    public static IReadOnlyList<string> SupportedModelTypes { get; } = ["llama", "mistral"];

    /// <summary>Total parameter count, counting a tied LM head once.</summary>
    public long ParameterCount
    {
        get
        {
            long h = HiddenSize, q = (long)NumAttentionHeads * HeadDim, kv = (long)NumKeyValueHeads * HeadDim;
            long attention = h * q + 2 * h * kv + q * h + (AttentionBias ? q + 2 * kv + h : 0);
            long mlp = 3 * h * IntermediateSize + (MlpBias ? 2L * IntermediateSize + h : 0);
            long layer = attention + mlp + 2 * h;
            long embeddings = (long)VocabSize * h;
            return embeddings + NumHiddenLayers * layer + h + (TieWordEmbeddings ? 0 : embeddings);
        }
    }

    /// <summary>Reads <c>config.json</c> from a model folder or a file path.</summary>
    public static LlamaConfig Load(string path)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, "config.json") : path;
        if (!File.Exists(file))
        {
            throw new ModelConfigException($"{file}: no config.json found");
        }
        return Parse(File.ReadAllText(file), file);
    }

    /// <summary>Parses the text of a <c>config.json</c>; <paramref name="source"/> names it in errors.</summary>
    public static LlamaConfig Parse(string json, string source = "config.json")
    {
        JsonObject root;
        try
        {
            root = JsonNode.Parse(json) as JsonObject ?? throw new ModelConfigException($"{source}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new ModelConfigException($"{source}: not valid JSON ({e.Message})");
        }
        var modelType = root["model_type"]?.GetValue<string>() ?? "";
        if (!SupportedModelTypes.Contains(modelType))
        {
            var shown = modelType.Length == 0 ? "(missing model_type)" : modelType;
            throw new ModelConfigException(
                $"{source}: unsupported architecture '{shown}'; FrugalLM runs {string.Join(", ", SupportedModelTypes)} (LlamaForCausalLM layout)");
        }
        try
        {
            int hidden = Int(root, "hidden_size", source);
            int heads = Int(root, "num_attention_heads", source);
            var config = new LlamaConfig
            {
                ModelType = modelType,
                VocabSize = Int(root, "vocab_size", source),
                HiddenSize = hidden,
                IntermediateSize = Int(root, "intermediate_size", source),
                NumHiddenLayers = Int(root, "num_hidden_layers", source),
                NumAttentionHeads = heads,
                NumKeyValueHeads = OptInt(root, "num_key_value_heads") ?? heads,
                HeadDim = OptInt(root, "head_dim") ?? (heads > 0 ? hidden / heads : 0),
                MaxPositionEmbeddings = OptInt(root, "max_position_embeddings") ?? 2048,
                RmsNormEps = OptDouble(root, "rms_norm_eps") ?? 1e-6,
                RopeTheta = OptDouble(root, "rope_theta") ?? 10000.0,
                RopeScaling = ParseRopeScaling(root["rope_scaling"], source),
                TieWordEmbeddings = root["tie_word_embeddings"]?.GetValue<bool>() ?? false,
                AttentionBias = root["attention_bias"]?.GetValue<bool>() ?? false,
                MlpBias = root["mlp_bias"]?.GetValue<bool>() ?? false,
                SlidingWindow = OptInt(root, "sliding_window"),
                BosTokenId = OptInt(root, "bos_token_id"),
                EosTokenIds = IntList(root["eos_token_id"]),
                PadTokenId = OptInt(root, "pad_token_id"),
                TorchDtype = root["torch_dtype"]?.GetValue<string>() ?? root["dtype"]?.GetValue<string>() ?? "float32",
            };
            var activation = root["hidden_act"]?.GetValue<string>() ?? "silu";
            if (activation != "silu")
            {
                throw new ModelConfigException($"{source}: hidden_act '{activation}' is not supported (LLaMA uses silu)");
            }
            config.Validate(source);
            return config;
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new ModelConfigException($"{source}: a field has the wrong type ({e.Message})");
        }
    }

    /// <summary>Checks the shape rules every layer relies on.</summary>
    public void Validate(string source = "config")
    {
        void Require(bool ok, string what)
        {
            if (!ok)
            {
                throw new ModelConfigException($"{source}: {what}");
            }
        }
        Require(VocabSize > 0 && HiddenSize > 0 && IntermediateSize > 0 && NumHiddenLayers > 0, "sizes must be positive");
        Require(NumAttentionHeads > 0 && NumKeyValueHeads > 0 && HeadDim > 0, "head counts and head_dim must be positive");
        Require(NumAttentionHeads % NumKeyValueHeads == 0,
            $"num_attention_heads ({NumAttentionHeads}) must be a multiple of num_key_value_heads ({NumKeyValueHeads})");
        Require(HeadDim % 2 == 0, $"head_dim ({HeadDim}) must be even for rotary embeddings");
        Require(RmsNormEps > 0, "rms_norm_eps must be positive");
    }

    /// <summary>Writes this configuration as an HF <c>config.json</c> object.</summary>
    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["architectures"] = new JsonArray(ModelType == "mistral" ? "MistralForCausalLM" : "LlamaForCausalLM"),
            ["model_type"] = ModelType,
            ["vocab_size"] = VocabSize,
            ["hidden_size"] = HiddenSize,
            ["intermediate_size"] = IntermediateSize,
            ["num_hidden_layers"] = NumHiddenLayers,
            ["num_attention_heads"] = NumAttentionHeads,
            ["num_key_value_heads"] = NumKeyValueHeads,
            ["head_dim"] = HeadDim,
            ["hidden_act"] = "silu",
            ["max_position_embeddings"] = MaxPositionEmbeddings,
            ["rms_norm_eps"] = RmsNormEps,
            ["rope_theta"] = RopeTheta,
            ["rope_scaling"] = RopeScalingJson(),
            ["tie_word_embeddings"] = TieWordEmbeddings,
            ["attention_bias"] = AttentionBias,
            ["mlp_bias"] = MlpBias,
            ["torch_dtype"] = TorchDtype,
        };
        if (SlidingWindow is int window)
        {
            o["sliding_window"] = window;
        }
        if (BosTokenId is int bos)
        {
            o["bos_token_id"] = bos;
        }
        if (EosTokenIds.Count == 1)
        {
            o["eos_token_id"] = EosTokenIds[0];
        }
        else if (EosTokenIds.Count > 1)
        {
            o["eos_token_id"] = new JsonArray(EosTokenIds.Select(i => (JsonNode?)i).ToArray());
        }
        if (PadTokenId is int pad)
        {
            o["pad_token_id"] = pad;
        }
        return o;
    }

    private JsonNode? RopeScalingJson() => RopeScaling.Kind switch
    {
        RopeScalingKind.Linear => new JsonObject { ["rope_type"] = "linear", ["factor"] = RopeScaling.Factor },
        RopeScalingKind.Llama3 => new JsonObject
        {
            ["rope_type"] = "llama3",
            ["factor"] = RopeScaling.Factor,
            ["low_freq_factor"] = RopeScaling.LowFreqFactor,
            ["high_freq_factor"] = RopeScaling.HighFreqFactor,
            ["original_max_position_embeddings"] = RopeScaling.OriginalMaxPositionEmbeddings,
        },
        _ => null,
    };

    private static RopeScaling ParseRopeScaling(JsonNode? node, string source)
    {
        if (node is not JsonObject o)
        {
            return RopeScaling.None;
        }
        var type = o["rope_type"]?.GetValue<string>() ?? o["type"]?.GetValue<string>() ?? "default";
        double factor = OptDouble(o, "factor") ?? 1.0;
        return type switch
        {
            "default" => RopeScaling.None,
            "linear" => new RopeScaling(RopeScalingKind.Linear, factor),
            "llama3" => new RopeScaling(
                RopeScalingKind.Llama3,
                factor,
                OptDouble(o, "low_freq_factor") ?? 1.0,
                OptDouble(o, "high_freq_factor") ?? 4.0,
                OptInt(o, "original_max_position_embeddings") ?? 8192),
            _ => throw new ModelConfigException(
                $"{source}: rope_scaling type '{type}' is not supported (supported: linear, llama3)"),
        };
    }

    private static int Int(JsonObject o, string key, string source) =>
        OptInt(o, key) ?? throw new ModelConfigException($"{source}: required field '{key}' is missing");

    private static int? OptInt(JsonObject o, string key) => o[key] is JsonValue v ? (int)v.GetValue<double>() : null;

    private static double? OptDouble(JsonObject o, string key) => o[key] is JsonValue v ? v.GetValue<double>() : null;

    private static IReadOnlyList<int> IntList(JsonNode? node) => node switch
    {
        JsonArray a => a.Select(x => (int)x!.GetValue<double>()).ToArray(),
        JsonValue v => [(int)v.GetValue<double>()],
        _ => [],
    };

    /// <summary>A short human description, e.g. "llama 6 layers, d=256, 8/4 heads, 17.3M params".</summary>
    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"{ModelType} {NumHiddenLayers} layers, d={HiddenSize}, ffn={IntermediateSize}, heads {NumAttentionHeads}/{NumKeyValueHeads}, vocab {VocabSize}, {ParameterCount / 1e6:F1}M params");
}
