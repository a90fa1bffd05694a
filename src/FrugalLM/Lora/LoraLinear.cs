using FrugalLM.Models;
using FrugalLM.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Lora;

/// <summary>
/// A linear-like layer with LoRA adapters: y = base(x) + B(A(dropout(x))) · scale for the active adapter,
/// computed exactly as PEFT's <c>lora.Linear</c> does. Submodules carry PEFT's names, so inside a model the
/// parameters are <c>…q_proj.base_layer.weight</c>, <c>…q_proj.lora_A.&lt;adapter&gt;.weight</c> [r, in] and
/// <c>…q_proj.lora_B.&lt;adapter&gt;.weight</c> [out, r], the keys PEFT's state dict has.
/// </summary>
/// <remarks>
/// The base is a <see cref="Linear"/> or any <see cref="ILinearLayer"/> (an int8 layer, say). Adapter weights
/// are float32 whatever the base's dtype (float64 for a float64 base), as PEFT's default
/// <c>autocast_adapter_dtype</c> leaves them; the input is cast to that dtype for the adapter path and the
/// sum cast back to the base output's dtype. Use <see cref="LoraModel.Apply"/> to wrap a model's layers.
/// </remarks>
public sealed class LoraLinear : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "base_layer")]
    private readonly nn.Module<Tensor, Tensor> baseLayer;

    [ComponentName(Name = "lora_dropout")]
    private readonly AdapterModules loraDropout;

    [ComponentName(Name = "lora_A")]
    private readonly AdapterModules loraA;

    [ComponentName(Name = "lora_B")]
    private readonly AdapterModules loraB;

    private readonly Dictionary<string, AdapterState> adapters = new(StringComparer.Ordinal);
    private bool enabled = true;

    /// <summary>Wraps <paramref name="baseLayer"/>, which must be a <see cref="Linear"/> or an <see cref="ILinearLayer"/>.</summary>
    /// <exception cref="ArgumentException">The module is not linear-like.</exception>
    public LoraLinear(nn.Module<Tensor, Tensor> baseLayer) : base(nameof(LoraLinear))
    {
        var shape = LinearLayers.Describe(baseLayer)
            ?? throw new ArgumentException($"LoRA wraps linear layers; {baseLayer.GetType().Name} is not one (neither Linear nor ILinearLayer)", nameof(baseLayer));
        if (baseLayer is LoraLinear)
        {
            throw new ArgumentException("this layer already has LoRA adapters: add another adapter to it instead of wrapping it again", nameof(baseLayer));
        }
        this.baseLayer = baseLayer;
        (InFeatures, OutFeatures) = shape;
        AdapterDtype = baseLayer is Linear { weight.dtype: ScalarType.Float64 } ? ScalarType.Float64 : ScalarType.Float32;
        AdapterDevice = baseLayer.parameters().FirstOrDefault()?.device ?? CPU;
        loraDropout = new AdapterModules();
        loraA = new AdapterModules();
        loraB = new AdapterModules();
        RegisterComponents();
    }

    /// <summary>The wrapped layer.</summary>
    public nn.Module<Tensor, Tensor> BaseLayer => baseLayer;

    /// <summary>Input features.</summary>
    public long InFeatures { get; }

    /// <summary>Output features.</summary>
    public long OutFeatures { get; }

    /// <summary>The dtype of the adapter weights (float32, or float64 over a float64 base).</summary>
    public ScalarType AdapterDtype { get; }

    /// <summary>The device of the adapter weights (the base's).</summary>
    public Device AdapterDevice { get; }

    /// <summary>The adapters this layer holds, in the order they were added.</summary>
    public IReadOnlyList<string> Adapters => loraA.Names;

    /// <summary>
    /// The adapter the forward pass adds, or null for none. It may name an adapter this layer lacks (one
    /// that targets other layers of the model): the layer then acts as its base.
    /// </summary>
    public string? ActiveAdapter { get; private set; }

    /// <summary>The adapter merged into the base weight, or null.</summary>
    public string? MergedAdapter { get; private set; }

    /// <summary>
    /// False runs the base alone (an adapter merged into it is unmerged first, as PEFT does); true adds the
    /// active adapter again.
    /// </summary>
    public bool Enabled
    {
        get => enabled;
        set
        {
            if (!value)
            {
                Unmerge();
            }
            enabled = value;
        }
    }

    /// <summary>
    /// Adds an adapter with PEFT's initialization: A Kaiming-uniform with a = √5 (uniform in ±1/√in, as
    /// nn.Linear's default), B zero, so the layer's output is unchanged until B trains.
    /// </summary>
    /// <param name="name">Adapter name (no dots; PEFT's default is "default").</param>
    /// <param name="rank">The rank r, 1 ≤ r ≤ min(in, out).</param>
    /// <param name="alpha">The scale numerator.</param>
    /// <param name="dropout">Dropout probability on the adapter's input while training.</param>
    /// <param name="useRsLora">Scale by alpha / √r instead of alpha / r.</param>
    /// <param name="generator">Random source for A; null uses the global one.</param>
    public void AddAdapter(string name, int rank, double alpha, double dropout, bool useRsLora, Generator? generator = null) =>
        AddAdapter(name, rank, alpha, dropout, useRsLora, null, generator);

    internal void AddAdapter(string name, int rank, double alpha, double dropout, bool useRsLora, LoraConfig? config, Generator? generator)
    {
        LoraPlanner.CheckAdapterName(name);
        if (adapters.ContainsKey(name))
        {
            throw new ArgumentException($"this layer already has an adapter named '{name}'", nameof(name));
        }
        if (rank < 1 || rank > Math.Min(InFeatures, OutFeatures))
        {
            throw new ArgumentException($"LoRA rank {rank} does not fit a [{OutFeatures}, {InFeatures}] layer: it must be between 1 and {Math.Min(InFeatures, OutFeatures)}", nameof(rank));
        }
        var a = empty(rank, InFeatures, AdapterDtype, AdapterDevice);
        using (no_grad())
        {
            // kaiming_uniform_(a=√5): gain √(2 / (1 + 5)), bound = √3 · gain / √fan_in = 1 / √fan_in.
            double bound = 1.0 / Math.Sqrt(InFeatures);
            a.uniform_(-bound, bound, generator);
        }
        var b = zeros(OutFeatures, rank, AdapterDtype, AdapterDevice);
        nn.Module<Tensor, Tensor> drop = dropout > 0 ? nn.Dropout(dropout) : nn.Identity();
        drop.train(training); // a new module starts in training mode; follow this layer's mode
        loraDropout.Add(name, drop);
        loraA.Add(name, nn.Linear(new Parameter(a)));
        loraB.Add(name, nn.Linear(new Parameter(b)));
        adapters[name] = new AdapterState(rank, alpha, useRsLora ? alpha / Math.Sqrt(rank) : alpha / rank, config);
    }

    /// <summary>A [r, in] of adapter <paramref name="name"/>.</summary>
    public Parameter LoraA(string name) => WeightOf(loraA[Known(name)]);

    /// <summary>B [out, r] of adapter <paramref name="name"/>.</summary>
    public Parameter LoraB(string name) => WeightOf(loraB[Known(name)]);

    // A and B are linear layers; a precision technique may have replaced them by another linear-like module
    // (fp16 storage with fp32 compute) that keeps its parameter under the same name.
    private static Parameter WeightOf(nn.Module module) =>
        module.get_parameter("weight") ?? throw new InvalidOperationException($"{module.GetType().Name} has no weight");

    /// <summary>The rank of adapter <paramref name="name"/>.</summary>
    public int Rank(string name) => adapters[Known(name)].Rank;

    /// <summary>The alpha of adapter <paramref name="name"/>.</summary>
    public double Alpha(string name) => adapters[Known(name)].Alpha;

    /// <summary>The scale (alpha / r, or alpha / √r) of adapter <paramref name="name"/>.</summary>
    public double Scaling(string name) => adapters[Known(name)].Scaling;

    internal LoraConfig? ConfigOf(string name) => adapters[Known(name)].Config;

    /// <summary>Makes <paramref name="name"/> (or none) the adapter the forward pass adds; a merged adapter is unmerged first.</summary>
    public void SetActive(string? name)
    {
        if (name != ActiveAdapter)
        {
            Unmerge();
        }
        ActiveAdapter = name;
    }

    /// <summary>Removes adapter <paramref name="name"/> (unmerging it first) and frees its weights.</summary>
    public void RemoveAdapter(string name)
    {
        Known(name);
        if (MergedAdapter == name)
        {
            Unmerge();
        }
        loraA.Remove(name);
        loraB.Remove(name);
        loraDropout.Remove(name);
        adapters.Remove(name);
    }

    /// <summary>
    /// Frees every adapter and lets go of the base (whose weight keeps a merged adapter, if any), for the
    /// caller to put back in the model; this layer is unusable afterwards.
    /// </summary>
    internal nn.Module<Tensor, Tensor> Release()
    {
        foreach (var name in Adapters)
        {
            loraA.Remove(name);
            loraB.Remove(name);
            loraDropout.Remove(name);
        }
        adapters.Clear();
        MergedAdapter = null;
        ActiveAdapter = null;
        // Unregistered, so that disposing this wrapper later cannot dispose the base with it.
        _internal_submodules.Remove("base_layer");
        return baseLayer;
    }

    /// <summary>B·A·scale [out, in] of adapter <paramref name="name"/>, in the adapter dtype (what merging adds to W).</summary>
    public Tensor DeltaWeight(string name)
    {
        using var noGrad = no_grad();
        return LoraB(name).matmul(LoraA(name)).mul_(Scaling(name));
    }

    /// <summary>
    /// Adds the active adapter's B·A·scale to the base weight, so the forward pass runs the base alone. A float
    /// <see cref="Linear"/> takes the sum in its own dtype; an <see cref="Int8Linear"/> base is dequantized,
    /// summed in float32 and requantized (<see cref="Int8Linear.AddToWeight"/>), which changes the weight by a
    /// rounding error and cannot be unmerged. Nothing happens when no adapter is active here, adapters are
    /// disabled, or one is already merged.
    /// </summary>
    /// <returns>
    /// For an int8 base, the relative error the requantization introduced (see <see cref="RequantizedLayer"/>);
    /// null when nothing was requantized (a float base, or nothing merged).
    /// </returns>
    /// <exception cref="NotSupportedException">The base is neither a float <see cref="Linear"/> nor an <see cref="Int8Linear"/>.</exception>
    public double? Merge()
    {
        if (MergedAdapter is not null || !enabled || ActiveAdapter is null || !adapters.ContainsKey(ActiveAdapter))
        {
            return null;
        }
        if (baseLayer is Int8Linear int8)
        {
            double error;
            using (var delta = DeltaWeight(ActiveAdapter))
            {
                error = int8.AddToWeight(delta);
            }
            MergedAdapter = ActiveAdapter;
            return error;
        }
        var weight = FloatWeight();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        weight.add_(DeltaWeight(ActiveAdapter));
        MergedAdapter = ActiveAdapter;
        return null;
    }

    /// <summary>True when an adapter is merged into a base that cannot take it out again exactly (int8).</summary>
    public bool MergedIrreversibly => MergedAdapter is not null && baseLayer is Int8Linear;

    /// <summary>Subtracts the merged adapter's B·A·scale from the base weight again (nothing happens when none is merged).</summary>
    /// <exception cref="NotSupportedException">
    /// The adapter was merged into an int8 base: requantizing kept nothing of the original int8 weight, and
    /// subtracting and requantizing again would not give it back (reload the base instead). The layer stays merged.
    /// </exception>
    public void Unmerge()
    {
        if (MergedAdapter is null)
        {
            return;
        }
        if (MergedIrreversibly)
        {
            throw new NotSupportedException(IrreversibleMessage(MergedAdapter));
        }
        var weight = FloatWeight();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        weight.sub_(DeltaWeight(MergedAdapter));
        MergedAdapter = null;
    }

    internal static string IrreversibleMessage(string adapter) =>
        $"adapter '{adapter}' is merged into an int8 base (Int8Linear), which was requantized and cannot be unmerged " +
        "exactly (the original int8 weight is gone): reload the base model to get it back";

    /// <inheritdoc />
    public override Tensor forward(Tensor x)
    {
        if (!enabled || MergedAdapter is not null || ActiveAdapter is null || !adapters.TryGetValue(ActiveAdapter, out var state))
        {
            return baseLayer.forward(x);
        }
        using var scope = NewDisposeScope();
        var result = baseLayer.forward(x);
        // The adapters run at their own weights' dtype (fp32 as PEFT keeps them, or a mixed-precision compute copy).
        var input = ((nn.Module<Tensor, Tensor>)loraDropout[ActiveAdapter]).forward(x.to(LoraA(ActiveAdapter).dtype));
        var a = (nn.Module<Tensor, Tensor>)loraA[ActiveAdapter];
        var b = (nn.Module<Tensor, Tensor>)loraB[ActiveAdapter];
        var update = b.forward(a.forward(input)) * state.Scaling;
        return (result + update).to(result.dtype).MoveToOuterDisposeScope();
    }

    private Parameter FloatWeight() => baseLayer switch
    {
        Linear linear when linear.weight.is_floating_point() => linear.weight,
        _ => throw new NotSupportedException(
            $"cannot merge a LoRA adapter into a {baseLayer.GetType().Name} base: merging needs a float Linear weight or an Int8Linear; " +
            "keep the adapter unmerged (it works the same), or dequantize the base to a float Linear first"),
    };

    private string Known(string name) =>
        adapters.ContainsKey(name) ? name : throw new ArgumentException($"this layer has no adapter named '{name}' (it has: {string.Join(", ", Adapters)})", nameof(name));

    private sealed record AdapterState(int Rank, double Alpha, double Scaling, LoraConfig? Config);

    /// <summary>PEFT's per-adapter ModuleDict: submodules keyed by adapter name, added and removed at any time.</summary>
    private sealed class AdapterModules : nn.Module, IModuleDictionary
    {
        public AdapterModules() : base(nameof(AdapterModules))
        {
        }

        public IReadOnlyList<string> Names => _internal_submodules.Keys.ToList();

        public nn.Module this[string name] => _internal_submodules[name];

        public void Add(string name, nn.Module module) => register_module(name, module);

        public void Remove(string name)
        {
            var module = _internal_submodules[name];
            _internal_submodules.Remove(name);
            module.Dispose();
        }
    }
}
