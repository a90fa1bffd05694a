using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace FrugalLM.Planning;

/// <summary>The decoder layouts the estimator knows.</summary>
public enum ModelFamily
{
    /// <summary>LLaMA / Mistral: pre-RMSNorm, rotary positions, SwiGLU MLP (gate, up, down), no biases by default.</summary>
    Llama,

    /// <summary>Meta OPT: LayerNorm with bias, learned positions, ReLU MLP (fc1, fc2), biases on every linear.</summary>
    Opt,
}

/// <summary>How positions enter the model.</summary>
public enum PositionKind
{
    /// <summary>Rotary embeddings: no parameters.</summary>
    Rotary,

    /// <summary>A learned table added to the token embeddings.</summary>
    Learned,
}

/// <summary>What a parameter tensor is, which decides how it is stored, quantized and trained.</summary>
public enum TensorRole
{
    /// <summary>The token embedding table (also the LM head when tied).</summary>
    Embedding,

    /// <summary>A learned position table.</summary>
    PositionEmbedding,

    /// <summary>A projection between embedding width and hidden width outside the decoder layers.</summary>
    Projection,

    /// <summary>The weight of a linear layer inside a decoder layer: the only tensors int8/NF4 quantize.</summary>
    LayerLinearWeight,

    /// <summary>The bias of a linear layer inside a decoder layer.</summary>
    LayerLinearBias,

    /// <summary>A norm's weight or bias inside a decoder layer.</summary>
    LayerNorm,

    /// <summary>The final norm's weight or bias.</summary>
    FinalNorm,

    /// <summary>The untied LM head.</summary>
    LmHead,

    /// <summary>A LoRA down-projection A (rank x in).</summary>
    LoraA,

    /// <summary>A LoRA up-projection B (out x rank).</summary>
    LoraB,
}

/// <summary>One linear layer of a decoder layer, named as in the HF checkpoint (q_proj, fc1, ...).</summary>
/// <param name="Name">HF module name, the name LoRA targets use.</param>
/// <param name="InFeatures">Input width.</param>
/// <param name="OutFeatures">Output width (rows of the weight).</param>
/// <param name="HasBias">Whether the layer has a bias vector.</param>
public sealed record LinearShape(string Name, int InFeatures, int OutFeatures, bool HasBias)
{
    /// <summary>Elements of the weight matrix.</summary>
    public long WeightCount => (long)InFeatures * OutFeatures;

    /// <summary>Weight plus bias elements.</summary>
    public long ParameterCount => WeightCount + (HasBias ? OutFeatures : 0);
}

/// <summary>One parameter tensor of a model (or of its LoRA adapters).</summary>
/// <param name="Name">A readable name (HF style).</param>
/// <param name="Count">Elements.</param>
/// <param name="Role">What the tensor is.</param>
/// <param name="Layer">Decoder layer index, or -1 outside the layers.</param>
/// <param name="Module">The linear module it belongs to (q_proj, ...) or null.</param>
/// <param name="Rows">Output rows of a linear weight (int8 keeps one scale per row); 0 otherwise.</param>
public sealed record ParameterTensor(string Name, long Count, TensorRole Role, int Layer, string? Module, int Rows);

/// <summary>
/// An architecture-generic description of a decoder-only language model: every parameter tensor's shape and the
/// widths the activation formulas need. Built from a LLaMA/Mistral <see cref="LlamaConfig"/> or an
/// <see cref="OptConfig"/>; the estimator reads only this.
/// </summary>
public sealed record ModelSpec
{
    /// <summary>A short name for tables (preset name or folder name).</summary>
    public required string Name { get; init; }

    /// <summary>The layer layout.</summary>
    public required ModelFamily Family { get; init; }

    /// <summary>Vocabulary rows of the embedding and the LM head.</summary>
    public required int VocabSize { get; init; }

    /// <summary>Width of the residual stream.</summary>
    public required int HiddenSize { get; init; }

    /// <summary>Width of the embedding table (OPT's word_embed_proj_dim; the hidden size otherwise).</summary>
    public required int EmbeddingDim { get; init; }

    /// <summary>Width of the MLP's hidden activation (LLaMA intermediate_size, OPT ffn_dim).</summary>
    public required int IntermediateSize { get; init; }

    /// <summary>Decoder layers.</summary>
    public required int NumHiddenLayers { get; init; }

    /// <summary>Query heads.</summary>
    public required int NumAttentionHeads { get; init; }

    /// <summary>Key/value heads (fewer than query heads under grouped-query attention).</summary>
    public required int NumKeyValueHeads { get; init; }

    /// <summary>Width of one head.</summary>
    public required int HeadDim { get; init; }

    /// <summary>The context the model was trained for.</summary>
    public required int MaxPositionEmbeddings { get; init; }

    /// <summary>Rotary or learned positions.</summary>
    public required PositionKind Position { get; init; }

    /// <summary>Rows of the learned position table (OPT: max_position_embeddings + 2); 0 for rotary.</summary>
    public int PositionTableRows { get; init; }

    /// <summary>True for RMSNorm (weight only), false for LayerNorm (which also subtracts the mean).</summary>
    public required bool RmsNorm { get; init; }

    /// <summary>Elements of one norm's parameters (RMSNorm: hidden; LayerNorm: 2 x hidden; 0 if not affine).</summary>
    public required int NormParameterCount { get; init; }

    /// <summary>Whether the decoder ends with a norm before the LM head.</summary>
    public required bool HasFinalNorm { get; init; }

    /// <summary>The LM head is the embedding matrix (no separate parameters).</summary>
    public required bool TieWordEmbeddings { get; init; }

    /// <summary>Dropout on the residual branches while training (OPT 0.1; LLaMA 0).</summary>
    public double ResidualDropout { get; init; }

    /// <summary>Mistral's sliding attention window, or null for global attention.</summary>
    public int? SlidingWindow { get; init; }

    /// <summary>The linear layers of one decoder layer, in forward order.</summary>
    public required IReadOnlyList<LinearShape> LayerLinears { get; init; }

    /// <summary>The LLaMA configuration this spec came from (what the runtime builds), or null for other families.</summary>
    public LlamaConfig? Llama { get; init; }

    /// <summary>The OPT configuration this spec came from (what the runtime builds), or null for other families.</summary>
    public OptConfig? Opt { get; init; }

    /// <summary>Query width: heads x head_dim.</summary>
    public int AttentionDim => NumAttentionHeads * HeadDim;

    /// <summary>Key (or value) width: key/value heads x head_dim.</summary>
    public int KeyValueDim => NumKeyValueHeads * HeadDim;

    /// <summary>Parameters of one decoder layer: its linears and its two norms.</summary>
    public long LayerParameterCount => LayerLinears.Sum(l => l.ParameterCount) + 2L * NormParameterCount;

    /// <summary>Parameters of the token embedding.</summary>
    public long EmbeddingParameterCount => (long)VocabSize * EmbeddingDim;

    /// <summary>Parameters of the learned position table (0 for rotary).</summary>
    public long PositionParameterCount => (long)PositionTableRows * HiddenSize;

    /// <summary>Parameters of the embedding-to-hidden projections (OPT when word_embed_proj_dim differs).</summary>
    public long ProjectionParameterCount => EmbeddingDim == HiddenSize ? 0 : 2L * EmbeddingDim * HiddenSize;

    /// <summary>Parameters of the LM head counted on their own (0 when tied to the embedding).</summary>
    public long LmHeadParameterCount => TieWordEmbeddings ? 0 : (long)VocabSize * EmbeddingDim;

    /// <summary>Parameters of the final norm.</summary>
    public long FinalNormParameterCount => HasFinalNorm ? NormParameterCount : 0;

    /// <summary>Every parameter, a tied LM head counted once.</summary>
    public long ParameterCount =>
        EmbeddingParameterCount + PositionParameterCount + ProjectionParameterCount
        + NumHiddenLayers * LayerParameterCount + FinalNormParameterCount + LmHeadParameterCount;

    /// <summary>Names of the linear modules in a decoder layer (what <c>all-linear</c> LoRA targets).</summary>
    public IReadOnlyList<string> LinearNames => LayerLinears.Select(l => l.Name).ToArray();

    /// <summary>Every parameter tensor, layer by layer, a tied LM head listed once (as the embedding).</summary>
    public IEnumerable<ParameterTensor> Tensors()
    {
        yield return new("embed_tokens.weight", EmbeddingParameterCount, TensorRole.Embedding, -1, null, 0);
        if (PositionParameterCount > 0)
        {
            yield return new("embed_positions.weight", PositionParameterCount, TensorRole.PositionEmbedding, -1, null, 0);
        }
        if (ProjectionParameterCount > 0)
        {
            yield return new("project_in.weight", (long)EmbeddingDim * HiddenSize, TensorRole.Projection, -1, null, 0);
            yield return new("project_out.weight", (long)EmbeddingDim * HiddenSize, TensorRole.Projection, -1, null, 0);
        }
        for (int layer = 0; layer < NumHiddenLayers; layer++)
        {
            foreach (var linear in LayerLinears)
            {
                yield return new($"layers.{layer}.{linear.Name}.weight", linear.WeightCount, TensorRole.LayerLinearWeight,
                    layer, linear.Name, linear.OutFeatures);
                if (linear.HasBias)
                {
                    yield return new($"layers.{layer}.{linear.Name}.bias", linear.OutFeatures, TensorRole.LayerLinearBias,
                        layer, linear.Name, 0);
                }
            }
            if (NormParameterCount > 0)
            {
                yield return new($"layers.{layer}.norm1", NormParameterCount, TensorRole.LayerNorm, layer, null, 0);
                yield return new($"layers.{layer}.norm2", NormParameterCount, TensorRole.LayerNorm, layer, null, 0);
            }
        }
        if (FinalNormParameterCount > 0)
        {
            yield return new("norm", FinalNormParameterCount, TensorRole.FinalNorm, -1, null, 0);
        }
        if (LmHeadParameterCount > 0)
        {
            yield return new("lm_head.weight", LmHeadParameterCount, TensorRole.LmHead, -1, null, 0);
        }
    }

    /// <summary>Builds the spec of a LLaMA or Mistral model.</summary>
    public static ModelSpec FromLlama(LlamaConfig config, string name)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate(name);
        int h = config.HiddenSize, q = config.NumAttentionHeads * config.HeadDim, kv = config.NumKeyValueHeads * config.HeadDim;
        int i = config.IntermediateSize;
        bool ab = config.AttentionBias, mb = config.MlpBias;
        return new ModelSpec
        {
            Name = name,
            Family = ModelFamily.Llama,
            VocabSize = config.VocabSize,
            HiddenSize = h,
            EmbeddingDim = h,
            IntermediateSize = i,
            NumHiddenLayers = config.NumHiddenLayers,
            NumAttentionHeads = config.NumAttentionHeads,
            NumKeyValueHeads = config.NumKeyValueHeads,
            HeadDim = config.HeadDim,
            MaxPositionEmbeddings = config.MaxPositionEmbeddings,
            Position = PositionKind.Rotary,
            RmsNorm = true,
            NormParameterCount = h,
            HasFinalNorm = true,
            TieWordEmbeddings = config.TieWordEmbeddings,
            SlidingWindow = config.SlidingWindow,
            LayerLinears =
            [
                new("q_proj", h, q, ab), new("k_proj", h, kv, ab), new("v_proj", h, kv, ab), new("o_proj", q, h, ab),
                new("gate_proj", h, i, mb), new("up_proj", h, i, mb), new("down_proj", i, h, mb),
            ],
            Llama = config,
        };
    }

    /// <summary>Builds the spec of an OPT model.</summary>
    public static ModelSpec FromOpt(OptConfig config, string name)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate(name);
        int h = config.HiddenSize, f = config.FfnDim;
        bool b = config.EnableBias;
        return new ModelSpec
        {
            Name = name,
            Family = ModelFamily.Opt,
            VocabSize = config.VocabSize,
            HiddenSize = h,
            EmbeddingDim = config.WordEmbedProjDim,
            IntermediateSize = f,
            NumHiddenLayers = config.NumHiddenLayers,
            NumAttentionHeads = config.NumAttentionHeads,
            NumKeyValueHeads = config.NumAttentionHeads,
            HeadDim = h / config.NumAttentionHeads,
            MaxPositionEmbeddings = config.MaxPositionEmbeddings,
            Position = PositionKind.Learned,
            // OPTLearnedPositionalEmbedding adds 2 rows: positions are offset by 2 (a fairseq padding convention).
            PositionTableRows = config.MaxPositionEmbeddings + 2,
            RmsNorm = false,
            NormParameterCount = config.LayerNormElementwiseAffine ? 2 * h : 0,
            HasFinalNorm = config.DoLayerNormBefore && !config.RemoveFinalLayerNorm,
            TieWordEmbeddings = config.TieWordEmbeddings,
            ResidualDropout = config.Dropout,
            LayerLinears =
            [
                new("q_proj", h, h, b), new("k_proj", h, h, b), new("v_proj", h, h, b), new("out_proj", h, h, b),
                new("fc1", h, f, b), new("fc2", f, h, b),
            ],
            Opt = config,
        };
    }

    /// <summary>
    /// Reads a model folder (or a config.json path) of any supported family: llama, mistral or opt.
    /// </summary>
    /// <exception cref="ModelConfigException">Missing, malformed or unsupported configuration.</exception>
    public static ModelSpec Load(string path)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, "config.json") : path;
        if (!File.Exists(file))
        {
            throw new ModelConfigException($"{file}: no config.json found");
        }
        var name = Directory.Exists(path)
            ? Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(path)))
            : Path.GetFileName(Path.GetDirectoryName(Path.GetFullPath(file))) ?? "model";
        return Parse(File.ReadAllText(file), name, file);
    }

    /// <summary>Parses a config.json of any supported family; <paramref name="source"/> names it in errors.</summary>
    public static ModelSpec Parse(string json, string name, string source = "config.json")
    {
        string? modelType;
        try
        {
            modelType = (JsonNode.Parse(json) as JsonObject)?["model_type"]?.GetValue<string>();
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            throw new ModelConfigException($"{source}: not valid JSON ({e.Message})");
        }
        return modelType switch
        {
            "opt" => FromOpt(OptConfig.Parse(json, source), name),
            "llama" or "mistral" => FromLlama(LlamaConfig.Parse(json, source), name),
            _ => throw new ModelConfigException(
                $"{source}: model_type '{modelType ?? "(missing)"}' is not one the estimator knows (llama, mistral, opt)"),
        };
    }

    /// <summary>A one-line description for tables.</summary>
    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"{Name} ({Family}, {NumHiddenLayers} layers, d={HiddenSize}, ffn={IntermediateSize}, heads {NumAttentionHeads}/{NumKeyValueHeads}, vocab {VocabSize}, {ParameterCount:N0} parameters)");
}
