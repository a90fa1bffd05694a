using FrugalLM.Native;
using FrugalLM.Planning;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>Parameters that share a weight-decay setting.</summary>
/// <param name="Parameters">The parameters, with their names (for state files).</param>
/// <param name="WeightDecay">Decoupled weight decay applied to this group.</param>
public sealed record ParameterGroup(IReadOnlyList<(string Name, Tensor Parameter)> Parameters, double WeightDecay);

/// <summary>How AdamW stores its two moments.</summary>
public enum MomentFormat
{
    /// <summary>fp32: 8 bytes per parameter.</summary>
    Float32,

    /// <summary>bf16: 4 bytes per parameter (bf16-pure training).</summary>
    BFloat16,

    /// <summary>
    /// bitsandbytes' 8-bit AdamW: each moment block-wise quantized to one byte with bitsandbytes' dynamic map
    /// (signed for the first moment, unsigned for the second) and one fp32 absmax per
    /// <see cref="AdamW8bitLayout.BlockSize"/> values, ~2 bytes per parameter; tensors under
    /// <see cref="AdamW8bitLayout.MinTensorSize"/> elements, and embeddings (see <see cref="AdamW"/>'s
    /// <c>float32States</c>), keep fp32 moments.
    /// </summary>
    Blockwise8Bit,
}

/// <summary>
/// AdamW with PyTorch's update rule (decoupled weight decay, bias-corrected moments, eps added after the
/// square root), with the moments stored in fp32, bf16 or block-wise 8 bits. Written here rather than taken
/// from TorchSharp because sharding, offloading and 8-bit states need the moments as plain named tensors
/// that this class exposes and checkpoints. The update always runs in fp32: on the CPU by <see cref="HostAdamWKernel"/>
/// in place (<see cref="FusedCpuStep"/>), elsewhere by libtorch ops one tensor at a time, each tensor in chunks of
/// <see cref="OptimizerStepLayout.ChunkElements"/> values, so the step's temporaries stay a few MiB.
/// </summary>
public sealed class AdamW : IDisposable
{
    private readonly IReadOnlyList<ParameterGroup> groups;
    private readonly Dictionary<Tensor, Moments> state = new(ReferenceEqualityComparer.Instance);
    private readonly Func<Tensor, Tensor?> gradientOf;
    private readonly MomentFormat format;
    private readonly BlockwiseQuantizer? signedCodes;
    private readonly BlockwiseQuantizer? unsignedCodes;
    private readonly HashSet<Tensor> float32States = new(ReferenceEqualityComparer.Instance);

    /// <summary>Creates the optimizer; moments are allocated lazily at the first step.</summary>
    /// <param name="groups">The parameters it updates.</param>
    /// <param name="learningRate">Initial learning rate.</param>
    /// <param name="beta1">First-moment decay.</param>
    /// <param name="beta2">Second-moment decay.</param>
    /// <param name="eps">Added to the root of the second moment.</param>
    /// <param name="gradientOf">Where a parameter's gradient is (default: its <c>grad</c>); mixed precision
    /// points fp32 masters at their 16-bit model gradients. Gradients of any dtype are widened to fp32.</param>
    /// <param name="format">How the moments are stored.</param>
    /// <param name="float32States">With <see cref="MomentFormat.Blockwise8Bit"/>: names of parameters whose moments
    /// stay fp32 anyway. Trainers pass the embedding tables, as transformers does for bitsandbytes' 8-bit optimizers
    /// (a module override to 32-bit states for every <c>nn.Embedding</c>): rows of rare tokens get tiny, sparse
    /// gradients that a block's absmax drowns, and a tied table is also the LM head, the most sensitive matrix.</param>
    public AdamW(IReadOnlyList<ParameterGroup> groups, double learningRate, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8,
        Func<Tensor, Tensor?>? gradientOf = null, MomentFormat format = MomentFormat.Float32, IReadOnlySet<string>? float32States = null)
    {
        this.groups = groups;
        foreach (var (name, parameter) in groups.SelectMany(g => g.Parameters))
        {
            if (float32States?.Contains(name) == true)
            {
                this.float32States.Add(parameter);
            }
        }
        this.gradientOf = gradientOf ?? (p => p.grad);
        this.format = format;
        if (format == MomentFormat.Blockwise8Bit)
        {
            signedCodes = new BlockwiseQuantizer(signed: true, AdamW8bitLayout.BlockSize);
            unsignedCodes = new BlockwiseQuantizer(signed: false, AdamW8bitLayout.BlockSize);
        }
        LearningRate = learningRate;
        Beta1 = beta1;
        Beta2 = beta2;
        Eps = eps;
    }

    /// <summary>Learning rate of the next step (schedules set it before each step).</summary>
    public double LearningRate { get; set; }

    /// <summary>First-moment decay.</summary>
    public double Beta1 { get; }

    /// <summary>Second-moment decay.</summary>
    public double Beta2 { get; }

    /// <summary>Added to the root of the second moment.</summary>
    public double Eps { get; }

    /// <summary>How the moments are stored.</summary>
    public MomentFormat Format => format;

    /// <summary>Steps taken.</summary>
    public long StepCount { get; private set; }

    /// <summary>The parameter groups.</summary>
    public IReadOnlyList<ParameterGroup> Groups => groups;

    /// <summary>Bytes held by the moments (codes and scales for 8-bit ones).</summary>
    public long StateBytes => state.Values.Sum(s => s.Tensors().Sum(t => t.numel() * t.element_size()));

    /// <summary>
    /// Splits named parameters the usual way: matrices and embeddings (2+ dimensions) decay, norm weights
    /// and biases (1 dimension) do not. Parameters that do not require grad are left out.
    /// </summary>
    public static IReadOnlyList<ParameterGroup> DecayGroups(IEnumerable<(string Name, Tensor Parameter)> parameters, double weightDecay)
    {
        var trainable = parameters.Where(p => p.Parameter.requires_grad).ToList();
        return
        [
            new ParameterGroup(trainable.Where(p => p.Parameter.dim() >= 2).ToList(), weightDecay),
            new ParameterGroup(trainable.Where(p => p.Parameter.dim() < 2).ToList(), 0.0),
        ];
    }

    /// <summary>
    /// Applies one update from the parameters' current gradients (parameters without one are skipped), each
    /// multiplied by <paramref name="gradientMultiplier"/> first (loss-scale removal and clipping, fused).
    /// </summary>
    public void Step(double gradientMultiplier = 1.0)
    {
        var (correction2Sqrt, stepSize) = BeginStep();
        using var noGrad = no_grad();
        var fused = new List<HostStepTensor>();
        var fusedGradients = new List<Tensor>();
        long opsValues = 0;
        foreach (var group in groups)
        {
            foreach (var (_, parameter) in group.Parameters)
            {
                var grad = gradientOf(parameter);
                if (grad is null)
                {
                    continue;
                }
                var moments = State(parameter);
                if (FusedCpuStep && Fusable(parameter, grad, moments))
                {
                    fused.Add(FusedTensor(parameter, grad, group.WeightDecay, moments));
                    fusedGradients.Add(grad);
                    continue;
                }
                using var flatParameter = parameter.view(-1);
                using var flatGrad = grad.reshape(-1);
                long count = flatParameter.shape[0];
                opsValues += count;
                // Chunk by chunk (OptimizerStepLayout): every temporary below is one chunk's, whatever the tensor's size.
                for (long start = 0; start < count; start += OptimizerStepLayout.ChunkElements)
                {
                    using var scope = NewDisposeScope();
                    long length = Math.Min(OptimizerStepLayout.ChunkElements, count - start);
                    var p = flatParameter.narrow(0, start, length);
                    var g = flatGrad.narrow(0, start, length).to(ScalarType.Float32);
                    if (gradientMultiplier != 1.0)
                    {
                        g = g * gradientMultiplier;
                    }
                    if (group.WeightDecay != 0)
                    {
                        p.mul_(1 - LearningRate * group.WeightDecay);
                    }
                    var (expAvg, expAvgSq) = moments.Read(start, length);
                    expAvg.lerp_(g, 1 - Beta1);
                    expAvgSq.mul_(Beta2).addcmul_(g, g, 1 - Beta2);
                    var denom = expAvgSq.sqrt().div_(correction2Sqrt).add_(Eps);
                    if (p.dtype == ScalarType.Float32)
                    {
                        p.addcdiv_(expAvg, denom, -stepSize);
                    }
                    else
                    {
                        p.copy_(p.to(ScalarType.Float32).addcdiv_(expAvg, denom, -stepSize));
                    }
                    moments.Write(start, expAvg, expAvgSq);
                }
            }
        }
        LastStepValues = (fused.Sum(t => t.Count), opsValues);
        if (fused.Count > 0)
        {
            HostAdamWKernel.StepAll(new HostStepScalars(this, correction2Sqrt, stepSize, gradientMultiplier), fused, get_num_threads());
            GC.KeepAlive(fusedGradients); // the kernel read their memory through raw pointers
        }
    }

    /// <summary>
    /// Whether CPU tensors are updated by <see cref="HostAdamWKernel"/> (the default): one pass over each tensor's memory,
    /// chunks in parallel, no temporaries, the same bits as the libtorch ops below (its tests compare the two). It takes a
    /// contiguous fp32, bf16 or fp16 gradient and an fp32 parameter (or master) with fp32 or 8-bit moments, or a bf16
    /// parameter with bf16 moments (bf16-pure), on the CPU (<see cref="OptimizerStepLayout.Fused"/> is the estimator's copy
    /// of this rule). Everything else, and every tensor
    /// when this is false, goes through libtorch ops chunk by chunk. On the bundled model's bf16 step (17.3M
    /// parameters, 2 threads) the ops took 103-139 ms, the kernel 12-25 ms. <c>FRUGAL_ADAMW_LIBTORCH=1</c> makes false the
    /// default, to time the two against each other from the command line.
    /// </summary>
    public bool FusedCpuStep { get; set; } = Environment.GetEnvironmentVariable("FRUGAL_ADAMW_LIBTORCH") != "1";

    /// <summary>Values the last <see cref="Step"/> updated with the C# kernel, and with libtorch's ops.</summary>
    public (long Kernel, long LibtorchOps) LastStepValues { get; private set; }

    // fp32 values with fp32 or 8-bit moments, or (bf16-pure) bf16 values with bf16 moments.
    private static bool Fusable(Tensor parameter, Tensor grad, Moments moments) =>
        parameter.device_type == DeviceType.CPU && parameter.is_contiguous()
        && grad.device_type == DeviceType.CPU && HostAdamWKernel.DtypeOf(grad.dtype) != HostDtype.None && grad.is_contiguous()
        && grad.numel() == parameter.numel() && moments.FusableWith(parameter.dtype);

    private static unsafe HostStepTensor FusedTensor(Tensor parameter, Tensor grad, double weightDecay, Moments moments)
    {
        var t = HostStepTensor.Of(parameter, weightDecay, moments.Raw);
        t.Gradient = TensorMemory.Pointer(grad);
        t.GradientDtype = HostAdamWKernel.DtypeOf(grad.dtype);
        return t;
    }

    /// <summary>Counts a step and returns its bias corrections: sqrt(1 - beta2^t) and the step size lr / (1 - beta1^t).</summary>
    internal (double Correction2Sqrt, double StepSize) BeginStep()
    {
        StepCount++;
        double correction1 = 1 - Math.Pow(Beta1, StepCount);
        return (Math.Sqrt(1 - Math.Pow(Beta2, StepCount)), LearningRate / correction1);
    }

    /// <summary>
    /// Allocates every parameter's moments now (the first step would): the host optimizer reads their memory from
    /// other threads, where no tensor may be created.
    /// </summary>
    internal void AllocateStates()
    {
        foreach (var (_, parameter) in groups.SelectMany(g => g.Parameters))
        {
            State(parameter);
        }
    }

    /// <summary>A parameter's moments: dense fp32/bf16 tensors, or 8-bit codes with their per-block absmax scales.</summary>
    internal (Tensor ExpAvg, Tensor ExpAvgSq, Tensor? AvgScale, Tensor? AvgSqScale) MomentTensors(Tensor parameter) => State(parameter).Raw;

    /// <summary>The block-wise quantizers of 8-bit moments (null for other formats).</summary>
    internal (BlockwiseQuantizer Signed, BlockwiseQuantizer Unsigned)? Quantizers =>
        signedCodes is null ? null : (signedCodes, unsignedCodes!);

    /// <summary>The moments as named tensors (<c>exp_avg.NAME</c>, <c>exp_avg_sq.NAME</c>, and <c>.absmax</c> scales of 8-bit ones), for checkpoints.</summary>
    public IEnumerable<(string Name, Tensor Tensor)> StateTensors()
    {
        foreach (var (name, parameter) in groups.SelectMany(g => g.Parameters))
        {
            if (state.TryGetValue(parameter, out var s))
            {
                foreach (var named in s.Named(name))
                {
                    yield return named;
                }
            }
        }
    }

    /// <summary>Restores moments written by <see cref="StateTensors"/> and the step count; each tensor <paramref name="read"/> returns is disposed after it is copied.</summary>
    public void LoadState(Func<string, Tensor?> read, long stepCount)
    {
        using var noGrad = no_grad();
        foreach (var (name, parameter) in groups.SelectMany(g => g.Parameters))
        {
            var s = State(parameter);
            foreach (var (key, target) in s.Named(name))
            {
                if (read(key) is Tensor saved)
                {
                    // Disposed at once: left to the GC, a resumed run's peak held a second copy of every moment.
                    using (saved)
                    {
                        target.copy_(saved);
                    }
                }
            }
        }
        StepCount = stepCount;
    }

    private Moments State(Tensor parameter)
    {
        if (!state.TryGetValue(parameter, out var s))
        {
            var storage = format switch
            {
                MomentFormat.Blockwise8Bit when parameter.numel() >= AdamW8bitLayout.MinTensorSize && !float32States.Contains(parameter) => MomentFormat.Blockwise8Bit,
                MomentFormat.BFloat16 => MomentFormat.BFloat16,
                _ => MomentFormat.Float32,
            };
            s = storage == MomentFormat.Blockwise8Bit
                ? new Moments(signedCodes!, unsignedCodes!, parameter.numel())
                : new Moments(parameter, storage == MomentFormat.BFloat16 ? ScalarType.BFloat16 : ScalarType.Float32);
            state[parameter] = s;
        }
        return s;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var s in state.Values)
        {
            foreach (var t in s.Tensors())
            {
                t.Dispose();
            }
        }
        state.Clear();
        signedCodes?.Dispose();
        unsignedCodes?.Dispose();
    }

    /// <summary>One parameter's moments, dense (fp32/bf16) or block-wise quantized.</summary>
    private sealed class Moments
    {
        private readonly Tensor expAvg;
        private readonly Tensor expAvgSq;
        private readonly Tensor? avgScale;
        private readonly Tensor? avgSqScale;
        private readonly BlockwiseQuantizer? signed;
        private readonly BlockwiseQuantizer? unsigned;

        // Dense moments outlive the step's dispose scope that first touches them.
        public Moments(Tensor parameter, ScalarType dtype)
        {
            expAvg = zeros_like(parameter, dtype: dtype).DetachFromDisposeScope();
            expAvgSq = zeros_like(parameter, dtype: dtype).DetachFromDisposeScope();
        }

        public Moments(BlockwiseQuantizer signed, BlockwiseQuantizer unsigned, long count)
        {
            this.signed = signed;
            this.unsigned = unsigned;
            (expAvg, avgScale) = signed.Allocate(count);
            (expAvgSq, avgSqScale) = unsigned.Allocate(count);
        }

        /// <summary>
        /// fp32 working copies of <paramref name="length"/> values from <paramref name="start"/> (for fp32 storage, views
        /// of the moments themselves, updated in place). 8-bit chunks start on a block edge (chunks are whole blocks).
        /// </summary>
        public (Tensor, Tensor) Read(long start, long length)
        {
            if (signed is null)
            {
                return (expAvg.view(-1).narrow(0, start, length).to(ScalarType.Float32), expAvgSq.view(-1).narrow(0, start, length).to(ScalarType.Float32));
            }
            var (codes, scales, squareCodes, squareScales) = Blocks(start, length);
            return (signed.Dequantize(codes, scales, [length]), unsigned!.Dequantize(squareCodes, squareScales, [length]));
        }

        /// <summary>Stores the chunk of <see cref="Read"/> back (a no-op for fp32 moments, already updated in place).</summary>
        public void Write(long start, Tensor avg, Tensor avgSq)
        {
            if (signed is not null)
            {
                var (codes, scales, squareCodes, squareScales) = Blocks(start, avg.shape[0]);
                signed.Quantize(avg, codes, scales);
                unsigned!.Quantize(avgSq, squareCodes, squareScales);
            }
            else if (expAvg.dtype != ScalarType.Float32)
            {
                expAvg.view(-1).narrow(0, start, avg.shape[0]).copy_(avg);
                expAvgSq.view(-1).narrow(0, start, avg.shape[0]).copy_(avgSq);
            }
        }

        // The 8-bit codes and scales of the whole blocks that hold values [start, start + length).
        private (Tensor, Tensor, Tensor, Tensor) Blocks(long start, long length)
        {
            int block = signed!.BlockSize;
            long padded = Math.Min((length + block - 1) / block * block, expAvg.shape[0] - start);
            return (expAvg.narrow(0, start, padded), avgScale!.narrow(0, start / block, padded / block),
                expAvgSq.narrow(0, start, padded), avgSqScale!.narrow(0, start / block, padded / block));
        }

        public (Tensor, Tensor, Tensor?, Tensor?) Raw => (expAvg, expAvgSq, avgScale, avgSqScale);

        /// <summary>Whether <see cref="HostAdamWKernel"/> steps a parameter of <paramref name="parameterType"/> with these
        /// moments: fp32 values with 8-bit codes or dense fp32 moments, bf16 values with dense bf16 moments; on the CPU.</summary>
        public bool FusableWith(ScalarType parameterType) => expAvg.device_type == DeviceType.CPU && parameterType switch
        {
            ScalarType.Float32 => signed is not null || (expAvg.dtype == ScalarType.Float32 && Contiguous),
            ScalarType.BFloat16 => signed is null && expAvg.dtype == ScalarType.BFloat16 && Contiguous,
            _ => false,
        };

        private bool Contiguous => expAvg.is_contiguous() && expAvgSq.is_contiguous();

        public IEnumerable<Tensor> Tensors() => new[] { expAvg, expAvgSq, avgScale, avgSqScale }.OfType<Tensor>();

        public IEnumerable<(string, Tensor)> Named(string name)
        {
            yield return ("exp_avg." + name, expAvg);
            yield return ("exp_avg_sq." + name, expAvgSq);
            if (avgScale is not null)
            {
                yield return ("exp_avg." + name + ".absmax", avgScale);
                yield return ("exp_avg_sq." + name + ".absmax", avgSqScale!);
            }
        }
    }
}
