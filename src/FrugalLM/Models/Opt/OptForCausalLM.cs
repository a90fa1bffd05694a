using System.Text.Json.Nodes;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Precision;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Opt;

/// <summary>
/// A Meta OPT causal language model (HF <c>OPTForCausalLM</c>): learned positions, LayerNorm, ReLU, biases.
/// Parameter names are exactly the Hugging Face keys (<c>model.decoder.embed_tokens.weight</c>,
/// <c>model.decoder.layers.0.self_attn.q_proj.bias</c>, ...). With tied embeddings (every released OPT) there
/// is no <c>lm_head</c> parameter: the head multiplies by the embedding table, as transformers saves it.
/// </summary>
public sealed class OptForCausalLM : CausalLM
{
    [ComponentName(Name = "model")]
    private OptModel model;

    [ComponentName(Name = "lm_head")]
    private nn.Module<Tensor, Tensor>? lmHead;

    /// <summary>Creates the model with uninitialized weights (load them, or call <see cref="InitializeWeights"/>).</summary>
    public OptForCausalLM(OptConfig config, ScalarType dtype = ScalarType.Float32) : base(nameof(OptForCausalLM))
    {
        config.Validate();
        Config = config;
        model = new OptModel(config, dtype);
        lmHead = config.TieWordEmbeddings ? null : LinearFactory.Create(config.WordEmbedProjDim, config.VocabSize, false, dtype);
        RegisterComponents();
    }

    /// <summary>The architecture.</summary>
    public OptConfig Config { get; }

    /// <summary>The decoder stack.</summary>
    public OptDecoder Decoder => model.Decoder;

    /// <inheritdoc />
    public override ScalarType Dtype => Decoder.EmbedTokens.Weight.dtype;

    /// <inheritdoc />
    public override int VocabSize => Config.VocabSize;

    /// <inheritdoc />
    public override int MaxPositions => Config.MaxPositionEmbeddings;

    /// <inheritdoc />
    public override ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> DecoderLayers => Decoder.Layers;

    /// <inheritdoc />
    public override string DecoderLayersPath => "model.decoder.layers";

    /// <inheritdoc />
    public override ModelSpec Spec(string name) => ModelSpec.FromOpt(Config, name);

    /// <inheritdoc />
    public override KvCache CreateCache(int batch, int capacity) =>
        new(Config.NumHiddenLayers, batch, Config.NumAttentionHeads, capacity, Config.HiddenSize / Config.NumAttentionHeads, Dtype);

    /// <inheritdoc />
    public override JsonObject ConfigJson(string torchDtype) => (Config with { TorchDtype = torchDtype }).ToJson();

    /// <inheritdoc />
    /// <remarks>Null when <c>project_out</c> stands between the hidden states and the head (the 350M shape).</remarks>
    public override Tensor? HeadWeight => Decoder.HasProjectOut ? null : lmHead switch
    {
        null => Decoder.EmbedTokens.Weight,
        Linear linear when linear.bias is null => linear.weight,
        Fp32Linear wide when wide.Bias is null => wide.Weight,
        _ => null,
    };

    /// <inheritdoc />
    public override Tensor Hidden(Tensor inputIds, KvCache? cache = null) => model.forward(inputIds, cache);

    /// <inheritdoc />
    public override Tensor Logits(Tensor hidden)
    {
        using var scope = NewDisposeScope();
        var projected = Decoder.ProjectOut(hidden);
        var logits = lmHead is null ? Matmul16.Linear(projected, Decoder.EmbedTokens.Weight) : lmHead.forward(projected);
        return logits.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Random initialization for training from scratch, as transformers' <c>OPTPreTrainedModel._init_weights</c>:
    /// linear and embedding weights ~ N(0, <paramref name="std"/>) (OPT's <c>init_std</c>), biases zero,
    /// LayerNorms weight 1 and bias 0, and the token embedding's pad row zero (it is nn.Embedding's padding_idx).
    /// </summary>
    public override void InitializeWeights(long seed, double std = 0.02)
    {
        using var noGrad = no_grad();
        var generator = new Generator((ulong)seed);
        foreach (var (name, parameter) in named_parameters())
        {
            if (name.EndsWith("layer_norm.weight", StringComparison.Ordinal))
            {
                parameter.fill_(1.0);
            }
            else if (name.EndsWith(".bias", StringComparison.Ordinal))
            {
                parameter.zero_();
            }
            else
            {
                parameter.normal_(0.0, std, generator);
            }
        }
        if (Config.PadTokenId is int pad)
        {
            Decoder.EmbedTokens.Weight[pad].zero_();
        }
    }
}
