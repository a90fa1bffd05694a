using System.Text.Json;
using System.Text.Json.Nodes;

namespace FrugalLM.Planning;

/// <summary>
/// The hyper-parameters of a Meta OPT model (HF <c>model_type</c> "opt"), read from a Hugging Face
/// <c>config.json</c>. Only the estimator reads it: FrugalLM's runtime runs the LLaMA layout, but the article's
/// int8 + LoRA example fine-tunes OPT-6.7B, so its memory must be describable.
/// Field meanings and defaults follow transformers' <c>OPTConfig</c>.
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
    }

    private static int Int(JsonObject o, string key, string source) =>
        OptInt(o, key) ?? throw new ModelConfigException($"{source}: required field '{key}' is missing");

    private static int? OptInt(JsonObject o, string key) => o[key] is JsonValue v ? (int)v.GetValue<double>() : null;
}
