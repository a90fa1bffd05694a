using System.Text.Json.Nodes;
using FrugalLM.Models.Llama;
using FrugalLM.Models.Opt;
using FrugalLM.Planning;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Models;

/// <summary>
/// A decoder-only causal language model as the runtime drives it, whatever its architecture (LLaMA, OPT):
/// hidden states with an optional KV cache, the LM head, the decoder layers that techniques wrap, and the
/// HF config it is saved with. Parameter names are the architecture's HF keys.
/// </summary>
public abstract class CausalLM : nn.Module<Tensor, Tensor>
{
    /// <summary>Creates the module.</summary>
    protected CausalLM(string name) : base(name)
    {
    }

    /// <summary>
    /// A new model of the architecture <paramref name="spec"/> describes (<see cref="OptForCausalLM"/> or
    /// <see cref="LlamaForCausalLM"/>), floating weights in <paramref name="dtype"/>, not yet initialized
    /// (see <see cref="InitializeWeights"/>) or loaded.
    /// </summary>
    /// <exception cref="ArgumentException">The spec carries no configuration the runtime can build.</exception>
    public static CausalLM Create(ModelSpec spec, ScalarType dtype = ScalarType.Float32)
    {
        ArgumentNullException.ThrowIfNull(spec);
        return spec switch
        {
            { Opt: { } opt } => new OptForCausalLM(opt, dtype),
            { Llama: { } llama } => new LlamaForCausalLM(llama, dtype),
            _ => throw new ArgumentException($"{spec.Name}: a {spec.Family} spec without its configuration cannot be built", nameof(spec)),
        };
    }

    /// <summary>Rows of the embedding and the LM head.</summary>
    public abstract int VocabSize { get; }

    /// <summary>The longest sequence the model's positions cover.</summary>
    public abstract int MaxPositions { get; }

    /// <summary>The dtype of the floating weights (of the token embedding; techniques may change it).</summary>
    public abstract ScalarType Dtype { get; }

    /// <summary>The decoder layers, in order; techniques may replace entries with wrappers.</summary>
    public abstract ModuleList<nn.Module<Tensor, DecoderContext, Tensor>> DecoderLayers { get; }

    /// <summary>The dotted path of <see cref="DecoderLayers"/> (<c>model.layers</c>, <c>model.decoder.layers</c>).</summary>
    public abstract string DecoderLayersPath { get; }

    /// <summary>
    /// The LM head's weight [vocab, hidden] when the head is a plain linear map (or the tied embedding) of the
    /// final hidden states, for losses that apply it chunk by chunk; null otherwise.
    /// </summary>
    public abstract Tensor? HeadWeight { get; }

    /// <summary>The architecture as the estimator and planner see it.</summary>
    public abstract ModelSpec Spec(string name);

    /// <summary>Final hidden states [batch, T, hidden] for token ids [batch, T]; appends to <paramref name="cache"/> when given.</summary>
    public abstract Tensor Hidden(Tensor inputIds, KvCache? cache = null);

    /// <summary>The LM head applied to hidden states.</summary>
    public abstract Tensor Logits(Tensor hidden);

    /// <summary>An empty KV cache for <paramref name="batch"/> sequences of up to <paramref name="capacity"/> positions.</summary>
    public abstract KvCache CreateCache(int batch, int capacity);

    /// <summary>Random initialization for training from scratch, as transformers initializes this architecture.</summary>
    public abstract void InitializeWeights(long seed, double std = 0.02);

    /// <summary>The HF <c>config.json</c> of this model, with <c>torch_dtype</c> set to <paramref name="torchDtype"/>.</summary>
    public abstract JsonObject ConfigJson(string torchDtype);

    /// <summary>Logits [batch, T, vocab] for token ids [batch, T], without a cache.</summary>
    public override Tensor forward(Tensor inputIds) => Logits(Hidden(inputIds));
}
