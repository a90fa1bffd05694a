using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Opt;

/// <summary>
/// The OPT decoder stack (HF <c>OPTDecoder</c>): token embedding (projected in when
/// <c>word_embed_proj_dim</c> differs from the hidden size), learned positions, the layers and the final
/// LayerNorm of pre-norm models. <c>project_out</c> belongs here, as in HF, but the LM head applies it
/// (<see cref="ProjectOut"/>), so that the hidden states stay [batch, T, hidden].
/// </summary>
/// <remarks>
/// Positions are past + 0 … past + T - 1, offset by 2 into the table as transformers does for an unpadded
/// batch (an all-ones attention mask); left-padded batches with per-row positions are not supported.
/// </remarks>
public sealed class OptDecoder : nn.Module<Tensor, KvCache?, Tensor>
{
    /// <summary>OPTLearnedPositionalEmbedding's offset: position p reads row p + 2 (a fairseq padding convention).</summary>
    public const int PositionOffset = 2;

    private readonly OptConfig config;

    [ComponentName(Name = "embed_tokens")]
    private TokenEmbedding embedTokens;

    [ComponentName(Name = "embed_positions")]
    private TokenEmbedding embedPositions;

    [ComponentName(Name = "project_out")]
    private nn.Module<Tensor, Tensor>? projectOut;

    [ComponentName(Name = "project_in")]
    private nn.Module<Tensor, Tensor>? projectIn;

    [ComponentName(Name = "final_layer_norm")]
    private nn.Module<Tensor, Tensor>? finalLayerNorm;

    [ComponentName(Name = "layers")]
    private ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> layers;

    /// <summary>Creates the stack with uninitialized weights in <paramref name="dtype"/>.</summary>
    public OptDecoder(OptConfig config, ScalarType dtype) : base(nameof(OptDecoder))
    {
        this.config = config;
        embedTokens = new TokenEmbedding(config.VocabSize, config.WordEmbedProjDim, dtype);
        embedPositions = new TokenEmbedding(config.MaxPositionEmbeddings + PositionOffset, config.HiddenSize, dtype);
        if (config.WordEmbedProjDim != config.HiddenSize)
        {
            projectOut = LinearFactory.Create(config.HiddenSize, config.WordEmbedProjDim, false, dtype);
            projectIn = LinearFactory.Create(config.WordEmbedProjDim, config.HiddenSize, false, dtype);
        }
        if (config.DoLayerNormBefore && !config.RemoveFinalLayerNorm)
        {
            finalLayerNorm = OptLayers.LayerNorm(config, dtype);
        }
        layers = nn.ModuleList(Enumerable.Range(0, config.NumHiddenLayers)
            .Select(i => (nn.Module<Tensor, DecoderContext, Tensor>)new OptDecoderLayer(config, i, dtype)).ToArray());
        RegisterComponents();
    }

    /// <summary>The token embedding [vocab, word_embed_proj_dim] (also the LM head when tied).</summary>
    public TokenEmbedding EmbedTokens => embedTokens;

    /// <summary>The decoder layers; techniques may replace entries with wrappers.</summary>
    public ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> Layers => layers;

    /// <summary>Whether the final hidden states are projected to <c>word_embed_proj_dim</c> before the head.</summary>
    public bool HasProjectOut => projectOut is not null;

    /// <summary>Runs the stack on token ids [batch, T]; returns hidden states [batch, T, hidden] before <c>project_out</c>.</summary>
    public override Tensor forward(Tensor inputIds, KvCache? cache)
    {
        using var scope = NewDisposeScope();
        long t = inputIds.shape[1];
        long past = cache?.Length ?? 0;
        if (past + t > config.MaxPositionEmbeddings)
        {
            throw new ArgumentException(
                $"{past + t} positions exceed the model's max_position_embeddings ({config.MaxPositionEmbeddings})", nameof(inputIds));
        }
        if (training && config.LayerDrop > 0)
        {
            throw new NotSupportedException($"layerdrop {config.LayerDrop} is not supported in training (every released OPT has 0)");
        }
        var embeds = embedTokens.forward(inputIds);
        if (config.PadTokenId is int pad && embeds.requires_grad)
        {
            // nn.Embedding(padding_idx=pad) gives the pad row no gradient from lookups (a tied head still
            // reaches it).
            embeds = where((inputIds == pad).unsqueeze(-1), embeds.detach(), embeds);
        }
        if (projectIn is not null)
        {
            embeds = projectIn.forward(embeds);
        }
        var positions = embedPositions.forward(arange(past + PositionOffset, past + PositionOffset + t, dtype: ScalarType.Int64));
        var hidden = embeds + positions;
        var context = new DecoderContext
        {
            Cache = cache,
            PastLength = past,
            AttentionMask = past > 0 && t > 1 ? CausalMask(past, t) : null,
        };
        foreach (var layer in layers)
        {
            hidden = DecoderStack.RunLayer(layer, hidden, context);
        }
        cache?.Advance((int)t);
        if (finalLayerNorm is not null)
        {
            hidden = finalLayerNorm.forward(hidden);
        }
        return hidden.MoveToOuterDisposeScope();
    }

    /// <summary>Applies <c>project_out</c> (hidden → word_embed_proj_dim) when the model has one.</summary>
    public Tensor ProjectOut(Tensor hidden) => projectOut is null ? hidden : projectOut.forward(hidden);

    // Query i (absolute position past + i) sees keys 0 .. past + i.
    private static Tensor CausalMask(long past, long t)
    {
        var query = arange(past, past + t, dtype: ScalarType.Int64).unsqueeze(1);
        var key = arange(0, past + t, dtype: ScalarType.Int64).unsqueeze(0);
        return key <= query;
    }
}

/// <summary>HF <c>OPTModel</c>: a holder of the decoder, which gives the keys their <c>model.decoder.</c> prefix.</summary>
public sealed class OptModel : nn.Module<Tensor, KvCache?, Tensor>
{
    [ComponentName(Name = "decoder")]
    private OptDecoder decoder;

    /// <summary>Creates the decoder with uninitialized weights in <paramref name="dtype"/>.</summary>
    public OptModel(OptConfig config, ScalarType dtype) : base(nameof(OptModel))
    {
        decoder = new OptDecoder(config, dtype);
        RegisterComponents();
    }

    /// <summary>The decoder stack.</summary>
    public OptDecoder Decoder => decoder;

    /// <inheritdoc />
    public override Tensor forward(Tensor inputIds, KvCache? cache) => decoder.forward(inputIds, cache);
}
