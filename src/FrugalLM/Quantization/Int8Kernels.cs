using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace FrugalLM.Quantization;

/// <summary>
/// A micro-kernel of <see cref="Int8Gemm"/>: dot products of 4 (or 1) activation rows with 3 weight rows over
/// <c>steps * Width</c> consecutive k, the 12 (or 3) sums written row-major to <c>c</c>. Dot-product form
/// (vectors run along k, one horizontal sum per result at the end) so that weights are read in their own
/// row-major layout, the layout Hugging Face int8 checkpoints store: no packed second copy of the weights.
/// </summary>
internal unsafe interface IInt8Kernel
{
    /// <summary>k consumed per step.</summary>
    static abstract int Width { get; }

    /// <summary>
    /// True when the kernel sums a·(b + 128) instead of a·b (vpdpbusd multiplies unsigned by signed bytes);
    /// the caller subtracts 128·Σa per row once.
    /// </summary>
    static abstract bool OffsetWeights { get; }

    /// <summary>Rows a, a + lda, a + 2 lda, a + 3 lda against rows b0, b1, b2.</summary>
    static abstract void Tile4x3(sbyte* a, nint lda, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c);

    /// <summary>Row a against rows b0, b1, b2.</summary>
    static abstract void Tile1x3(sbyte* a, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c);
}

/// <summary>Plain C# kernel.</summary>
internal readonly unsafe struct ScalarKernel : IInt8Kernel
{
    public static int Width => 1;

    public static bool OffsetWeights => false;

    public static void Tile4x3(sbyte* a, nint lda, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        for (int r = 0; r < 4; r++)
        {
            Tile1x3(a + (r * lda), b0, b1, b2, steps, c + (3 * r));
        }
    }

    public static void Tile1x3(sbyte* a, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        int s0 = 0, s1 = 0, s2 = 0;
        for (int k = 0; k < steps; k++)
        {
            int x = a[k];
            s0 += x * b0[k];
            s1 += x * b1[k];
            s2 += x * b2[k];
        }
        c[0] = s0;
        c[1] = s1;
        c[2] = s2;
    }
}

/// <summary>
/// AVX2: 16 bytes of each row sign-extended to 16 int16 (vpmovsxbw), multiplied pairwise and added to 8
/// int32 (vpmaddwd). No saturation: |a·b| ≤ 128·128 = 2^14, so a pair sums to at most 2^15, far inside
/// int32. (The u8 x s8 vpmaddubsw would do 32 products per instruction but its int16 pair sum saturates,
/// e.g. 255·127 + 255·127 &gt; 32767 once an operand is made unsigned by adding 128, and it needs a second
/// vpmaddwd by ones to reach int32 anyway: two multiplies per 32 products, the same rate as this path.)
/// </summary>
internal readonly unsafe struct Avx2Kernel : IInt8Kernel
{
    public static int Width => 16;

    public static bool OffsetWeights => false;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Tile4x3(sbyte* a, nint lda, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        Vector256<int> c00 = default, c01 = default, c02 = default, c10 = default, c11 = default, c12 = default;
        Vector256<int> c20 = default, c21 = default, c22 = default, c30 = default, c31 = default, c32 = default;
        sbyte* a1 = a + lda, a2 = a1 + lda, a3 = a2 + lda;
        for (nint k = 0, end = (nint)steps * 16; k < end; k += 16)
        {
            var w0 = Avx2.ConvertToVector256Int16(b0 + k);
            var w1 = Avx2.ConvertToVector256Int16(b1 + k);
            var w2 = Avx2.ConvertToVector256Int16(b2 + k);
            var x = Avx2.ConvertToVector256Int16(a + k);
            c00 = Avx2.Add(c00, Avx2.MultiplyAddAdjacent(x, w0));
            c01 = Avx2.Add(c01, Avx2.MultiplyAddAdjacent(x, w1));
            c02 = Avx2.Add(c02, Avx2.MultiplyAddAdjacent(x, w2));
            x = Avx2.ConvertToVector256Int16(a1 + k);
            c10 = Avx2.Add(c10, Avx2.MultiplyAddAdjacent(x, w0));
            c11 = Avx2.Add(c11, Avx2.MultiplyAddAdjacent(x, w1));
            c12 = Avx2.Add(c12, Avx2.MultiplyAddAdjacent(x, w2));
            x = Avx2.ConvertToVector256Int16(a2 + k);
            c20 = Avx2.Add(c20, Avx2.MultiplyAddAdjacent(x, w0));
            c21 = Avx2.Add(c21, Avx2.MultiplyAddAdjacent(x, w1));
            c22 = Avx2.Add(c22, Avx2.MultiplyAddAdjacent(x, w2));
            x = Avx2.ConvertToVector256Int16(a3 + k);
            c30 = Avx2.Add(c30, Avx2.MultiplyAddAdjacent(x, w0));
            c31 = Avx2.Add(c31, Avx2.MultiplyAddAdjacent(x, w1));
            c32 = Avx2.Add(c32, Avx2.MultiplyAddAdjacent(x, w2));
        }
        Reduce.Store4(c00, c01, c02, c10, c + 0);
        Reduce.Store4(c11, c12, c20, c21, c + 4);
        Reduce.Store4(c22, c30, c31, c32, c + 8);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Tile1x3(sbyte* a, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        Vector256<int> c0 = default, c1 = default, c2 = default;
        for (nint k = 0, end = (nint)steps * 16; k < end; k += 16)
        {
            var x = Avx2.ConvertToVector256Int16(a + k);
            c0 = Avx2.Add(c0, Avx2.MultiplyAddAdjacent(x, Avx2.ConvertToVector256Int16(b0 + k)));
            c1 = Avx2.Add(c1, Avx2.MultiplyAddAdjacent(x, Avx2.ConvertToVector256Int16(b1 + k)));
            c2 = Avx2.Add(c2, Avx2.MultiplyAddAdjacent(x, Avx2.ConvertToVector256Int16(b2 + k)));
        }
        c[0] = Vector256.Sum(c0);
        c[1] = Vector256.Sum(c1);
        c[2] = Vector256.Sum(c2);
    }
}

/// <summary>
/// AVX-512BW: as <see cref="Avx2Kernel"/> with 32 bytes per row per step sign-extended into a 512-bit
/// register of 32 int16; the same no-saturation bound holds (a pair sums to at most 2^15 in int32).
/// </summary>
internal readonly unsafe struct Avx512Kernel : IInt8Kernel
{
    public static int Width => 32;

    public static bool OffsetWeights => false;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Tile4x3(sbyte* a, nint lda, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        Vector512<int> c00 = default, c01 = default, c02 = default, c10 = default, c11 = default, c12 = default;
        Vector512<int> c20 = default, c21 = default, c22 = default, c30 = default, c31 = default, c32 = default;
        sbyte* a1 = a + lda, a2 = a1 + lda, a3 = a2 + lda;
        for (nint k = 0, end = (nint)steps * 32; k < end; k += 32)
        {
            var w0 = Avx512BW.ConvertToVector512Int16(Vector256.Load(b0 + k));
            var w1 = Avx512BW.ConvertToVector512Int16(Vector256.Load(b1 + k));
            var w2 = Avx512BW.ConvertToVector512Int16(Vector256.Load(b2 + k));
            var x = Avx512BW.ConvertToVector512Int16(Vector256.Load(a + k));
            c00 = Avx512F.Add(c00, Avx512BW.MultiplyAddAdjacent(x, w0));
            c01 = Avx512F.Add(c01, Avx512BW.MultiplyAddAdjacent(x, w1));
            c02 = Avx512F.Add(c02, Avx512BW.MultiplyAddAdjacent(x, w2));
            x = Avx512BW.ConvertToVector512Int16(Vector256.Load(a1 + k));
            c10 = Avx512F.Add(c10, Avx512BW.MultiplyAddAdjacent(x, w0));
            c11 = Avx512F.Add(c11, Avx512BW.MultiplyAddAdjacent(x, w1));
            c12 = Avx512F.Add(c12, Avx512BW.MultiplyAddAdjacent(x, w2));
            x = Avx512BW.ConvertToVector512Int16(Vector256.Load(a2 + k));
            c20 = Avx512F.Add(c20, Avx512BW.MultiplyAddAdjacent(x, w0));
            c21 = Avx512F.Add(c21, Avx512BW.MultiplyAddAdjacent(x, w1));
            c22 = Avx512F.Add(c22, Avx512BW.MultiplyAddAdjacent(x, w2));
            x = Avx512BW.ConvertToVector512Int16(Vector256.Load(a3 + k));
            c30 = Avx512F.Add(c30, Avx512BW.MultiplyAddAdjacent(x, w0));
            c31 = Avx512F.Add(c31, Avx512BW.MultiplyAddAdjacent(x, w1));
            c32 = Avx512F.Add(c32, Avx512BW.MultiplyAddAdjacent(x, w2));
        }
        Reduce.Store4(Reduce.Halve(c00), Reduce.Halve(c01), Reduce.Halve(c02), Reduce.Halve(c10), c + 0);
        Reduce.Store4(Reduce.Halve(c11), Reduce.Halve(c12), Reduce.Halve(c20), Reduce.Halve(c21), c + 4);
        Reduce.Store4(Reduce.Halve(c22), Reduce.Halve(c30), Reduce.Halve(c31), Reduce.Halve(c32), c + 8);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Tile1x3(sbyte* a, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        Vector512<int> c0 = default, c1 = default, c2 = default;
        for (nint k = 0, end = (nint)steps * 32; k < end; k += 32)
        {
            var x = Avx512BW.ConvertToVector512Int16(Vector256.Load(a + k));
            c0 = Avx512F.Add(c0, Avx512BW.MultiplyAddAdjacent(x, Avx512BW.ConvertToVector512Int16(Vector256.Load(b0 + k))));
            c1 = Avx512F.Add(c1, Avx512BW.MultiplyAddAdjacent(x, Avx512BW.ConvertToVector512Int16(Vector256.Load(b1 + k))));
            c2 = Avx512F.Add(c2, Avx512BW.MultiplyAddAdjacent(x, Avx512BW.ConvertToVector512Int16(Vector256.Load(b2 + k))));
        }
        c[0] = Vector512.Sum(c0);
        c[1] = Vector512.Sum(c1);
        c[2] = Vector512.Sum(c2);
    }
}

/// <summary>
/// AVX-VNNI: vpdpbusd adds four products of unsigned by signed bytes to each int32 lane in one instruction,
/// with no intermediate rounding or saturation (the non-saturating form). The unsigned operand is the
/// weight plus 128 (a flip of its sign bit, <c>b ^ 0x80</c>), the signed one the activation, so each lane
/// gains Σ a·(b + 128) = Σ a·b + 128·Σ a; the driver subtracts 128·Σa once per row. Every product is at
/// most 128·255 in magnitude and int32 wraps modulo 2^32, so the corrected sum is exact whenever the true
/// result fits int32, which <see cref="Int8Gemm.MaxInnerDimension"/> guarantees.
/// </summary>
internal readonly unsafe struct VnniKernel : IInt8Kernel
{
    public static int Width => 32;

    public static bool OffsetWeights => true;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Tile4x3(sbyte* a, nint lda, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        Vector256<int> c00 = default, c01 = default, c02 = default, c10 = default, c11 = default, c12 = default;
        Vector256<int> c20 = default, c21 = default, c22 = default, c30 = default, c31 = default, c32 = default;
        var flip = Vector256.Create((byte)0x80);
        sbyte* a1 = a + lda, a2 = a1 + lda, a3 = a2 + lda;
        for (nint k = 0, end = (nint)steps * 32; k < end; k += 32)
        {
            var w0 = Vector256.Load((byte*)b0 + k) ^ flip;
            var w1 = Vector256.Load((byte*)b1 + k) ^ flip;
            var w2 = Vector256.Load((byte*)b2 + k) ^ flip;
            var x = Vector256.Load(a + k);
            c00 = AvxVnni.MultiplyWideningAndAdd(c00, w0, x);
            c01 = AvxVnni.MultiplyWideningAndAdd(c01, w1, x);
            c02 = AvxVnni.MultiplyWideningAndAdd(c02, w2, x);
            x = Vector256.Load(a1 + k);
            c10 = AvxVnni.MultiplyWideningAndAdd(c10, w0, x);
            c11 = AvxVnni.MultiplyWideningAndAdd(c11, w1, x);
            c12 = AvxVnni.MultiplyWideningAndAdd(c12, w2, x);
            x = Vector256.Load(a2 + k);
            c20 = AvxVnni.MultiplyWideningAndAdd(c20, w0, x);
            c21 = AvxVnni.MultiplyWideningAndAdd(c21, w1, x);
            c22 = AvxVnni.MultiplyWideningAndAdd(c22, w2, x);
            x = Vector256.Load(a3 + k);
            c30 = AvxVnni.MultiplyWideningAndAdd(c30, w0, x);
            c31 = AvxVnni.MultiplyWideningAndAdd(c31, w1, x);
            c32 = AvxVnni.MultiplyWideningAndAdd(c32, w2, x);
        }
        Reduce.Store4(c00, c01, c02, c10, c + 0);
        Reduce.Store4(c11, c12, c20, c21, c + 4);
        Reduce.Store4(c22, c30, c31, c32, c + 8);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Tile1x3(sbyte* a, sbyte* b0, sbyte* b1, sbyte* b2, int steps, int* c)
    {
        Vector256<int> c0 = default, c1 = default, c2 = default;
        var flip = Vector256.Create((byte)0x80);
        for (nint k = 0, end = (nint)steps * 32; k < end; k += 32)
        {
            var x = Vector256.Load(a + k);
            c0 = AvxVnni.MultiplyWideningAndAdd(c0, Vector256.Load((byte*)b0 + k) ^ flip, x);
            c1 = AvxVnni.MultiplyWideningAndAdd(c1, Vector256.Load((byte*)b1 + k) ^ flip, x);
            c2 = AvxVnni.MultiplyWideningAndAdd(c2, Vector256.Load((byte*)b2 + k) ^ flip, x);
        }
        c[0] = Vector256.Sum(c0);
        c[1] = Vector256.Sum(c1);
        c[2] = Vector256.Sum(c2);
    }

    /// <summary>Σ a over <paramref name="length"/> bytes, exact (|Σ| ≤ 128·length).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static int Sum(sbyte* a, int length)
    {
        var ones = Vector256.Create((byte)1);
        Vector256<int> acc = default;
        int k = 0;
        for (; k + 32 <= length; k += 32)
        {
            acc = AvxVnni.MultiplyWideningAndAdd(acc, ones, Vector256.Load(a + k));
        }
        int sum = Vector256.Sum(acc);
        for (; k < length; k++)
        {
            sum += a[k];
        }
        return sum;
    }
}

/// <summary>Horizontal sums of accumulator registers.</summary>
internal static class Reduce
{
    /// <summary>The 8 int32 lanes of a 512-bit accumulator folded to 8 (upper half added to lower half).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<int> Halve(Vector512<int> v) => v.GetLower() + v.GetUpper();

    /// <summary>Writes the lane sums of four accumulators to c[0..3]: three hadds and one 128-bit fold.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static unsafe void Store4(Vector256<int> v0, Vector256<int> v1, Vector256<int> v2, Vector256<int> v3, int* c)
    {
        // hadd(v0, v1) = [v0₀+v0₁, v0₂+v0₃, v1₀+v1₁, v1₂+v1₃ | same for the upper 128 bits]; a second hadd
        // leaves, per 128-bit half, one partial sum of each of v0..v3; adding the halves finishes them.
        var h = Avx2.HorizontalAdd(Avx2.HorizontalAdd(v0, v1), Avx2.HorizontalAdd(v2, v3));
        (h.GetLower() + h.GetUpper()).Store(c);
    }
}
