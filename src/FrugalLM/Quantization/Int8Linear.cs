using FrugalLM.Models;
using FrugalLM.Native;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Quantization;

/// <summary>
/// A frozen linear layer y = x Wᵀ + b computed the LLM.int8() way (Dettmers et al. 2022; bitsandbytes'
/// <c>Linear8bitLt</c> / <c>MatMul8bitLt</c>):
/// <list type="bullet">
/// <item>W is stored as int8 <c>weight</c> [out, in] with one float32 absmax per output row, <c>SCB</c> [out]:
/// weight = round(W·127 / SCB) (the layout transformers writes for bitsandbytes 8-bit checkpoints).</item>
/// <item>Each call finds the outlier input features, the columns of X [tokens, in] where some |x| ≥
/// <see cref="Threshold"/>, and multiplies them in float32 against the same columns of the dequantized
/// weight, W[:, cols] = weight[:, cols]·SCB / 127.</item>
/// <item>The other columns are quantized per token (row) with their own absmax s_i, multiplied exactly as
/// int8 x int8 → int32 by <see cref="Int8Gemm"/> and dequantized by the outer product s_i·SCB_j / 127².</item>
/// <item>The parts are added, then the bias. Threshold 0 turns the split off (plain vector-wise int8).</item>
/// </list>
/// One deliberate difference from bitsandbytes: a token's absmax is taken over the columns that stay in the
/// int8 product only, where bitsandbytes also counts the sub-threshold entries of outlier columns that it
/// then zeroes; this can only make the int8 part more precise.
/// Gradients flow to the input through the dequantized weight (see <see cref="InputGradient"/>) so adapters
/// such as LoRA train on top; the weight itself never receives one.
/// </summary>
public sealed class Int8Linear : nn.Module<Tensor, Tensor>, ILinearLayer
{
    private const string WeightName = "weight";
    private const string ScaleName = "SCB";
    private const string BiasName = "bias";
    private const string FormatName = "weight_format";

    /// <summary>Wraps already-quantized parts; the module takes ownership of the tensors.</summary>
    /// <param name="weight">int8 [out, in].</param>
    /// <param name="scb">float32 [out]: the absmax of each row of the original weight.</param>
    /// <param name="bias">[out] or null; kept in its dtype, frozen unless its requires_grad is set.</param>
    /// <param name="threshold">Outlier threshold on |x|; 0 disables the split.</param>
    public Int8Linear(Tensor weight, Tensor scb, Tensor? bias, double threshold) : base(nameof(Int8Linear))
    {
        ArgumentNullException.ThrowIfNull(weight);
        ArgumentNullException.ThrowIfNull(scb);
        if (weight.ndim != 2 || weight.dtype != ScalarType.Int8)
        {
            throw new ArgumentException($"weight must be int8 [out, in], got {weight.dtype} [{string.Join(", ", weight.shape)}]", nameof(weight));
        }
        if (scb.ndim != 1 || scb.shape[0] != weight.shape[0] || scb.dtype != ScalarType.Float32)
        {
            throw new ArgumentException($"SCB must be float32 [{weight.shape[0]}], got {scb.dtype} [{string.Join(", ", scb.shape)}]", nameof(scb));
        }
        if (bias is not null && (bias.ndim != 1 || bias.shape[0] != weight.shape[0] || !bias.is_floating_point()))
        {
            throw new ArgumentException($"bias must be a floating-point [{weight.shape[0]}] tensor", nameof(bias));
        }
        if (!(threshold >= 0) || double.IsInfinity(threshold))
        {
            throw new ArgumentOutOfRangeException(nameof(threshold), threshold, "the outlier threshold must be finite and ≥ 0");
        }
        if (weight.shape[1] > Int8Gemm.MaxInnerDimension)
        {
            throw new ArgumentException($"{weight.shape[1]} input features exceed the int8 kernel's {Int8Gemm.MaxInnerDimension}", nameof(weight));
        }
        Threshold = threshold;
        // A module owns its tensors for its whole life: no dispose scope of the caller may free them.
        register_buffer(WeightName, Contiguous(weight).DetachFromDisposeScope());
        register_buffer(ScaleName, Contiguous(scb).DetachFromDisposeScope());
        // bitsandbytes writes weight_format = 0 (row-major) beside SCB; kept so saved folders match its layout.
        register_buffer(FormatName, zeros([], dtype: ScalarType.Byte).DetachFromDisposeScope());
        if (bias is not null)
        {
            var parameter = bias as Parameter ?? new Parameter(Contiguous(bias), requires_grad: false);
            register_parameter(BiasName, (Parameter)parameter.DetachFromDisposeScope());
        }
    }

    /// <summary>The int8 weight [out, in] (bitsandbytes' <c>CB</c>, saved as <c>weight</c>).</summary>
    public Tensor Weight => get_buffer(WeightName) ?? throw new InvalidOperationException("weight buffer missing");

    /// <summary>float32 [out]: absmax of each original weight row (bitsandbytes' <c>SCB</c>).</summary>
    public Tensor Scb => get_buffer(ScaleName) ?? throw new InvalidOperationException("SCB buffer missing");

    /// <summary>The bias, or null.</summary>
    public Parameter? Bias => get_parameter(BiasName);

    /// <summary>Outlier threshold on |x| (6.0 in LLM.int8()); 0 means no outlier split.</summary>
    public double Threshold { get; }

    /// <inheritdoc />
    public long InFeatures => Weight.shape[1];

    /// <inheritdoc />
    public long OutFeatures => Weight.shape[0];

    /// <summary>
    /// Quantizes a linear layer's weight row-wise (weight = round(W·127 / absmax_row), half to even; a row of
    /// zeros gets SCB 0) and copies its bias. The linear layer is left as it was.
    /// </summary>
    public static Int8Linear FromLinear(Linear linear, double threshold = 6.0)
    {
        ArgumentNullException.ThrowIfNull(linear);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (cb, scb) = QuantizeRows(linear.weight!);
        var bias = linear.bias is { } b ? b.detach().clone() : null;
        return new Int8Linear(cb, scb, bias, threshold);
    }

    /// <summary>
    /// Quantizes a float weight [out, in] into this layer's int8 weight and SCB (quantize-on-load: the float
    /// weight is read one tensor at a time and never kept).
    /// </summary>
    public void LoadFloatWeight(Tensor weight)
    {
        if (!weight.shape.SequenceEqual(Weight.shape))
        {
            throw new ArgumentException($"weight [{string.Join(", ", weight.shape)}] does not fit this layer's [{string.Join(", ", Weight.shape)}]", nameof(weight));
        }
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (cb, scb) = QuantizeRows(weight);
        Weight.copy_(cb);
        Scb.copy_(scb);
    }

    /// <summary>
    /// Quantizes a float weight [out, in] row-wise into <paramref name="int8Weight"/> (int8 [out, in]) and
    /// <paramref name="scb"/> (fp32 [out]) exactly as <see cref="LoadFloatWeight"/> does, for buffers that no layer
    /// holds yet (disk offload quantizes the next layer while the current one runs).
    /// </summary>
    public static void QuantizeInto(Tensor weight, Tensor int8Weight, Tensor scb)
    {
        ArgumentNullException.ThrowIfNull(weight);
        ArgumentNullException.ThrowIfNull(int8Weight);
        ArgumentNullException.ThrowIfNull(scb);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (cb, rows) = QuantizeRows(weight);
        int8Weight.copy_(cb);
        scb.copy_(rows);
    }

    /// <summary>
    /// Runs this layer's code once on a tiny layer (quantizing a float weight, the forward in fp32 and bf16 with an
    /// outlier feature, and the backward to the input), so the JIT-compiled kernels and their thread pool belong
    /// to the runtime baseline a memory report measures, as <see cref="TorchRuntime.WarmUpKernels"/> does for
    /// libtorch's kernels.
    /// </summary>
    public static void WarmUp()
    {
        using var scope = NewDisposeScope();
        using var grad = enable_grad();
        using var layer = new Int8Linear(empty(64, 64, dtype: ScalarType.Int8), empty(64), null, threshold: 6.0);
        layer.LoadFloatWeight(randn(64, 64));
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            var x = randn(4, 64).index_put_(tensor(20f), TensorIndex.Colon, TensorIndex.Single(3)).to(dtype).requires_grad_(true);
            layer.forward(x).to(ScalarType.Float32).sum().backward();
        }
    }

    /// <summary>
    /// W ← quantize(dequantize(W) + <paramref name="delta"/>): adds a float update [out, in] (a merged LoRA
    /// adapter's B·A·scale) to this layer's weight in float32 and requantizes the sum row-wise exactly as
    /// <see cref="FromLinear"/> does, replacing <see cref="Weight"/> and <see cref="Scb"/> in place. The int8
    /// format cannot hold the sum exactly and keeps nothing of the old weight, so the change cannot be undone
    /// exactly; the error it introduced is returned.
    /// </summary>
    /// <param name="delta">The update [out, in], any floating dtype (added in float32).</param>
    /// <returns>
    /// The requantization's relative Frobenius error ||dequantize(new) − (W + delta)|| / ||W + delta||, with W
    /// the dequantized weight before the call (0 when the sum is all zeros).
    /// </returns>
    public double AddToWeight(Tensor delta)
    {
        ArgumentNullException.ThrowIfNull(delta);
        if (!delta.shape.SequenceEqual(Weight.shape) || !delta.is_floating_point())
        {
            throw new ArgumentException($"the update must be a floating-point [{string.Join(", ", Weight.shape)}] tensor, got {delta.dtype} [{string.Join(", ", delta.shape)}]", nameof(delta));
        }
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var sum = DequantizedWeight(ScalarType.Float32).add_(delta.to(ScalarType.Float32, Weight.device));
        var (cb, scb) = QuantizeRows(sum);
        Weight.copy_(cb);
        Scb.copy_(scb);
        // The two operands lie within half a quantization step (~1/254 of the row's absmax) of each other, so
        // their float32 difference is accurate to ~1e-5 of itself: no float64 copy of the layer is needed.
        double norm = sum.norm().item<float>();
        double error = DequantizedWeight(ScalarType.Float32).sub_(sum).norm().item<float>();
        return norm > 0 ? error / norm : 0;
    }

    // Row-wise absmax quantization (bitsandbytes' CB and SCB): CB = round(W * 127 / absmax(row)).
    private static (Tensor Cb, Tensor Scb) QuantizeRows(Tensor weight)
    {
        var w = weight.detach().to(ScalarType.Float32);
        var scb = w.abs().amax([1L]);
        var safe = scb.where(scb.gt(0), ones_like(scb));
        var cb = (w * (127.0 / safe).unsqueeze(1)).round_().clamp_(-127, 127).to(ScalarType.Int8);
        return (cb, scb);
    }

    /// <inheritdoc />
    public Tensor DequantizedWeight(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = Weight.to(ScalarType.Float32).mul_(ColumnFactors().unsqueeze(1));
        return w.to(dtype).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The run-time quantization of <paramref name="input"/> [..., in] that <see cref="forward"/> performs:
    /// int8 rows (zeros in outlier columns), each row's absmax, and the outlier columns.
    /// </summary>
    public Int8Activations QuantizeActivations(Tensor input)
    {
        using var scope = NewDisposeScope();
        var x = Flatten(input);
        var (q, absMax, outliers) = Quantize(x, TorchRuntime.Threads);
        return new Int8Activations(q.MoveToOuterDisposeScope(), absMax.MoveToOuterDisposeScope(), tensor(outliers).MoveToOuterDisposeScope());
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor input)
    {
        ArgumentNullException.ThrowIfNull(input);
        if (input.shape.Length == 0 || input.shape[^1] != InFeatures)
        {
            throw new ArgumentException($"expected [..., {InFeatures}] input, got [{string.Join(", ", input.shape)}]", nameof(input));
        }
        var bias = Bias;
        bool gradEnabled = is_grad_enabled();
        bool trainBias = gradEnabled && bias is not null && bias.requires_grad;
        if (!(gradEnabled && input.requires_grad))
        {
            using var scope = NewDisposeScope();
            var y = Compute(input, fuseBias: !trainBias);
            return (trainBias ? y + bias!.to(y.dtype) : y).MoveToOuterDisposeScope();
        }
        var output = Int8LinearFunction.apply(input, this, !trainBias);
        return trainBias ? output + bias!.to(output.dtype) : output;
    }

    /// <summary>
    /// Module.to(dtype) converts every floating-point tensor; SCB stays float32 whatever the compute dtype
    /// (as in bitsandbytes), because a bfloat16 scale would shift every dequantized row by up to 0.4 %.
    /// The int8 weight is never converted; the bias follows the dtype.
    /// </summary>
    protected override void _toEpilog(ScalarType? dtype, Device? device, bool non_blocking)
    {
        var scb = dtype is null ? null : Scb.clone().DetachFromDisposeScope();
        base._toEpilog(dtype, device, non_blocking);
        if (scb is not null)
        {
            var converted = Scb;
            var restored = scb.to(ScalarType.Float32, converted.device);
            if (!ReferenceEquals(restored, scb))
            {
                scb.Dispose();
            }
            ConditionallyRegisterBuffer(ScaleName, restored.DetachFromDisposeScope(), true);
            converted.Dispose();
        }
    }

    /// <summary>
    /// ∂L/∂x = ∂L/∂y · W for the dequantized W [out, in], in float32, a block of weight rows at a time so
    /// that at most ~16 MiB of dequantized weight exists at once (never a full float copy of W).
    /// </summary>
    public Tensor InputGradient(Tensor gradOutput)
    {
        ArgumentNullException.ThrowIfNull(gradOutput);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long n = OutFeatures, k = InFeatures;
        var g = gradOutput.reshape(-1, n).to(ScalarType.Float32);
        var grad = zeros(g.shape[0], k, ScalarType.Float32);
        var factors = ColumnFactors();
        var weight = Weight;
        long rows = Math.Max(1, (4L << 20) / Math.Max(1, k));
        for (long start = 0; start < n; start += rows)
        {
            using var block = NewDisposeScope();
            long size = Math.Min(rows, n - start);
            var w = weight.narrow(0, start, size).to(ScalarType.Float32).mul_(factors.narrow(0, start, size).unsqueeze(1));
            grad.addmm_(g.narrow(1, start, size), w);
        }
        var shape = gradOutput.shape.ToArray();
        shape[^1] = k;
        return grad.view(shape).MoveToOuterDisposeScope();
    }

    /// <summary>y in the input's dtype, without autograd.</summary>
    private unsafe Tensor Compute(Tensor input, bool fuseBias)
    {
        using var scope = NewDisposeScope();
        int threads = TorchRuntime.Threads;
        var x = Flatten(input);
        int m = (int)x.shape[0], k = (int)InFeatures, n = (int)OutFeatures;
        if (Weight.dtype != ScalarType.Int8 || !Weight.is_contiguous())
        {
            throw new InvalidOperationException($"the weight must stay a contiguous int8 tensor, not {Weight.dtype}");
        }
        var (q, absMax, outliers) = Quantize(x, threads);
        var rowFactors = absMax.div_(127f);
        var columnFactors = ColumnFactors();
        var bias = fuseBias && Bias is { } b ? b.detach().to(ScalarType.Float32).contiguous() : null;
        var y = empty(m, n, ScalarType.Float32);
        var output = new GemmOutput(
            (int*)TensorMemory.Pointer(y),
            (float*)TensorMemory.Pointer(rowFactors),
            (float*)TensorMemory.Pointer(columnFactors),
            bias is null ? null : (float*)TensorMemory.Pointer(bias));
        Int8Gemm.Run((sbyte*)TensorMemory.Pointer(q), m, k, (sbyte*)TensorMemory.Pointer(Weight), n, output, threads, Int8Kernel.Auto);
        if (outliers.Length > 0)
        {
            // The outlier features in float32 against the matching dequantized weight columns.
            var columns = tensor(outliers);
            var xo = x.index_select(1, columns).to(ScalarType.Float32);
            var wo = Weight.index_select(1, columns).to(ScalarType.Float32).mul_(columnFactors.unsqueeze(1));
            y.addmm_(xo, wo.t());
        }
        var shape = input.shape.ToArray();
        shape[^1] = n;
        return y.view(shape).to(input.dtype).MoveToOuterDisposeScope();
    }

    private static Tensor Contiguous(Tensor t) => t.is_contiguous() ? t : t.contiguous();

    /// <summary>X as a contiguous [tokens, in] float32 or bfloat16 matrix (other dtypes become float32).</summary>
    private Tensor Flatten(Tensor input)
    {
        var x = input.detach().reshape(-1, InFeatures);
        if (x.device_type != DeviceType.CPU)
        {
            throw new ArgumentException("Int8Linear runs on the CPU", nameof(input));
        }
        if (x.dtype is not (ScalarType.Float32 or ScalarType.BFloat16))
        {
            x = x.to(ScalarType.Float32);
        }
        if (x.shape[0] > int.MaxValue)
        {
            throw new ArgumentException("too many tokens for one call", nameof(input));
        }
        return x.contiguous();
    }

    private unsafe (Tensor Q, Tensor AbsMax, long[] Outliers) Quantize(Tensor x, int threads)
    {
        int m = (int)x.shape[0], k = (int)x.shape[1];
        void* data = TensorMemory.Pointer(x);
        float threshold = (float)Threshold;
        bool bf16 = x.dtype == ScalarType.BFloat16;
        long[] outliers = threshold <= 0f ? []
            : bf16 ? ActivationQuantizer.OutlierColumns<BFloat16Row>(data, m, k, threshold)
            : ActivationQuantizer.OutlierColumns<Float32Row>(data, m, k, threshold);
        var q = empty(m, k, ScalarType.Int8);
        var absMax = empty(m, ScalarType.Float32);
        var qp = (sbyte*)TensorMemory.Pointer(q);
        var ap = (float*)TensorMemory.Pointer(absMax);
        if (bf16)
        {
            ActivationQuantizer.Quantize<BFloat16Row>(data, m, k, outliers, qp, ap, threads);
        }
        else
        {
            ActivationQuantizer.Quantize<Float32Row>(data, m, k, outliers, qp, ap, threads);
        }
        return (q, absMax, outliers);
    }

    /// <summary>SCB / 127 as float32: the dequantization factor of each weight row.</summary>
    private Tensor ColumnFactors() => Scb.to(ScalarType.Float32).div(127f).contiguous();

    /// <summary>
    /// The autograd node of a call whose input needs a gradient: the forward is the int8 computation, the
    /// backward <see cref="InputGradient"/>. A custom function rather than differentiable torch ops: those
    /// would either need a float copy of W in the graph or a second float matmul in every forward.
    /// </summary>
    private sealed class Int8LinearFunction : autograd.SingleTensorFunction<Int8LinearFunction>
    {
        public override string Name => nameof(Int8LinearFunction);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var input = (Tensor)vars[0];
            var layer = (Int8Linear)vars[1];
            ctx.save_data("layer", layer);
            ctx.save_data("dtype", input.dtype);
            return layer.Compute(input, fuseBias: (bool)vars[2]);
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            var layer = (Int8Linear)ctx.get_data("layer");
            var dtype = (ScalarType)ctx.get_data("dtype");
            var grad = layer.InputGradient(gradOutput);
            if (grad.dtype != dtype)
            {
                using var float32 = grad;
                grad = float32.to(dtype);
            }
            return AutogradHandles.EndBackward(gradOutput, [grad, null!, null!]);
        }
    }
}

/// <summary>Activations [tokens, in] as <see cref="Int8Linear"/> quantizes them for its int8 product.</summary>
/// <param name="Values">int8 [tokens, in]: round(x·127 / AbsMax[row]), 0 in outlier columns.</param>
/// <param name="AbsMax">float32 [tokens]: each row's absmax over the non-outlier columns.</param>
/// <param name="OutlierColumns">int64: ascending input features kept in float32.</param>
public sealed record Int8Activations(Tensor Values, Tensor AbsMax, Tensor OutlierColumns) : IDisposable
{
    /// <inheritdoc />
    public void Dispose()
    {
        Values.Dispose();
        AbsMax.Dispose();
        OutlierColumns.Dispose();
    }
}
