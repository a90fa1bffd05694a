using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Models;

/// <summary>
/// A module computing y = x Wᵀ (+ b) with W of shape [out, in] that is not a plain <see cref="Linear"/>
/// (an int8 or other quantized replacement, a wrapper). Techniques that wrap linear layers (LoRA) accept
/// anything for which <see cref="LinearLayers.Describe"/> succeeds.
/// </summary>
public interface ILinearLayer
{
    /// <summary>Input features.</summary>
    long InFeatures { get; }

    /// <summary>Output features.</summary>
    long OutFeatures { get; }

    /// <summary>W [out, in] in <paramref name="dtype"/> (dequantized where stored otherwise); a new tensor.</summary>
    Tensor DequantizedWeight(ScalarType dtype);
}

/// <summary>Shape queries over the linear-like modules of a model.</summary>
public static class LinearLayers
{
    /// <summary>(in, out) features of a linear-like module, or null when it is not one.</summary>
    public static (long In, long Out)? Describe(nn.Module module) => module switch
    {
        Linear linear => (linear.in_features, linear.out_features),
        ILinearLayer layer => (layer.InFeatures, layer.OutFeatures),
        _ => null,
    };

    /// <summary>True for a plain linear layer or any <see cref="ILinearLayer"/>.</summary>
    public static bool IsLinear(nn.Module module) => Describe(module) is not null;
}
