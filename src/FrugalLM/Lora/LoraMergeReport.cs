namespace FrugalLM.Lora;

/// <summary>
/// What <see cref="LoraModel.Merge"/> did: the adapter, how many layers took it, and, for each layer whose base
/// is quantized (an int8 base is dequantized, summed and requantized), the error the requantization introduced.
/// A float base takes the sum exactly (to fp32 rounding) and is not listed.
/// </summary>
/// <param name="Adapter">The merged adapter.</param>
/// <param name="Layers">Layers the adapter was merged into by this call.</param>
/// <param name="Requantized">The requantized layers with their errors, in module order.</param>
public sealed record LoraMergeReport(string Adapter, int Layers, IReadOnlyList<RequantizedLayer> Requantized)
{
    /// <summary>The largest relative error over <see cref="Requantized"/> (0 when nothing was requantized).</summary>
    public double MaxRelativeError => Requantized.Count == 0 ? 0 : Requantized.Max(r => r.RelativeError);

    /// <summary>The mean relative error over <see cref="Requantized"/> (0 when nothing was requantized).</summary>
    public double MeanRelativeError => Requantized.Count == 0 ? 0 : Requantized.Average(r => r.RelativeError);
}

/// <summary>A quantized layer that a merge requantized.</summary>
/// <param name="Path">The layer's module path (its HF name, e.g. <c>model.layers.0.self_attn.q_proj</c>).</param>
/// <param name="RelativeError">
/// ||dequantize(requantize(W')) − W'||_F / ||W'||_F for the merged float weight W' = dequantize(W) + B·A·scale.
/// </param>
public sealed record RequantizedLayer(string Path, double RelativeError);
