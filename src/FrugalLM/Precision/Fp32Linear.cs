using FrugalLM.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Precision;

/// <summary>
/// A linear layer kept in fp32 inside a 16-bit model (the LM head under <see cref="Fp32NormsAndHead"/>): a 16-bit
/// input is widened, the product runs in fp32 and the output stays fp32, so the logits reach the loss without
/// a 16-bit rounding (PEFT's <c>CastOutputToFloat</c> on an fp32 head). The widened input exists only during the
/// product when the weight is frozen: autograd keeps it for the weight's gradient alone. Parameters keep the names
/// <c>weight</c> and <c>bias</c>, so checkpoints are unchanged.
/// </summary>
public sealed class Fp32Linear : nn.Module<Tensor, Tensor>, ILinearLayer
{
#pragma warning disable IDE1006 // HF parameter names
    private readonly Parameter weight;
    private readonly Parameter? bias;
#pragma warning restore IDE1006

    /// <summary>Takes over <paramref name="linear"/>'s parameters, converted to fp32 where they are not.</summary>
    public Fp32Linear(Linear linear) : base(nameof(Fp32Linear))
    {
        ArgumentNullException.ThrowIfNull(linear);
        using var noGrad = no_grad();
        weight = Widen(linear.weight!);
        bias = linear.bias is null ? null : Widen(linear.bias);
        RegisterComponents();
    }

    /// <summary>The weight [out, in], fp32.</summary>
    public Parameter Weight => weight;

    /// <summary>The bias [out], fp32, or null.</summary>
    public Parameter? Bias => bias;

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
        return nn.functional.linear(input.to(ScalarType.Float32), weight, bias).MoveToOuterDisposeScope();
    }

    // A new parameter object either way (sharing the storage when already fp32), as UpcastLinear does: the replaced
    // Linear keeps its own.
    private static Parameter Widen(Parameter p) => new(p.to(ScalarType.Float32), p.requires_grad);
}
