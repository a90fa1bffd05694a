using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Quantization;

namespace FrugalLM.Training;

/// <summary>Element type of a gradient the host step reads or of a 16-bit weight copy it writes.</summary>
internal enum HostDtype
{
    None,
    Float32,
    BFloat16,
    Float16,
}

/// <summary>
/// The scalars of one AdamW step as the in-memory <see cref="AdamW"/> hands them to libtorch: every Scalar argument of a
/// float tensor op is rounded to fp32 first, so the host kernel rounds the same doubles the same way.
/// </summary>
internal readonly struct HostStepScalars
{
    public HostStepScalars(AdamW optimizer, double correction2Sqrt, double stepSize, double multiplier)
    {
        Beta1Complement = (float)(1 - optimizer.Beta1);
        Beta2 = (float)optimizer.Beta2;
        Beta2Complement = (float)(1 - optimizer.Beta2);
        Correction2Sqrt = (float)correction2Sqrt;
        Eps = (float)optimizer.Eps;
        NegativeStepSize = (float)-stepSize;
        Multiplier = (float)multiplier;
        Multiplies = multiplier != 1.0;
        LearningRate = optimizer.LearningRate;
    }

    public float Beta1Complement { get; }

    public float Beta2 { get; }

    public float Beta2Complement { get; }

    public float Correction2Sqrt { get; }

    public float Eps { get; }

    public float NegativeStepSize { get; }

    public float Multiplier { get; }

    /// <summary>Whether gradients are multiplied (AdamW skips the multiply when the multiplier is exactly 1).</summary>
    public bool Multiplies { get; }

    public double LearningRate { get; }
}

/// <summary>The memory of one parameter's step: raw pointers into tensors that outlive the step.</summary>
internal unsafe struct HostStepTensor
{
    public float* Parameter;
    public void* Gradient;
    public HostDtype GradientDtype;

    /// <summary>fp32 accumulator of earlier micro-batches (masters under accumulation), added to the gradient; or null.</summary>
    public float* Accumulated;
    public float* ExpAvg;
    public float* ExpAvgSq;
    public byte* AvgCodes;
    public float* AvgScales;
    public byte* AvgSqCodes;
    public float* AvgSqScales;

    /// <summary>
    /// bf16-pure: the parameter and the moments are bf16 (<see cref="Parameter"/>, <see cref="ExpAvg"/> and
    /// <see cref="ExpAvgSq"/> then point at 16-bit words). Each piece is widened, updated in fp32 and rounded back, as
    /// AdamW's libtorch ops do with their fp32 working copies.
    /// </summary>
    public bool BFloat16Values;

    /// <summary>The 16-bit compute weight that receives the rounded master, or null.</summary>
    public void* Copy;
    public HostDtype CopyDtype;
    public long Count;
    public double WeightDecay;

    public readonly bool EightBit => AvgCodes != null;

    /// <summary>The parts every step has: the fp32 values updated in place, their decay, and the moments (dense fp32, or 8-bit
    /// codes with their scales) as <see cref="AdamW.MomentTensors"/> gives them; the caller adds the gradient and any copy.</summary>
    public static HostStepTensor Of(TorchSharp.torch.Tensor target, double weightDecay,
        (TorchSharp.torch.Tensor ExpAvg, TorchSharp.torch.Tensor ExpAvgSq, TorchSharp.torch.Tensor? AvgScale, TorchSharp.torch.Tensor? AvgSqScale) moments)
    {
        var t = new HostStepTensor
        {
            Parameter = (float*)TensorMemory.Pointer(target),
            Count = target.numel(),
            WeightDecay = weightDecay,
            BFloat16Values = target.dtype == TorchSharp.torch.ScalarType.BFloat16,
        };
        if (moments.AvgScale is null)
        {
            t.ExpAvg = (float*)TensorMemory.Pointer(moments.ExpAvg);
            t.ExpAvgSq = (float*)TensorMemory.Pointer(moments.ExpAvgSq);
        }
        else
        {
            t.AvgCodes = TensorMemory.Pointer(moments.ExpAvg);
            t.AvgScales = (float*)TensorMemory.Pointer(moments.AvgScale);
            t.AvgSqCodes = TensorMemory.Pointer(moments.ExpAvgSq);
            t.AvgSqScales = (float*)TensorMemory.Pointer(moments.AvgSqScale!);
        }
        return t;
    }
}

/// <summary>
/// AdamW on raw memory in vectorized C#: the update of <see cref="AdamW.Step"/> written out element by element with the
/// same fp32 operations in the same order as the libtorch kernels it calls (lerp as a fused multiply-add, addcmul and
/// addcdiv unfused, division by the bias correction), so both give the same bits. 8-bit moments are decoded block by
/// block (<see cref="AdamW8bitLayout.BlockSize"/>) into two stack buffers, updated, and encoded again with the same
/// dynamic map and nearest-code search as <see cref="BlockwiseQuantizer"/>.
/// </summary>
internal static unsafe class HostAdamWKernel
{
    /// <summary>Values per piece: one 8-bit block, so a piece's moments fit two stack buffers in L1.</summary>
    public const int Piece = AdamW8bitLayout.BlockSize;

    /// <summary>Values per unit of parallel work: whole 8-bit blocks, large enough to amortize the scheduling.</summary>
    public const long ChunkValues = 32 * Piece;

    private static readonly float[] SignedCodes = BlockwiseQuantizer.DynamicMap(signed: true);
    private static readonly float[] UnsignedCodes = BlockwiseQuantizer.DynamicMap(signed: false);
    private static readonly float[] SignedBounds = BlockwiseQuantizer.Boundaries(signed: true);
    private static readonly float[] UnsignedBounds = BlockwiseQuantizer.Boundaries(signed: false);

    /// <summary>
    /// Steps values [<paramref name="start"/>, <paramref name="start"/> + <paramref name="length"/>) of one tensor
    /// (<paramref name="start"/> on a block edge); returns the sum of squares of the (unmultiplied) gradients.
    /// </summary>
    public static double Step(in HostStepScalars s, in HostStepTensor t, long start, long length)
    {
        float* m = stackalloc float[Piece];
        float* v = stackalloc float[Piece];
        float* g16 = stackalloc float[Piece];
        float* p32 = stackalloc float[Piece];
        float decay = (float)(1 - s.LearningRate * t.WeightDecay);
        double squares = 0;
        for (long offset = start; offset < start + length; offset += Piece)
        {
            int n = (int)Math.Min(Piece, start + length - offset);
            bool widened = t.EightBit || t.BFloat16Values;
            float* avg = widened ? m : t.ExpAvg + offset;
            float* avgSq = widened ? v : t.ExpAvgSq + offset;
            float* parameter = t.Parameter + offset;
            bool decays = t.WeightDecay != 0;
            if (t.EightBit)
            {
                long block = offset / Piece;
                Decode(t.AvgCodes + offset, t.AvgScales[block], SignedCodes, m, n);
                Decode(t.AvgSqCodes + offset, t.AvgSqScales[block], UnsignedCodes, v, n);
            }
            else if (t.BFloat16Values)
            {
                Widen((ushort*)t.ExpAvg + offset, m, n);
                Widen((ushort*)t.ExpAvgSq + offset, v, n);
                // libtorch decays the bf16 parameter in place (rounded to bf16), then widens it for the update.
                parameter = p32;
                Widen((ushort*)t.Parameter + offset, p32, n);
                if (decays)
                {
                    Decay(p32, n, decay);
                    decays = false;
                }
            }
            void* gradient = t.GradientDtype == HostDtype.BFloat16 ? (ushort*)t.Gradient + offset : (float*)t.Gradient + offset;
            bool bf16 = t.GradientDtype == HostDtype.BFloat16;
            if (t.GradientDtype == HostDtype.Float16)
            {
                var source = (Half*)t.Gradient + offset;
                for (int i = 0; i < n; i++)
                {
                    g16[i] = (float)source[i];
                }
                gradient = g16;
            }
            squares += Update(s, parameter, gradient, bf16, t.Accumulated is null ? null : t.Accumulated + offset,
                avg, avgSq, n, decays, decay);
            if (t.BFloat16Values)
            {
                ToBFloat16(p32, (ushort*)t.Parameter + offset, n);
                ToBFloat16(m, (ushort*)t.ExpAvg + offset, n);
                ToBFloat16(v, (ushort*)t.ExpAvgSq + offset, n);
            }
            if (t.EightBit)
            {
                long block = offset / Piece;
                // The last block's padding holds zeros' codes, as the padded quantization in AdamW writes them.
                int stored = (int)Math.Min(Piece, RoundUp(t.Count) - offset);
                t.AvgScales[block] = Encode(m, n, stored, SignedBounds, t.AvgCodes + offset);
                t.AvgSqScales[block] = Encode(v, n, stored, UnsignedBounds, t.AvgSqCodes + offset);
            }
            if (t.CopyDtype == HostDtype.BFloat16)
            {
                ToBFloat16(t.Parameter + offset, (ushort*)t.Copy + offset, n);
            }
            else if (t.CopyDtype == HostDtype.Float16)
            {
                var target = (Half*)t.Copy + offset;
                for (int i = 0; i < n; i++)
                {
                    target[i] = (Half)t.Parameter[offset + i]; // round to nearest even, as libtorch's copy_
                }
            }
        }
        return squares;
    }

    /// <summary>
    /// Steps every tensor of <paramref name="work"/>, each cut into chunks of <see cref="ChunkValues"/>, all chunks in
    /// parallel on <paramref name="threads"/> threads; returns the gradients' sum of squares, added in chunk order (the
    /// same sum whatever the scheduling).
    /// </summary>
    public static double StepAll(HostStepScalars s, IReadOnlyList<HostStepTensor> work, int threads)
    {
        var chunks = new List<(int Tensor, long Start, long Length)>();
        for (int i = 0; i < work.Count; i++)
        {
            for (long start = 0; start < work[i].Count; start += ChunkValues)
            {
                chunks.Add((i, start, Math.Min(ChunkValues, work[i].Count - start)));
            }
        }
        var sums = new double[chunks.Count];
        Parallel.For(0, chunks.Count, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, threads) }, c =>
        {
            var (tensor, start, length) = chunks[c];
            // The step threads are the parallelism: oneMKL's square roots run on the calling thread alone.
            int previous = SetLocalMklThreads != null ? SetLocalMklThreads(1) : 0;
            try
            {
                sums[c] = Step(s, work[tensor], start, length);
            }
            finally
            {
                if (SetLocalMklThreads != null)
                {
                    SetLocalMklThreads(previous);
                }
            }
        });
        return sums.Sum();
    }

    /// <summary>The kernel's name for a tensor element type (<see cref="HostDtype.None"/> for one it does not read).</summary>
    public static HostDtype DtypeOf(TorchSharp.torch.ScalarType type) => type switch
    {
        TorchSharp.torch.ScalarType.Float32 => HostDtype.Float32,
        TorchSharp.torch.ScalarType.BFloat16 => HostDtype.BFloat16,
        TorchSharp.torch.ScalarType.Float16 => HostDtype.Float16,
        _ => HostDtype.None,
    };

    private static long RoundUp(long count) => (count + Piece - 1) / Piece * Piece;

    // One piece of the update; g is fp32 or bf16 (widened exactly), acc an fp32 accumulator to add first, or null. Two
    // passes over the piece (in L1): the moments, then the square roots of the second moment, then the parameter.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static double Update(in HostStepScalars s, float* p, void* g, bool bf16, float* acc, float* m, float* v, int n, bool decays, float decay)
    {
        // lerp(m, g, w) = m + w (g - m) for |w| < 0.5, else g - (1 - w)(g - m); libtorch computes both as one fma.
        bool small = MathF.Abs(s.Beta1Complement) < 0.5f;
        float coeff = small ? s.Beta1Complement : s.Beta1Complement - 1f;
        var squares = Vector256<float>.Zero;
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var vCoeff = Vector256.Create(coeff);
            var vMultiplier = Vector256.Create(s.Multiplier);
            var vBeta2 = Vector256.Create(s.Beta2);
            var vBeta2c = Vector256.Create(s.Beta2Complement);
            for (; i <= n - 8; i += 8)
            {
                var gv = bf16 ? BFloat16Row.Load(g, i) : Float32Row.Load(g, i);
                if (acc is not null)
                {
                    gv = Vector256.Load(acc + i) + gv;
                }
                squares = Vector256.FusedMultiplyAdd(gv, gv, squares);
                if (s.Multiplies)
                {
                    gv *= vMultiplier;
                }
                var mv = Vector256.Load(m + i);
                Vector256.FusedMultiplyAdd(vCoeff, gv - mv, small ? mv : gv).Store(m + i);
                // addcmul: libtorch's kernel computes v + (value x g) x g with the outer multiply-add fused.
                Vector256.FusedMultiplyAdd(vBeta2c * gv, gv, Vector256.Load(v + i) * vBeta2).Store(v + i);
            }
        }
        double total = Vector256.Sum(Vector256.WidenLower(squares)) + Vector256.Sum(Vector256.WidenUpper(squares));
        for (; i < n; i++)
        {
            float gi = bf16 ? BFloat16Row.LoadScalar(g, i) : Float32Row.LoadScalar(g, i);
            if (acc is not null)
            {
                gi = acc[i] + gi;
            }
            total += (double)gi * gi;
            if (s.Multiplies)
            {
                gi *= s.Multiplier;
            }
            m[i] = MathF.FusedMultiplyAdd(coeff, gi - m[i], small ? m[i] : gi);
            v[i] = MathF.FusedMultiplyAdd(s.Beta2Complement * gi, gi, v[i] * s.Beta2);
        }
        float* root = stackalloc float[Piece];
        SquareRoot(v, root, n);
        i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var vDecay = Vector256.Create(decay);
            var vCorrection = Vector256.Create(s.Correction2Sqrt);
            var vEps = Vector256.Create(s.Eps);
            var vStep = Vector256.Create(s.NegativeStepSize);
            for (; i <= n - 8; i += 8)
            {
                var pv = Vector256.Load(p + i);
                if (decays)
                {
                    pv *= vDecay;
                }
                var denom = Vector256.Load(root + i) / vCorrection + vEps;
                (pv + vStep * Vector256.Load(m + i) / denom).Store(p + i);
            }
        }
        for (; i < n; i++)
        {
            float pi = decays ? p[i] * decay : p[i];
            float denom = root[i] / s.Correction2Sqrt + s.Eps;
            p[i] = pi + s.NegativeStepSize * m[i] / denom;
        }
        return total;
    }

    /// <summary>
    /// Whether square roots come from the function libtorch's own <c>sqrt</c> calls on this CPU build: MKL's
    /// <c>vmsSqrt</c> in high-accuracy mode, exported by libtorch_cpu. It is not always correctly rounded (measured: 17%
    /// of 100,003 values one ulp off IEEE <c>sqrt</c>), so with it the host step gives libtorch's bits exactly; without
    /// it (another build) the step uses IEEE square roots and can differ from the in-memory step by that last bit.
    /// </summary>
    public static bool LibtorchSquareRoot => VmsSqrt != null;

    // vmsSqrt(n, a, r, mode) with libtorch's mode: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
    private const long VmlMode = 0x2 | 0x140000 | 0x100;

    private static readonly delegate* unmanaged<int, float*, float*, long, void> VmsSqrt = FindVmsSqrt();

    // MKL_Set_Num_Threads_Local(n), what mkl.h's mkl_set_num_threads_local names (the lowercase export is the Fortran
    // entry, which takes a pointer): oneMKL's thread count for the calling thread only; returns the previous one (0: the
    // global setting). vmsSqrt runs its own OpenMP team otherwise: called from two step threads on two cores, the teams
    // oversubscribed them and the bf16 step of the bundled model took 66-133 ms instead of 12-25.
    private static readonly delegate* unmanaged<int, int> SetLocalMklThreads = FindExport<int, int>("MKL_Set_Num_Threads_Local");

    private static delegate* unmanaged<int, float*, float*, long, void> FindVmsSqrt()
    {
        if (Environment.GetEnvironmentVariable("FRUGAL_HOST_IEEE_SQRT") == "1")
        {
            return null;
        }
        return TryGetTorchExport("vmsSqrt", out var function) ? (delegate* unmanaged<int, float*, float*, long, void>)function : null;
    }

    private static delegate* unmanaged<TArgument, TResult> FindExport<TArgument, TResult>(string name) =>
        TryGetTorchExport(name, out var function) ? (delegate* unmanaged<TArgument, TResult>)function : null;

    private static bool TryGetTorchExport(string name, out nint function)
    {
        function = 0;
        return NativeLibrary.TryLoad("torch_cpu", typeof(HostAdamWKernel).Assembly, null, out var library)
            && NativeLibrary.TryGetExport(library, name, out function);
    }

    private static void SquareRoot(float* values, float* roots, int n)
    {
        if (VmsSqrt != null)
        {
            VmsSqrt(n, values, roots, VmlMode);
            return;
        }
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i <= n - 8; i += 8)
            {
                Vector256.Sqrt(Vector256.Load(values + i)).Store(roots + i);
            }
        }
        for (; i < n; i++)
        {
            roots[i] = MathF.Sqrt(values[i]);
        }
    }

    private static void Decode(byte* codes, float scale, float[] map, float* values, int n)
    {
        fixed (float* table = map)
        {
            for (int i = 0; i < n; i++)
            {
                values[i] = table[codes[i]] * scale;
            }
        }
    }

    // absmax of the block (at least 1e-30), then each value / absmax to the number of midpoints below it (searchsorted's
    // left side). A table indexed by the value's top 16 bits gives how many midpoints lie below the whole bucket of floats
    // sharing them; the few midpoints inside a bucket are then compared one by one. Returns the block's scale.
    private static float Encode(float* values, int n, int stored, float[] bounds, byte* codes)
    {
        float absmax = 0;
        for (int i = 0; i < n; i++)
        {
            absmax = MathF.Max(absmax, MathF.Abs(values[i]));
        }
        absmax = MathF.Max(absmax, 1e-30f);
        var below = ReferenceEquals(bounds, SignedBounds) ? SignedBelow : UnsignedBelow;
        fixed (float* b = bounds)
        fixed (byte* start = below)
        {
            for (int i = 0; i < stored; i++)
            {
                float x = i < n ? values[i] / absmax : 0f;
                int index = start[BitConverter.SingleToUInt32Bits(x) >> 16];
                while (index < 255 && b[index] < x)
                {
                    index++;
                }
                codes[i] = (byte)index;
            }
        }
        return absmax;
    }

    private static readonly byte[] SignedBelow = BucketStarts(SignedBounds);
    private static readonly byte[] UnsignedBelow = BucketStarts(UnsignedBounds);

    // For each 16-bit prefix: midpoints below every float with that prefix (the bucket's lowest value is its smallest
    // magnitude when positive, its largest when negative).
    private static byte[] BucketStarts(float[] bounds)
    {
        var table = new byte[1 << 16];
        for (int prefix = 0; prefix < table.Length; prefix++)
        {
            uint bits = (uint)prefix << 16;
            float lowest = BitConverter.UInt32BitsToSingle((prefix & 0x8000) != 0 ? bits | 0xFFFF : bits);
            int count = 0;
            while (count < bounds.Length && bounds[count] < lowest)
            {
                count++;
            }
            table[prefix] = (byte)count;
        }
        return table;
    }

    // bf16 to fp32 is exact: the bf16 bits are the top half of the fp32.
    private static void Widen(ushort* source, float* target, int n)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i <= n - 8; i += 8)
            {
                BFloat16Row.Load(source, i).Store(target + i);
            }
        }
        for (; i < n; i++)
        {
            target[i] = BFloat16Row.LoadScalar(source, i);
        }
    }

    // A bf16 tensor's mul_ by a Scalar: each value times the fp32 factor, rounded to bf16 (and widened again here).
    private static void Decay(float* values, int n, float factor)
    {
        for (int i = 0; i < n; i++)
        {
            values[i] = BitConverter.Int32BitsToSingle(BFloat16Bits(values[i] * factor) << 16);
        }
    }

    private static void ToBFloat16(float* source, ushort* target, int n)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var half = Vector256.Create(0x7FFFu);
            var one = Vector256.Create(1u);
            var nanBits = Vector256.Create(0x7FC0u);
            var magnitude = Vector256.Create(0x7FFFFFFFu);
            var infinity = Vector256.Create(0x7F800000u);
            for (; i <= n - 8; i += 8)
            {
                var bits = Vector256.Load(source + i).AsUInt32();
                var rounded = (bits + ((bits >> 16) & one) + half) >> 16;
                var nan = Vector256.GreaterThan(bits & magnitude, infinity);
                var result = Vector256.ConditionalSelect(nan, nanBits, rounded);
                Vector128.Narrow(result.GetLower(), result.GetUpper()).Store(target + i);
            }
        }
        for (; i < n; i++)
        {
            target[i] = BFloat16Bits(source[i]);
        }
    }

    /// <summary>c10::BFloat16's rounding: to nearest even, NaN to the quiet 0x7FC0.</summary>
    public static ushort BFloat16Bits(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        if ((bits & 0x7FFFFFFF) > 0x7F800000)
        {
            return 0x7FC0;
        }
        return (ushort)((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16);
    }
}
