using System.Text.Json.Nodes;
using FrugalLM.Planning;
using FrugalLM.Precision;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>The decoder stack: token embedding, decoder layers, final norm (HF <c>LlamaModel</c>).</summary>
public sealed class LlamaModel : nn.Module<Tensor, KvCache?, Tensor>
{
    private readonly LlamaConfig config;
    private readonly float[] inverseFrequencies;

    [ComponentName(Name = "embed_tokens")]
    private TokenEmbedding embedTokens;

    [ComponentName(Name = "layers")]
    private ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> layers;

    [ComponentName(Name = "norm")]
    private nn.Module<Tensor, Tensor> norm;

    /// <summary>Creates the stack with uninitialized weights in <paramref name="dtype"/>.</summary>
    public LlamaModel(LlamaConfig config, ScalarType dtype) : base(nameof(LlamaModel))
    {
        this.config = config;
        inverseFrequencies = Rotary.InverseFrequencies(config);
        embedTokens = new TokenEmbedding(config.VocabSize, config.HiddenSize, dtype);
        layers = nn.ModuleList(Enumerable.Range(0, config.NumHiddenLayers)
            .Select(i => (nn.Module<Tensor, DecoderContext, Tensor>)new LlamaDecoderLayer(config, i, dtype)).ToArray());
        norm = new RmsNorm(config.HiddenSize, config.RmsNormEps, dtype);
        RegisterComponents();
    }

    /// <summary>The token embedding (also the LM head when embeddings are tied).</summary>
    public TokenEmbedding EmbedTokens => embedTokens;

    /// <summary>The decoder layers; techniques may replace entries with wrappers.</summary>
    public ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> Layers => layers;

    /// <summary>Runs the stack on token ids [batch, T]; returns final hidden states [batch, T, hidden].</summary>
    public override Tensor forward(Tensor inputIds, KvCache? cache)
    {
        using var scope = NewDisposeScope();
        long t = inputIds.shape[1];
        long past = cache?.Length ?? 0;
        var hidden = Native.MemoryTrace.MarkInBackward(embedTokens.forward(inputIds), "bwd-embed");
        var (cos, sin) = Rotary.Tables(tensor(inverseFrequencies), past, t);
        var context = new DecoderContext
        {
            Cos = cos.to(hidden.dtype),
            Sin = sin.to(hidden.dtype),
            Cache = cache,
            PastLength = past,
            AttentionMask = NeedsMask(past, t) ? Mask(past, t) : null,
        };
        foreach (var layer in layers)
        {
            hidden = DecoderStack.RunLayer(layer, hidden, context);
        }
        cache?.Advance((int)t);
        return Native.MemoryTrace.MarkInBackward(norm.forward(hidden), "bwd-head").MoveToOuterDisposeScope();
    }

    private bool NeedsMask(long past, long t) =>
        (past > 0 && t > 1) || (config.SlidingWindow is int window && past + t > window);

    // Query i (absolute position past + i) may see key j when j <= past + i and, with Mistral's sliding
    // window, when j > past + i - window.
    private Tensor Mask(long past, long t)
    {
        var query = arange(past, past + t, dtype: ScalarType.Int64).unsqueeze(1);
        var key = arange(0, past + t, dtype: ScalarType.Int64).unsqueeze(0);
        var mask = key <= query;
        if (config.SlidingWindow is int window)
        {
            mask = mask & (key > query - window);
        }
        return mask;
    }
}

/// <summary>
/// A LLaMA-family causal language model (HF <c>LlamaForCausalLM</c>). Parameter names are exactly the
/// Hugging Face keys (<c>model.layers.0.self_attn.q_proj.weight</c>, <c>lm_head.weight</c>, ...), so a
/// checkpoint's state dict maps onto it one to one. With tied embeddings there is no <c>lm_head</c>
/// parameter: the head multiplies by the embedding table, as transformers saves such models.
/// </summary>
public sealed class LlamaForCausalLM : CausalLM
{
    [ComponentName(Name = "model")]
    private LlamaModel model;

    [ComponentName(Name = "lm_head")]
    private nn.Module<Tensor, Tensor>? lmHead;

    /// <summary>Creates the model with uninitialized weights (load them, or call <see cref="InitializeWeights"/>).</summary>
    public LlamaForCausalLM(LlamaConfig config, ScalarType dtype = ScalarType.Float32) : base(nameof(LlamaForCausalLM))
    {
        config.Validate();
        Config = config;
        model = new LlamaModel(config, dtype);
        lmHead = config.TieWordEmbeddings ? null : LinearFactory.Create(config.HiddenSize, config.VocabSize, false, dtype);
        RegisterComponents();
    }

    /// <summary>The architecture.</summary>
    public LlamaConfig Config { get; }

    /// <inheritdoc />
    public override ScalarType Dtype => model.EmbedTokens.Weight.dtype;

    /// <inheritdoc />
    public override int VocabSize => Config.VocabSize;

    /// <inheritdoc />
    public override int MaxPositions => Config.MaxPositionEmbeddings;

    /// <inheritdoc />
    public override ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> DecoderLayers => model.Layers;

    /// <inheritdoc />
    public override string DecoderLayersPath => "model.layers";

    /// <inheritdoc />
    public override ModelSpec Spec(string name) => ModelSpec.FromLlama(Config, name);

    /// <inheritdoc />
    public override KvCache CreateCache(int batch, int capacity) =>
        new(Config.NumHiddenLayers, batch, Config.NumKeyValueHeads, capacity, Config.HeadDim, Dtype);

    /// <inheritdoc />
    public override JsonObject ConfigJson(string torchDtype) => (Config with { TorchDtype = torchDtype }).ToJson();

    /// <inheritdoc />
    public override Tensor? HeadWeight => lmHead switch
    {
        null => model.EmbedTokens.Weight,
        Linear linear when linear.bias is null => linear.weight,
        Fp32Linear wide when wide.Bias is null => wide.Weight,
        _ => null,
    };

    /// <summary>The decoder stack.</summary>
    public LlamaModel Model => model;

    /// <inheritdoc />
    public override Tensor Hidden(Tensor inputIds, KvCache? cache = null) => model.forward(inputIds, cache);

    /// <inheritdoc />
    /// <remarks>A tied head is a product with the embedding table, not a Linear module that a precision policy
    /// could replace, so it takes the 16-bit product that is fast on this CPU itself.</remarks>
    public override Tensor Logits(Tensor hidden) =>
        lmHead is null ? Matmul16.Linear(hidden, model.EmbedTokens.Weight) : lmHead.forward(hidden);

    /// <summary>
    /// Random initialization for training from scratch, as transformers does it: every linear weight and the
    /// embedding ~ N(0, <paramref name="std"/>), biases zero, norm weights one.
    /// </summary>
    public override void InitializeWeights(long seed, double std = 0.02)
    {
        using var noGrad = no_grad();
        var generator = new Generator((ulong)seed);
        foreach (var (name, parameter) in named_parameters())
        {
            if (name.EndsWith("norm.weight", StringComparison.Ordinal))
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
    }
}
