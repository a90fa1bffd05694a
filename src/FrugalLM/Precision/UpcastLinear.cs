using FrugalLM.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Precision;

/// <summary>
/// A linear layer whose weights are stored in 16 bits (fp16, or bf16 on a CPU without bf16 dot products)
/// but whose matrix product runs in fp32, rounding the result back once: what a GPU's tensor cores do
/// (16-bit operands, fp32 accumulation; see <see cref="Matmul16"/>). CPUs have no fp16 arithmetic:
/// libtorch's fp16 matmul backward is ~8x slower than fp32, while this layer costs two conversions.
/// Parameters keep the names <c>weight</c> and <c>bias</c>, so checkpoints are unchanged.
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
    public override Tensor forward(Tensor input) => Matmul16.Upcast(input, weight, bias);
}
