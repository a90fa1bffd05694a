using FrugalLM.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Precision;

/// <summary>
/// A linear layer whose weights are stored in fp16 but whose matrix product runs in fp32, rounding the
/// result back to fp16: what a GPU's fp16 tensor cores do (fp16 operands, fp32 accumulation). This CPU has
/// no fp16 arithmetic: libtorch's fp16 matmul backward is ~8x slower than fp32 here, while this layer costs
/// two conversions. Parameters keep the names <c>weight</c> and <c>bias</c>, so checkpoints are unchanged.
/// </summary>
public sealed class UpcastLinear : nn.Module<Tensor, Tensor>, ILinearLayer
{
#pragma warning disable IDE1006 // HF parameter names
    private readonly Parameter weight;
    private readonly Parameter? bias;
#pragma warning restore IDE1006

    /// <summary>Takes over <paramref name="linear"/>'s parameters, converted to <paramref name="storage"/>.</summary>
    public UpcastLinear(Linear linear, ScalarType storage) : base(nameof(UpcastLinear))
    {
        using var noGrad = no_grad();
        weight = new Parameter(linear.weight!.to(storage), linear.weight!.requires_grad);
        bias = linear.bias is null ? null : new Parameter(linear.bias.to(storage), linear.bias.requires_grad);
        RegisterComponents();
    }

    /// <inheritdoc />
    public long InFeatures => weight.shape[1];

    /// <inheritdoc />
    public long OutFeatures => weight.shape[0];

    /// <inheritdoc />
    public Tensor DequantizedWeight(ScalarType dtype) => weight.detach().to(dtype);

    /// <inheritdoc />
    public override Tensor forward(Tensor input)
    {
        using var scope = NewDisposeScope();
        var y = nn.functional.linear(input.to(ScalarType.Float32), weight.to(ScalarType.Float32), bias?.to(ScalarType.Float32));
        return y.to(input.dtype).MoveToOuterDisposeScope();
    }
}
