using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>
/// RMSNorm as LLaMA uses it: the mean square is taken in fp32 whatever the input dtype, the normalised
/// value is cast back to the input dtype, then scaled by the weight (TorchSharp has no RMSNorm module).
/// A weight kept wider than the input (fp32 norms in a 16-bit model, <see cref="FrugalLM.Precision.Fp32NormsAndHead"/>)
/// scales the fp32 value and the product is rounded once; the output always has the input's dtype, so the
/// layers after the norm keep computing at the model's precision.
/// </summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    private readonly double eps;
#pragma warning disable IDE1006 // HF parameter name
    private readonly Parameter weight;
#pragma warning restore IDE1006

    /// <summary>Creates the norm with a weight of ones.</summary>
    public RmsNorm(long size, double eps, ScalarType dtype) : base(nameof(RmsNorm))
    {
        this.eps = eps;
        weight = new Parameter(ones(size, dtype));
        RegisterComponents();
    }

    /// <summary>The scale.</summary>
    public Parameter Weight => weight;

    /// <inheritdoc />
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = input.to(ScalarType.Float32);
        var normalized = x * (x.pow(2).mean([-1L], keepdim: true) + eps).rsqrt();
        // Same dtypes: HF's order (round, then scale). Otherwise type promotion would hand fp32 to the next layer.
        var scaled = weight.dtype == input.dtype
            ? weight * normalized.to(input.dtype)
            : (weight.to(ScalarType.Float32) * normalized).to(input.dtype);
        return scaled.MoveToOuterDisposeScope();
    }
}

/// <summary>A token embedding table with a single <c>weight</c> parameter, as in HF checkpoints.</summary>
/// <remarks>nn.Embedding always allocates and initializes a full fp32 table first; this one does not.</remarks>
public sealed class TokenEmbedding : nn.Module<Tensor, Tensor>
{
#pragma warning disable IDE1006 // HF parameter name
    private readonly Parameter weight;
#pragma warning restore IDE1006

    /// <summary>Creates an uninitialized table.</summary>
    public TokenEmbedding(long vocab, long size, ScalarType dtype) : base(nameof(TokenEmbedding))
    {
        weight = new Parameter(empty(vocab, size, dtype));
        RegisterComponents();
    }

    /// <summary>The table [vocab, hidden].</summary>
    public Parameter Weight => weight;

    /// <inheritdoc />
    public override Tensor forward(Tensor ids)
    {
        var shape = ids.shape.Append(weight.shape[1]).ToArray();
        return weight.index_select(0, ids.reshape(-1)).view(shape);
    }
}

/// <summary>Factory for the plain linear layers of a LLaMA model.</summary>
internal static class LinearFactory
{
    /// <summary>A linear layer with uninitialized weight [out, in] (and bias) in <paramref name="dtype"/>.</summary>
    public static Linear Create(long inFeatures, long outFeatures, bool bias, ScalarType dtype) =>
        nn.Linear(
            new Parameter(empty(outFeatures, inFeatures, dtype)),
            bias ? new Parameter(empty(outFeatures, dtype)) : null);
}
