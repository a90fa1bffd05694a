using System.Runtime.Intrinsics;
using FrugalLM.Quantization;
using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// The sum of squares of a CPU tensor's values, accumulated in double precision by vectorized C# over its memory, for
/// gradient norms. libtorch's <c>norm</c> of a 16-bit gradient first makes a whole fp32 copy (fresh pages: a page fault
/// per 4 KiB) and rounds its result to fp32; this reads the values once, where they are. Measured on the bundled model's
/// bf16 step: the norm of every gradient took 25-38 ms through libtorch.
/// </summary>
public static unsafe class SumOfSquares
{
    /// <summary>Values per unit of parallel work.</summary>
    private const long ChunkValues = 1 << 18;

    /// <summary>
    /// The sum of squares of a gradient's values, for a gradient norm: <see cref="TryCompute"/> on libtorch's threads where
    /// it can read the memory, else libtorch's fp32 norm, squared (no float64 copy of the tensor, which for an
    /// embedding's gradient would be hundreds of MiB). Infinite or NaN when a value is.
    /// </summary>
    public static double Of(torch.Tensor gradient)
    {
        if (TryCompute(gradient, torch.get_num_threads(), out double sum))
        {
            return sum;
        }
        using var scope = torch.NewDisposeScope();
        double norm = gradient.to(torch.ScalarType.Float32).norm().item<float>();
        return norm * norm;
    }

    /// <summary>
    /// The sum of squares of <paramref name="tensor"/>'s values when it is a contiguous CPU tensor of fp32, bf16 or fp16;
    /// false otherwise (the caller falls back to libtorch). Chunks run on up to <paramref name="threads"/> threads and
    /// are added in order, so the result does not depend on the scheduling.
    /// </summary>
    public static bool TryCompute(torch.Tensor tensor, int threads, out double sum)
    {
        sum = 0;
        var dtype = tensor.dtype;
        if (tensor.device_type != DeviceType.CPU || !tensor.is_contiguous()
            || dtype is not (torch.ScalarType.Float32 or torch.ScalarType.BFloat16 or torch.ScalarType.Float16))
        {
            return false;
        }
        long count = tensor.numel();
        if (count == 0)
        {
            return true;
        }
        byte* data = TensorMemory.Pointer(tensor);
        int chunks = (int)((count + ChunkValues - 1) / ChunkValues);
        var sums = new double[chunks];
        void Chunk(int c)
        {
            long start = c * ChunkValues;
            int n = (int)Math.Min(ChunkValues, count - start);
            sums[c] = dtype switch
            {
                torch.ScalarType.Float32 => Sum<Float32Row>((float*)data + start, n),
                torch.ScalarType.BFloat16 => Sum<BFloat16Row>((ushort*)data + start, n),
                _ => Fp16((Half*)data + start, n),
            };
        }
        if (chunks == 1 || threads <= 1)
        {
            for (int c = 0; c < chunks; c++)
            {
                Chunk(c);
            }
        }
        else
        {
            Parallel.For(0, chunks, new ParallelOptions { MaxDegreeOfParallelism = threads }, Chunk);
        }
        foreach (double s in sums)
        {
            sum += s;
        }
        return true;
    }

    // fp32 or bf16 values, widened by the int8 kernels' row loaders (bf16's widening is an exact shift).
    private static double Sum<TRow>(void* x, int n)
        where TRow : IFloatRow
    {
        var low = Vector256<double>.Zero;
        var high = Vector256<double>.Zero;
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i <= n - 8; i += 8)
            {
                (low, high) = Add(TRow.Load(x, i), low, high);
            }
        }
        double total = Vector256.Sum(low) + Vector256.Sum(high);
        for (; i < n; i++)
        {
            double v = TRow.LoadScalar(x, i);
            total += v * v;
        }
        return total;
    }

    // fp16 gradients are rare on a CPU (fp16 is a storage format there): scalar widening is enough.
    private static double Fp16(Half* x, int n)
    {
        double total = 0;
        for (int i = 0; i < n; i++)
        {
            double v = (double)x[i];
            total += v * v;
        }
        return total;
    }

    private static (Vector256<double>, Vector256<double>) Add(Vector256<float> values, Vector256<double> low, Vector256<double> high)
    {
        var lower = Vector256.WidenLower(values);
        var upper = Vector256.WidenUpper(values);
        return (Vector256.FusedMultiplyAdd(lower, lower, low), Vector256.FusedMultiplyAdd(upper, upper, high));
    }
}
