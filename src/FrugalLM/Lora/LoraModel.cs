using System.Globalization;
using FrugalLM.Models;
using FrugalLM.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Lora;

/// <summary>
/// LoRA on a model. <see cref="Apply"/> puts adapters on its linear layers, as PEFT's
/// <c>get_peft_model</c> / <c>add_adapter</c> do: each targeted layer is replaced (at the same path) by a
/// <see cref="LoraLinear"/> wrapping it, every base parameter is frozen, and only the active adapter's A and
/// B (plus biases, if the config says so) require gradients. An instance is a view of the adapters on a
/// model (from <see cref="Apply"/>, <see cref="Of"/> or <see cref="LoraAdapter.Load"/>): which adapters exist
/// and where, which one is active, and the operations that act on all wrapped layers at once: switch,
/// disable, merge, remove. The state lives in the model's <see cref="LoraLinear"/> layers, so any number of
/// views of one model agree.
/// </summary>
public sealed class LoraModel
{
    /// <summary>PEFT's name for the first adapter.</summary>
    public const string DefaultAdapter = "default";

    /// <summary>The output head's path, which <c>all-linear</c> leaves out (PEFT skips the output embeddings).</summary>
    public const string OutputHeadPath = "lm_head";

    internal LoraModel(nn.Module model)
    {
        Model = model;
    }

    /// <summary>
    /// Adds adapter <paramref name="adapterName"/> to the layers <paramref name="config"/> targets. The model's
    /// first adapter becomes active; a later one is added inactive (PEFT's <c>add_adapter</c>): call
    /// <see cref="SetActive"/>. Layers that already carry adapters get one more. Everything is checked before
    /// the model is touched, so a failed call leaves it as it was.
    /// </summary>
    /// <param name="model">The model (e.g. a <c>LlamaForCausalLM</c>); changed in place.</param>
    /// <param name="config">The adapter's settings.</param>
    /// <param name="adapterName">The adapter's name (no dots).</param>
    /// <param name="seed">Seed for the A matrices' initialization; null draws from the global generator.</param>
    /// <returns>A view of the model's adapters.</returns>
    /// <exception cref="ArgumentException">
    /// The config is invalid, the name is taken, a target matches no linear layer (the message lists the
    /// model's linear layers), or a rank does not fit its layer.
    /// </exception>
    public static LoraModel Apply(nn.Module model, LoraConfig config, string adapterName = DefaultAdapter, long? seed = null) =>
        LoraPlanner.Add(model, config, adapterName, seed, strictTargets: true);

    /// <summary>The adapters on <paramref name="model"/> (a view that may list none).</summary>
    public static LoraModel Of(nn.Module model) => new(model);

    /// <summary>The model the adapters are on.</summary>
    public nn.Module Model { get; }

    /// <summary>Every wrapped layer with its path, in module order.</summary>
    public IReadOnlyList<(string Path, LoraLinear Layer)> Layers => LoraPlanner.Wrapped(Model);

    /// <summary>The adapters' names, in the order they were added.</summary>
    public IReadOnlyList<string> Adapters => Layers.SelectMany(l => l.Layer.Adapters).Distinct(StringComparer.Ordinal).ToList();

    /// <summary>The active adapter, or null when none is (or the model has none).</summary>
    public string? ActiveAdapter => Layers.Select(l => l.Layer.ActiveAdapter).FirstOrDefault();

    /// <summary>False when the adapters are disabled (the model runs as its base).</summary>
    public bool Enabled => Layers.All(l => l.Layer.Enabled);

    /// <summary>True when the active adapter is merged into the base weights.</summary>
    public bool Merged => Layers.Any(l => l.Layer.MergedAdapter is not null);

    /// <summary>The settings adapter <paramref name="adapter"/> was created with.</summary>
    public LoraConfig Config(string adapter) =>
        LayersOf(adapter).Select(l => l.Layer.ConfigOf(adapter)).FirstOrDefault(c => c is not null)
        ?? throw new ArgumentException($"adapter '{adapter}' was not created by LoraModel.Apply or LoraAdapter.Load, so it has no config", nameof(adapter));

    /// <summary>The layers that carry adapter <paramref name="adapter"/>, with their paths.</summary>
    public IReadOnlyList<(string Path, LoraLinear Layer)> LayersOf(string adapter)
    {
        var layers = Layers.Where(l => l.Layer.Adapters.Contains(adapter)).ToList();
        return layers.Count > 0 ? layers
            : throw new ArgumentException($"the model has no LoRA adapter named '{adapter}' (it has: {Describe(Adapters)})", nameof(adapter));
    }

    /// <summary>Parameters that require gradients now (the active adapter's, plus trainable biases).</summary>
    public long TrainableParameters => Model.parameters().Where(p => p.requires_grad).Sum(p => p.numel());

    /// <summary>All parameters of the model, adapters included.</summary>
    public long TotalParameters => Model.parameters().Sum(p => p.numel());

    /// <summary>The A and B elements of adapter <paramref name="adapter"/>.</summary>
    public long AdapterParameters(string adapter) =>
        LayersOf(adapter).Sum(l => l.Layer.LoraA(adapter).numel() + l.Layer.LoraB(adapter).numel());

    /// <summary>
    /// Makes <paramref name="adapter"/> the one the forward pass adds (and the only one that trains; a merged
    /// adapter is unmerged first). Layers without it run as their base.
    /// </summary>
    /// <exception cref="NotSupportedException">Another adapter is merged into an int8 base (see <see cref="Merge"/>).</exception>
    public void SetActive(string adapter)
    {
        LayersOf(adapter);
        if (adapter != ActiveAdapter)
        {
            RequireReversibleMerge($"switch to adapter '{adapter}'");
        }
        foreach (var (_, layer) in Layers)
        {
            layer.SetActive(adapter);
        }
        RefreshTrainable();
    }

    /// <summary>Runs the model as its base alone (unmerging first, if merged), e.g. to compare before/after.</summary>
    /// <exception cref="NotSupportedException">The adapter is merged into an int8 base (see <see cref="Merge"/>).</exception>
    public void Disable()
    {
        RequireReversibleMerge("disable the adapters");
        foreach (var (_, layer) in Layers)
        {
            layer.Enabled = false;
        }
    }

    /// <summary>Adds the active adapter again after <see cref="Disable"/>.</summary>
    public void Enable()
    {
        foreach (var (_, layer) in Layers)
        {
            layer.Enabled = true;
        }
    }

    /// <summary>Adds another adapter (see <see cref="Apply"/>); it starts inactive.</summary>
    public LoraModel AddAdapter(string adapter, LoraConfig config, long? seed = null) => Apply(Model, config, adapter, seed);

    /// <summary>
    /// Removes adapter <paramref name="adapter"/> and frees its weights; layers left without adapters are
    /// unwrapped (their base goes back in place). If it was active, no adapter is active afterwards.
    /// </summary>
    /// <exception cref="NotSupportedException">It is merged into an int8 base (see <see cref="Merge"/>).</exception>
    public void RemoveAdapter(string adapter)
    {
        if (adapter == ActiveAdapter)
        {
            RequireReversibleMerge($"remove adapter '{adapter}'");
        }
        foreach (var (path, layer) in LayersOf(adapter))
        {
            layer.RemoveAdapter(adapter);
            if (layer.Adapters.Count == 0)
            {
                Unwrap(path, layer);
            }
        }
        foreach (var (_, layer) in Layers)
        {
            if (layer.ActiveAdapter == adapter)
            {
                layer.SetActive(null);
            }
        }
        RefreshTrainable();
    }

    /// <summary>
    /// Merges the active adapter into the base weights (W += B·A·scale) so generation runs at base speed. A
    /// float base takes the sum exactly and <see cref="Unmerge"/> restores W to within fp32 rounding. An int8
    /// base (<see cref="Int8Linear"/>) is dequantized, summed in fp32 and requantized per row: the result
    /// differs from the exact sum by int8 rounding, reported per layer, and cannot be unmerged.
    /// </summary>
    /// <returns>The layers merged and the requantization error of each int8 one.</returns>
    /// <exception cref="InvalidOperationException">No adapter is active, or adapters are disabled.</exception>
    /// <exception cref="NotSupportedException">A wrapped base is neither a float linear nor an <see cref="Int8Linear"/>.</exception>
    public LoraMergeReport Merge()
    {
        var active = ActiveAdapter ?? throw new InvalidOperationException("no LoRA adapter is active: nothing to merge");
        if (!Enabled)
        {
            throw new InvalidOperationException("LoRA adapters are disabled: enable them before merging");
        }
        var layers = LayersOf(active);
        foreach (var (path, layer) in layers)
        {
            if (layer.BaseLayer is not (Linear or Int8Linear))
            {
                throw new NotSupportedException($"cannot merge adapter '{active}' into '{path}': its base is a {layer.BaseLayer.GetType().Name}, neither a float Linear nor an Int8Linear; keep the adapter unmerged, or dequantize the base first");
            }
        }
        int merged = 0;
        var requantized = new List<RequantizedLayer>();
        foreach (var (path, layer) in layers)
        {
            if (layer.MergedAdapter is not null)
            {
                continue;
            }
            if (layer.Merge() is { } error)
            {
                requantized.Add(new RequantizedLayer(path, error));
            }
            merged += layer.MergedAdapter is null ? 0 : 1;
        }
        return new LoraMergeReport(active, merged, requantized);
    }

    /// <summary>Subtracts a merged adapter from the base weights again.</summary>
    /// <exception cref="NotSupportedException">It was merged into an int8 base (see <see cref="Merge"/>); nothing is changed.</exception>
    public void Unmerge()
    {
        RequireReversibleMerge("unmerge");
        foreach (var (_, layer) in Layers)
        {
            layer.Unmerge();
        }
    }

    /// <summary>
    /// Merges the active adapter into the base weights and removes every adapter, leaving a plain model whose
    /// parameter names are the base's HF keys again (what <c>frugal merge</c> saves). Base parameters stay
    /// frozen, as after PEFT's <c>merge_and_unload</c>. An int8 base stays int8 (requantized, see <see cref="Merge"/>).
    /// </summary>
    /// <returns>What <see cref="Merge"/> reported.</returns>
    public LoraMergeReport MergeAndUnload()
    {
        var report = Merge();
        foreach (var (path, layer) in Layers)
        {
            Unwrap(path, layer);
        }
        return report;
    }

    /// <summary>Removes every adapter without merging (unmerging first), restoring the base model.</summary>
    /// <exception cref="NotSupportedException">The adapter is merged into an int8 base (see <see cref="Merge"/>).</exception>
    public void Unload()
    {
        Unmerge();
        foreach (var (path, layer) in Layers)
        {
            Unwrap(path, layer);
        }
    }

    /// <summary>A one-line summary: adapters, wrapped layers, trainable parameters.</summary>
    public override string ToString()
    {
        var adapters = Adapters;
        if (adapters.Count == 0)
        {
            return "no LoRA adapters";
        }
        long trainable = TrainableParameters, total = TotalParameters;
        var parts = adapters.Select(a =>
        {
            var layers = LayersOf(a);
            var names = layers.Select(l => l.Path[(l.Path.LastIndexOf('.') + 1)..]).Distinct(StringComparer.Ordinal);
            return $"'{a}'{(a == ActiveAdapter ? " (active)" : "")}: {layers.Count} layers ({string.Join(", ", names)})";
        });
        return string.Create(CultureInfo.InvariantCulture,
            $"LoRA {string.Join("; ", parts)}; {trainable:N0} of {total:N0} parameters trainable ({100.0 * trainable / Math.Max(1, total):F2}%)");
    }

    /// <summary>
    /// Freezes everything except the active adapter's A and B and, per its config's bias setting, biases
    /// (PEFT's <c>_mark_only_adapters_as_trainable</c>).
    /// </summary>
    internal void RefreshTrainable()
    {
        var layers = Layers;
        var active = layers.Select(l => l.Layer.ActiveAdapter).FirstOrDefault();
        var carrying = active is null ? [] : layers.Where(l => l.Layer.Adapters.Contains(active)).ToList();
        var bias = carrying.Select(l => l.Layer.ConfigOf(active!)?.Bias).FirstOrDefault(b => b is not null) ?? LoraBias.None;
        foreach (var (name, parameter) in Model.named_parameters())
        {
            parameter.requires_grad = bias == LoraBias.All && IsBias(name);
        }
        foreach (var (_, layer) in carrying)
        {
            layer.LoraA(active!).requires_grad = true;
            layer.LoraB(active!).requires_grad = true;
            if (bias == LoraBias.LoraOnly && layer.BaseLayer is Linear { bias: Parameter b })
            {
                b.requires_grad = true;
            }
        }
    }

    internal static bool IsBias(string name) => name == "bias" || name.EndsWith(".bias", StringComparison.Ordinal);

    // A merge into an int8 base cannot be undone; operations that would unmerge check every layer first, so
    // none of them fails halfway with some layers unmerged and others not.
    private void RequireReversibleMerge(string action)
    {
        var (path, layer) = Layers.FirstOrDefault(l => l.Layer.MergedIrreversibly);
        if (layer is not null)
        {
            throw new NotSupportedException($"cannot {action} at '{path}': {LoraLinear.IrreversibleMessage(layer.MergedAdapter!)}");
        }
    }

    private void Unwrap(string path, LoraLinear layer) => ModuleTree.Replace(Model, path, layer.Release());

    private static string Describe(IReadOnlyList<string> adapters) => adapters.Count == 0 ? "none" : string.Join(", ", adapters);
}
