using FrugalLM.Native;
using FrugalLM.Planning;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Precision;

/// <summary>
/// Linear products of 16-bit tensors, computed the way this CPU computes them best. fp16 arithmetic is
/// emulated on CPUs, and so is bf16 without bf16 dot-product instructions (<see cref="CpuFeatures.NativeBFloat16"/>):
/// there the product runs in fp32 from the 16-bit operands and is rounded to their dtype once, as a GPU's
/// tensor cores do (16-bit operands, fp32 accumulation). Memory stays that of a 16-bit layer: the autograd
/// graph keeps the 16-bit input and weight, and fp32 copies exist only while one product runs.
/// </summary>
public static class Matmul16
{
    /// <summary>True when a linear product on <paramref name="dtype"/> operands is computed in fp32 here.</summary>
    public static bool Upcasts(ScalarType dtype) =>
        dtype == ScalarType.Float16 || (dtype == ScalarType.BFloat16 && !CpuFeatures.NativeBFloat16);

    /// <summary>y = x·Wᵀ + b: libtorch's own linear where it is native for the dtype, the fp32 product otherwise.</summary>
    public static Tensor Linear(Tensor input, Tensor weight, Tensor? bias = null) =>
        Upcasts(input.dtype) || Upcasts(weight.dtype) ? Upcast(input, weight, bias) : nn.functional.linear(input, weight, bias);

    /// <summary>y = x·Wᵀ + b computed in fp32, returned in <paramref name="input"/>'s dtype; differentiable in all three.</summary>
    public static Tensor Upcast(Tensor input, Tensor weight, Tensor? bias = null) =>
        bias is null ? UpcastLinearFunction.apply(input, weight) : UpcastLinearFunction.apply(input, weight, bias);

    // A custom function rather than linear(x.to(fp32), W.to(fp32)): autograd would keep those fp32 copies
    // of every input and weight until backward, twice a 16-bit layer's memory. The product is tiled over the
    // output features, so the fp32 copies of the weight, the output and its gradient exist one tile at a time
    // (a [1024, 50257] head output would otherwise have a 196 MiB fp32 twin, and its weight a 49 MiB one);
    // only the input's fp32 copy [tokens, in] and its gradient's are whole.
    private const long TileElements = UpcastLayout.TileElements;

    private static long TileWidth(long rows, long inFeatures, long outFeatures) =>
        Math.Clamp(TileElements / Math.Max(1, Math.Max(rows, inFeatures)), 1, Math.Max(1, outFeatures));

    private sealed class UpcastLinearFunction : autograd.SingleTensorFunction<UpcastLinearFunction>
    {
        public override string Name => nameof(UpcastLinearFunction);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var input = (Tensor)vars[0];
            var weight = (Tensor)vars[1];
            var bias = vars.Length > 2 ? (Tensor)vars[2] : null;
            ctx.save_for_backward([input, weight]);
            ctx.save_data("bias", bias is not null);
            ctx.save_data("input_grad", input.requires_grad);
            ctx.save_data("weight_grad", weight.requires_grad);
            ctx.save_data("bias_grad", bias?.requires_grad ?? false);
            long inFeatures = weight.shape[1], outFeatures = weight.shape[0];
            var output = empty([.. input.shape[..^1], outFeatures], dtype: input.dtype);
            using var scope = NewDisposeScope();
            var x32 = input.reshape(-1, inFeatures).to(ScalarType.Float32);
            var y = output.view(-1, outFeatures);
            long width = TileWidth(x32.shape[0], inFeatures, outFeatures);
            for (long j = 0; j < outFeatures; j += width)
            {
                using var tile = NewDisposeScope();
                long n = Math.Min(width, outFeatures - j);
                y.narrow(1, j, n).copy_(nn.functional.linear(x32, weight.narrow(0, j, n).to(ScalarType.Float32),
                    bias?.narrow(0, j, n).to(ScalarType.Float32)));
            }
            return output;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            var saved = ctx.get_saved_variables();
            var input = saved[0];
            var weight = saved[1];
            bool hasBias = (bool)ctx.get_data("bias");
            bool needInput = (bool)ctx.get_data("input_grad"), needWeight = (bool)ctx.get_data("weight_grad");
            bool needBias = hasBias && (bool)ctx.get_data("bias_grad");
            long inFeatures = weight.shape[1], outFeatures = weight.shape[0];
            Tensor? gradInput = null, gradWeight = null, gradBias = null;
            using (var scope = NewDisposeScope())
            {
                var g = gradOutput.reshape(-1, outFeatures);
                var x32 = needWeight ? input.reshape(-1, inFeatures).to(ScalarType.Float32) : null;
                var gx32 = needInput ? zeros([g.shape[0], inFeatures], dtype: ScalarType.Float32) : null;
                var gw = needWeight ? empty_like(weight) : null;
                var gb = needBias ? empty([outFeatures], dtype: weight.dtype) : null;
                long width = TileWidth(g.shape[0], inFeatures, outFeatures);
                for (long j = 0; j < outFeatures; j += width)
                {
                    using var tile = NewDisposeScope();
                    long n = Math.Min(width, outFeatures - j);
                    var g32 = g.narrow(1, j, n).to(ScalarType.Float32);
                    gx32?.addmm_(g32, weight.narrow(0, j, n).to(ScalarType.Float32));
                    gw?.narrow(0, j, n).copy_(g32.t().mm(x32!));
                    gb?.narrow(0, j, n).copy_(g32.sum(dim: 0));
                }
                gradInput = gx32?.to(input.dtype).view(input.shape).MoveToOuterDisposeScope();
                gradWeight = gw?.MoveToOuterDisposeScope();
                gradBias = gb?.MoveToOuterDisposeScope();
            }
            return AutogradHandles.EndBackward(gradOutput, hasBias ? [gradInput!, gradWeight!, gradBias!] : [gradInput!, gradWeight!]);
        }
    }
}
