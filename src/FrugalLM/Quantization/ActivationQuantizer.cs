using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace FrugalLM.Quantization;

/// <summary>
/// LLM.int8()'s run-time half: finds the outlier feature columns of activations X [M, K] and quantizes the
/// rest row by row (vector-wise) to int8 with one absmax per row, straight from fp32 or bf16 tensor memory
/// into the int8 copy that <see cref="Int8Gemm"/> reads; nothing else of size M·K is allocated.
/// </summary>
internal static unsafe class ActivationQuantizer
{
    /// <summary>Ascending indices of the columns where some row has |x| ≥ <paramref name="threshold"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static long[] OutlierColumns<TRow>(void* x, int m, int k, float threshold)
        where TRow : struct, IFloatRow
    {
        var flags = new int[k];
        var limit = Vector256.Create(threshold);
        fixed (int* f = flags)
        {
            for (int i = 0; i < m; i++)
            {
                nint row = (nint)i * k;
                int j = 0;
                for (; j + 8 <= k; j += 8)
                {
                    var hit = Vector256.GreaterThanOrEqual(Vector256.Abs(TRow.Load(x, row + j)), limit).AsInt32();
                    (Vector256.Load(f + j) | hit).Store(f + j);
                }
                for (; j < k; j++)
                {
                    f[j] |= MathF.Abs(TRow.LoadScalar(x, row + j)) >= threshold ? -1 : 0;
                }
            }
        }
        var columns = new List<long>();
        for (int j = 0; j < k; j++)
        {
            if (flags[j] != 0)
            {
                columns.Add(j);
            }
        }
        return [.. columns];
    }

    /// <summary>
    /// Quantizes each row i over the columns <paramref name="outliers"/> does not list:
    /// q = round(x·127 / absmax_i) (half to even, as torch.round), 0 in outlier columns;
    /// <paramref name="absMax"/>[i] = absmax_i over those columns (0 for a row of zeros, whose q is all 0).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Quantize<TRow>(void* x, int m, int k, long[] outliers, sbyte* q, float* absMax, int threads)
        where TRow : struct, IFloatRow
    {
        // Lane j of a keep mask is all ones where column j takes part in the int8 product, zero in an
        // outlier column, so an AND removes outliers from both the absmax and the quantized row.
        var keep = new int[k + 32];
        Array.Fill(keep, -1, 0, k);
        foreach (long column in outliers)
        {
            keep[column] = 0;
        }
        void Rows(int from, int to)
        {
            fixed (int* mask = keep)
            {
                for (int i = from; i < to; i++)
                {
                    absMax[i] = QuantizeRow<TRow>(x, (nint)i * k, k, mask, q + ((nint)i * k));
                }
            }
        }
        // Rows are independent; a thread per block of rows pays off only for prompts, not single tokens.
        int blocks = Math.Min(threads, m / 16);
        if (blocks <= 1)
        {
            Rows(0, m);
            return;
        }
        Parallel.For(0, blocks, new ParallelOptions { MaxDegreeOfParallelism = threads },
            block => Rows((int)((long)m * block / blocks), (int)((long)m * (block + 1) / blocks)));
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static float QuantizeRow<TRow>(void* x, nint row, int k, int* keep, sbyte* q)
        where TRow : struct, IFloatRow
    {
        var max = Vector256<float>.Zero;
        int j = 0;
        for (; j + 8 <= k; j += 8)
        {
            max = Vector256.Max(max, Vector256.Abs(TRow.Load(x, row + j) & Vector256.Load(keep + j).AsSingle()));
        }
        float absMax = 0f;
        for (int lane = 0; lane < Vector256<float>.Count; lane++)
        {
            absMax = Math.Max(absMax, max[lane]);
        }
        for (; j < k; j++)
        {
            if (keep[j] != 0)
            {
                absMax = Math.Max(absMax, MathF.Abs(TRow.LoadScalar(x, row + j)));
            }
        }
        // A zero (or non-finite) absmax leaves nothing to scale: the row quantizes to zeros.
        float scale = absMax > 0f && float.IsFinite(absMax) ? 127f / absMax : 0f;
        var s = Vector256.Create(scale);
        j = 0;
        for (; j + 32 <= k; j += 32)
        {
            var i0 = Vector256.ConvertToInt32(Vector256.Round((TRow.Load(x, row + j) & Vector256.Load(keep + j).AsSingle()) * s));
            var i1 = Vector256.ConvertToInt32(Vector256.Round((TRow.Load(x, row + j + 8) & Vector256.Load(keep + j + 8).AsSingle()) * s));
            var i2 = Vector256.ConvertToInt32(Vector256.Round((TRow.Load(x, row + j + 16) & Vector256.Load(keep + j + 16).AsSingle()) * s));
            var i3 = Vector256.ConvertToInt32(Vector256.Round((TRow.Load(x, row + j + 24) & Vector256.Load(keep + j + 24).AsSingle()) * s));
            Vector256.Narrow(Vector256.Narrow(i0, i1), Vector256.Narrow(i2, i3)).Store(q + j);
        }
        for (; j < k; j++)
        {
            q[j] = keep[j] == 0 ? (sbyte)0 : (sbyte)MathF.Round(TRow.LoadScalar(x, row + j) * scale);
        }
        return absMax;
    }
}

/// <summary>Reads floating-point activations of one element type as float32.</summary>
internal unsafe interface IFloatRow
{
    /// <summary>Elements [i, i + 8) as float32.</summary>
    static abstract Vector256<float> Load(void* x, nint i);

    /// <summary>Element i as float32.</summary>
    static abstract float LoadScalar(void* x, nint i);
}

/// <summary>float32 activations.</summary>
internal readonly unsafe struct Float32Row : IFloatRow
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load(void* x, nint i) => Vector256.Load((float*)x + i);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(void* x, nint i) => ((float*)x)[i];
}

/// <summary>bfloat16 activations: the upper 16 bits of a float32, so widening is a shift.</summary>
internal readonly unsafe struct BFloat16Row : IFloatRow
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Load(void* x, nint i) =>
        Vector256.ShiftLeft(Vector256.WidenLower(Vector128.Load((ushort*)x + i).ToVector256Unsafe()), 16).AsSingle();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float LoadScalar(void* x, nint i) => BitConverter.Int32BitsToSingle(((ushort*)x)[i] << 16);
}
