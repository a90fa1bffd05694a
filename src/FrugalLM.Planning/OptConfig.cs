using System.Text.Json;
using System.Text.Json.Nodes;

namespace FrugalLM.Planning;

/// <summary>
/// The hyper-parameters of a Meta OPT model (HF <c>model_type</c> "opt"), read from a Hugging Face
/// <c>config.json</c>: the estimator describes it and the runtime builds <c>OptForCausalLM</c> from it (the
/// article's int8 + LoRA example fine-tunes OPT-6.7B). Field meanings and defaults follow transformers'
/// <c>OPTConfig</c>.
/// </summary>
public sealed record OptConfig
{
    /// <summary>HF <c>vocab_size</c>.</summary>
    public int VocabSize { get; init; } = 50272;

    /// <summary>HF <c>hidden_size</c>.</summary>
    public int HiddenSize { get; init; } = 768;

    /// <summary>HF <c>ffn_dim</c>: the width of fc1's output.</summary>
    public int FfnDim { get; init; } = 3072;

    /// <summary>HF <c>num_hidden_layers</c>.</summary>
    public int NumHiddenLayers { get; init; } = 12;

    /// <summary>HF <c>num_attention_heads</c>.</summary>
    public int NumAttentionHeads { get; init; } = 12;

    /// <summary>HF <c>max_position_embeddings</c>; the learned table has two more rows (OPT's padding offset).</summary>
    public int MaxPositionEmbeddings { get; init; } = 2048;

    /// <summary>HF <c>word_embed_proj_dim</c>: the embedding width, projected to the hidden size when different.</summary>
    public int WordEmbedProjDim { get; init; } = 768;

    /// <summary>HF <c>do_layer_norm_before</c>: pre-norm layers (every size except 350M).</summary>
    public bool DoLayerNormBefore { get; init; } = true;

    /// <summary>HF <c>_remove_final_layer_norm</c>: old checkpoints without the decoder's final LayerNorm.</summary>
    public bool RemoveFinalLayerNorm { get; init; }

    /// <summary>HF <c>enable_bias</c>: every linear layer carries a bias.</summary>
    public bool EnableBias { get; init; } = true;

    /// <summary>HF <c>layer_norm_elementwise_affine</c>: LayerNorms carry a weight and a bias.</summary>
    public bool LayerNormElementwiseAffine { get; init; } = true;

    /// <summary>HF <c>dropout</c>: the residual dropout probability used while training.</summary>
    public double Dropout { get; init; } = 0.1;

    /// <summary>HF <c>tie_word_embeddings</c>: the LM head reuses the embedding matrix (true for every OPT).</summary>
    public bool TieWordEmbeddings { get; init; } = true;

    /// <summary>HF <c>attention_dropout</c>: dropout on the attention probabilities while training.</summary>
    public double AttentionDropout { get; init; }

    /// <summary>
    /// HF <c>activation_dropout</c>: kept for the config's round trip; transformers' OPT declares it but never
    /// applies it, so neither does FrugalLM.
    /// </summary>
    public double ActivationDropout { get; init; }

    /// <summary>HF <c>layerdrop</c>: the probability of skipping a whole layer while training (0 for every released OPT).</summary>
    public double LayerDrop { get; init; }

    /// <summary>HF <c>init_std</c>: the standard deviation of the initial linear and embedding weights.</summary>
    public double InitStd { get; init; } = 0.02;

    /// <summary>HF <c>pad_token_id</c>: the embedding row that gets no gradient from lookups (1 for OPT).</summary>
    public int? PadTokenId { get; init; } = 1;

    /// <summary>HF <c>bos_token_id</c>.</summary>
    public int? BosTokenId { get; init; } = 2;

    /// <summary>HF <c>eos_token_id</c>.</summary>
    public int? EosTokenId { get; init; } = 2;

    /// <summary>HF <c>torch_dtype</c>: the dtype the weights were saved in.</summary>
    public string TorchDtype { get; init; } = "float32";

    /// <summary>Parses the text of an OPT <c>config.json</c>; <paramref name="source"/> names it in errors.</summary>
    public static OptConfig Parse(string json, string source = "config.json")
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
        var modelType = root["model_type"]?.GetValue<string>();
        if (modelType != "opt")
        {
            throw new ModelConfigException($"{source}: model_type '{modelType}' is not 'opt'");
        }
        try
        {
            int hidden = Int(root, "hidden_size", source);
            var activation = root["activation_function"]?.GetValue<string>() ?? "relu";
            if (activation != "relu")
            {
                throw new ModelConfigException($"{source}: activation_function '{activation}' is not supported (every OPT uses relu)");
            }
            var config = new OptConfig
            {
                VocabSize = Int(root, "vocab_size", source),
                HiddenSize = hidden,
                FfnDim = Int(root, "ffn_dim", source),
                NumHiddenLayers = Int(root, "num_hidden_layers", source),
                NumAttentionHeads = Int(root, "num_attention_heads", source),
                MaxPositionEmbeddings = OptInt(root, "max_position_embeddings") ?? 2048,
                WordEmbedProjDim = OptInt(root, "word_embed_proj_dim") ?? hidden,
                DoLayerNormBefore = root["do_layer_norm_before"]?.GetValue<bool>() ?? true,
                RemoveFinalLayerNorm = root["_remove_final_layer_norm"]?.GetValue<bool>() ?? false,
                EnableBias = root["enable_bias"]?.GetValue<bool>() ?? true,
                LayerNormElementwiseAffine = root["layer_norm_elementwise_affine"]?.GetValue<bool>() ?? true,
                Dropout = root["dropout"] is JsonValue d ? d.GetValue<double>() : 0.1,
                TieWordEmbeddings = root["tie_word_embeddings"]?.GetValue<bool>() ?? true,
                AttentionDropout = OptDouble(root, "attention_dropout") ?? 0.0,
                ActivationDropout = OptDouble(root, "activation_dropout") ?? 0.0,
                LayerDrop = OptDouble(root, "layerdrop") ?? 0.0,
                InitStd = OptDouble(root, "init_std") ?? 0.02,
                // An explicit null means "no such token"; a missing key means OPTConfig's default.
                PadTokenId = root.ContainsKey("pad_token_id") ? OptInt(root, "pad_token_id") : 1,
                BosTokenId = root.ContainsKey("bos_token_id") ? OptInt(root, "bos_token_id") : 2,
                EosTokenId = root.ContainsKey("eos_token_id") ? OptInt(root, "eos_token_id") : 2,
                TorchDtype = root["torch_dtype"]?.GetValue<string>() ?? root["dtype"]?.GetValue<string>() ?? "float32",
            };
            config.Validate(source);
            return config;
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            throw new ModelConfigException($"{source}: a field has the wrong type ({e.Message})");
        }
    }

    /// <summary>Checks the shape rules the layers rely on.</summary>
    public void Validate(string source = "config")
    {
        if (VocabSize <= 0 || HiddenSize <= 0 || FfnDim <= 0 || NumHiddenLayers <= 0 || NumAttentionHeads <= 0
            || WordEmbedProjDim <= 0 || MaxPositionEmbeddings <= 0)
        {
            throw new ModelConfigException($"{source}: sizes must be positive");
        }
        if (HiddenSize % NumAttentionHeads != 0)
        {
            throw new ModelConfigException(
                $"{source}: hidden_size ({HiddenSize}) must be a multiple of num_attention_heads ({NumAttentionHeads})");
        }
        if (Dropout is < 0 or >= 1)
        {
            throw new ModelConfigException($"{source}: dropout must be in [0, 1)");
        }
        if (AttentionDropout is < 0 or >= 1 || ActivationDropout is < 0 or >= 1 || LayerDrop is < 0 or >= 1)
        {
            throw new ModelConfigException($"{source}: attention_dropout, activation_dropout and layerdrop must be in [0, 1)");
        }
        if (PadTokenId is int pad && (pad < 0 || pad >= VocabSize))
        {
            throw new ModelConfigException($"{source}: pad_token_id ({pad}) is outside the vocabulary (0..{VocabSize - 1})");
        }
    }

    /// <summary>Writes this configuration as the <c>config.json</c> object transformers' <c>OPTConfig</c> saves.</summary>
    public JsonObject ToJson() => new()
    {
        ["architectures"] = new JsonArray("OPTForCausalLM"),
        ["model_type"] = "opt",
        ["vocab_size"] = VocabSize,
        ["hidden_size"] = HiddenSize,
        ["ffn_dim"] = FfnDim,
        ["num_hidden_layers"] = NumHiddenLayers,
        ["num_attention_heads"] = NumAttentionHeads,
        ["max_position_embeddings"] = MaxPositionEmbeddings,
        ["word_embed_proj_dim"] = WordEmbedProjDim,
        ["do_layer_norm_before"] = DoLayerNormBefore,
        ["_remove_final_layer_norm"] = RemoveFinalLayerNorm,
        ["enable_bias"] = EnableBias,
        ["layer_norm_elementwise_affine"] = LayerNormElementwiseAffine,
        ["activation_function"] = "relu",
        ["dropout"] = Dropout,
        ["attention_dropout"] = AttentionDropout,
        ["activation_dropout"] = ActivationDropout,
        ["layerdrop"] = LayerDrop,
        ["init_std"] = InitStd,
        ["tie_word_embeddings"] = TieWordEmbeddings,
        ["pad_token_id"] = PadTokenId,
        ["bos_token_id"] = BosTokenId,
        ["eos_token_id"] = EosTokenId,
        ["use_cache"] = true,
        ["torch_dtype"] = TorchDtype,
    };

    private static int Int(JsonObject o, string key, string source) =>
        OptInt(o, key) ?? throw new ModelConfigException($"{source}: required field '{key}' is missing");

    private static int? OptInt(JsonObject o, string key) => o[key] is JsonValue v ? (int)v.GetValue<double>() : null;

    private static double? OptDouble(JsonObject o, string key) => o[key] is JsonValue v ? v.GetValue<double>() : null;
}
