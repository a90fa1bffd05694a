using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics.X86;
using FrugalLM.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Quantization;

/// <summary>
/// Exact int8 x int8 → int32 matrix multiply on the CPU: C [M, N] = A [M, K] · Bᵀ with B [N, K], both
/// row-major, read in place from tensor memory. B is a weight as <c>Linear</c> and Hugging Face int8
/// checkpoints store it (one row per output feature), so weights need no repacking and exist once.
/// </summary>
/// <remarks>
/// <para>Kernels (<see cref="Int8Kernel"/>): AVX-VNNI vpdpbusd, AVX-512BW or AVX2 vpmaddwd on sign-extended
/// int16, and scalar C#; all exact and bit-identical. A micro-kernel computes a 4 x 3 block of C as 12 dot
/// products whose vector accumulators stay in registers along k (see <see cref="IInt8Kernel"/>); k beyond a
/// multiple of the vector width is added in scalar code.</para>
/// <para>Blocking: k is cut into blocks of at most <see cref="KBlock"/> so that a group of activation rows
/// (<see cref="ActivationBlockBytes"/>) stays in L2 while every weight tile streams past it once, and a
/// 3-row weight tile (3 x 4 KiB) stays in L1 while it meets every row of that group. Partial sums of
/// earlier k blocks wait in the output itself. Threads take disjoint ranges of output columns.</para>
/// <para>Range: |C| ≤ 128·128·K must fit int32, so K ≤ <see cref="MaxInnerDimension"/>.</para>
/// </remarks>
public static unsafe class Int8Gemm
{
    /// <summary>Largest K for which every int8 product sum fits int32 (128·128·K &lt; 2^31).</summary>
    public const int MaxInnerDimension = 131071;

    private const int KBlock = 4096;
    private const int ActivationBlockBytes = 256 * 1024;

    /// <summary>The fastest kernel this CPU supports, used for <see cref="Int8Kernel.Auto"/>.</summary>
    public static Int8Kernel PreferredKernel { get; } =
        IsSupported(Int8Kernel.AvxVnni) ? Int8Kernel.AvxVnni
        : IsSupported(Int8Kernel.Avx512BW) ? Int8Kernel.Avx512BW
        : IsSupported(Int8Kernel.Avx2) ? Int8Kernel.Avx2
        : Int8Kernel.Scalar;

    /// <summary>Whether <paramref name="kernel"/> can run on this CPU.</summary>
    public static bool IsSupported(Int8Kernel kernel) => kernel switch
    {
        Int8Kernel.Auto or Int8Kernel.Scalar => true,
        Int8Kernel.Avx2 => Avx2.IsSupported,
        Int8Kernel.Avx512BW => Avx512BW.IsSupported && Avx2.IsSupported,
        Int8Kernel.AvxVnni => AvxVnni.IsSupported && Avx2.IsSupported,
        _ => false,
    };

    /// <summary>C = A·Bᵀ as a new int32 tensor [M, N].</summary>
    /// <param name="a">int8 [M, K], contiguous, CPU.</param>
    /// <param name="b">int8 [N, K], contiguous, CPU.</param>
    /// <param name="threads">Worker threads; 0 takes libtorch's intra-op thread count.</param>
    /// <param name="kernel">Instruction-set path.</param>
    public static Tensor Multiply(Tensor a, Tensor b, int threads = 0, Int8Kernel kernel = Int8Kernel.Auto)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        var c = empty(a.ndim == 2 ? a.shape[0] : 0, b.ndim == 2 ? b.shape[0] : 0, ScalarType.Int32);
        try
        {
            Multiply(a, b, c, threads, kernel);
            return c;
        }
        catch
        {
            c.Dispose();
            throw;
        }
    }

    /// <summary>Writes A·Bᵀ into <paramref name="c"/>, an int32 tensor [M, N], contiguous, CPU.</summary>
    /// <param name="a">int8 [M, K], contiguous, CPU.</param>
    /// <param name="b">int8 [N, K], contiguous, CPU.</param>
    /// <param name="c">The result.</param>
    /// <param name="threads">Worker threads; 0 takes libtorch's intra-op thread count.</param>
    /// <param name="kernel">Instruction-set path.</param>
    public static void Multiply(Tensor a, Tensor b, Tensor c, int threads = 0, Int8Kernel kernel = Int8Kernel.Auto)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        ArgumentNullException.ThrowIfNull(c);
        RequireMatrix(a, ScalarType.Int8, nameof(a));
        RequireMatrix(b, ScalarType.Int8, nameof(b));
        RequireMatrix(c, ScalarType.Int32, nameof(c));
        if (a.shape[1] != b.shape[1])
        {
            throw new ArgumentException($"inner dimensions differ: A is [{a.shape[0]}, {a.shape[1]}], B is [{b.shape[0]}, {b.shape[1]}]");
        }
        if (c.shape[0] != a.shape[0] || c.shape[1] != b.shape[0])
        {
            throw new ArgumentException($"C must be [{a.shape[0]}, {b.shape[0]}], not [{c.shape[0]}, {c.shape[1]}]", nameof(c));
        }
        var output = new GemmOutput((int*)TensorMemory.Pointer(c), null, null, null);
        Run((sbyte*)TensorMemory.Pointer(a), (int)a.shape[0], (int)a.shape[1], (sbyte*)TensorMemory.Pointer(b), (int)b.shape[0], output, threads, kernel);
    }

    /// <summary>
    /// The engine behind <see cref="Multiply(Tensor, Tensor, Tensor, int, Int8Kernel)"/> and
    /// <see cref="Int8Linear"/>: A [m, k] and B [n, k] at raw addresses, the result as <paramref name="output"/> says.
    /// </summary>
    internal static void Run(sbyte* a, int m, int k, sbyte* b, int n, GemmOutput output, int threads, Int8Kernel kernel)
    {
        if (k > MaxInnerDimension)
        {
            throw new ArgumentException($"K = {k} exceeds {MaxInnerDimension}: int8 product sums could overflow int32");
        }
        if (kernel == Int8Kernel.Auto)
        {
            kernel = PreferredKernel;
        }
        if (!IsSupported(kernel))
        {
            throw new PlatformNotSupportedException($"this CPU does not support the {kernel} int8 kernel");
        }
        if (m == 0 || n == 0)
        {
            return;
        }
        if (threads <= 0)
        {
            threads = torch.get_num_threads();
        }
        switch (kernel)
        {
            case Int8Kernel.AvxVnni:
                Run<VnniKernel>(a, m, k, b, n, output, threads);
                break;
            case Int8Kernel.Avx512BW:
                Run<Avx512Kernel>(a, m, k, b, n, output, threads);
                break;
            case Int8Kernel.Avx2:
                Run<Avx2Kernel>(a, m, k, b, n, output, threads);
                break;
            default:
                Run<ScalarKernel>(a, m, k, b, n, output, threads);
                break;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Run<TKernel>(sbyte* a, int m, int k, sbyte* b, int n, GemmOutput output, int threads)
        where TKernel : struct, IInt8Kernel
    {
        // vpdpbusd sums a·(b + 128); 128·Σa per row, subtracted at the end, undoes the offset.
        int[]? offsets = null;
        if (TKernel.OffsetWeights)
        {
            offsets = new int[m];
            for (int i = 0; i < m; i++)
            {
                offsets[i] = 128 * VnniKernel.Sum(a + ((nint)i * k), k);
            }
        }
        // One k block when all of A fits the L2 budget (decoding, small batches): weight rows then stream
        // from memory in one sequential pass each.
        int kc = (long)m * k <= ActivationBlockBytes ? k : KBlock;
        int mc = Math.Max(4, ActivationBlockBytes / Math.Max(1, Math.Min(kc, k)) & ~3);
        var shape = new Shape(a, m, k, b, n, kc, mc, output, offsets);
        int tiles = (n + 2) / 3;
        int jobs = Math.Min(tiles, threads == 1 ? 1 : threads * 4);
        if (jobs <= 1)
        {
            Columns<TKernel>(shape, 0, n);
            return;
        }
        Parallel.For(0, jobs, new ParallelOptions { MaxDegreeOfParallelism = threads }, job =>
        {
            int first = (int)((long)tiles * job / jobs) * 3;
            int last = Math.Min(n, (int)((long)tiles * (job + 1) / jobs) * 3);
            Columns<TKernel>(shape, first, last);
        });
    }

    /// <summary>All rows of C for output columns [n0, n1).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Columns<TKernel>(in Shape s, int n0, int n1)
        where TKernel : struct, IInt8Kernel
    {
        int* tile = stackalloc int[12];
        int k = s.K;
        for (int k0 = 0; ; k0 += s.KBlock)
        {
            int length = Math.Min(s.KBlock, k - k0);
            int steps = length / TKernel.Width;
            int tail = k0 + (steps * TKernel.Width);
            bool first = k0 == 0, last = k0 + length == k;
            for (int m0 = 0; m0 < s.M; m0 += s.MBlock)
            {
                int m1 = Math.Min(s.M, m0 + s.MBlock);
                for (int j = n0; j < n1; j += 3)
                {
                    int cols = Math.Min(3, n1 - j);
                    // Missing columns of a ragged tile repeat the last real row; their sums are dropped.
                    sbyte* b0 = s.B + ((nint)j * k) + k0;
                    sbyte* b1 = cols > 1 ? b0 + k : b0;
                    sbyte* b2 = cols > 2 ? b1 + k : b1;
                    int i = m0;
                    for (; i + 4 <= m1; i += 4)
                    {
                        sbyte* rows = s.A + ((nint)i * k) + k0;
                        TKernel.Tile4x3(rows, k, b0, b1, b2, steps, tile);
                        if (last)
                        {
                            for (int r = 0; r < 4; r++)
                            {
                                AddTail<TKernel>(rows + ((nint)r * k), b0, b1, b2, tail - k0, length, tile + (3 * r));
                            }
                        }
                        Store(s, i, 4, j, cols, tile, first, last);
                    }
                    for (; i < m1; i++)
                    {
                        sbyte* row = s.A + ((nint)i * k) + k0;
                        TKernel.Tile1x3(row, b0, b1, b2, steps, tile);
                        if (last)
                        {
                            AddTail<TKernel>(row, b0, b1, b2, tail - k0, length, tile);
                        }
                        Store(s, i, 1, j, cols, tile, first, last);
                    }
                }
            }
            if (last)
            {
                break;
            }
        }
    }

    /// <summary>Adds the products of k in [from, to) (relative to the block) that the vector steps left.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddTail<TKernel>(sbyte* a, sbyte* b0, sbyte* b1, sbyte* b2, int from, int to, int* c)
        where TKernel : struct, IInt8Kernel
    {
        int offset = TKernel.OffsetWeights ? 128 : 0;
        for (int t = from; t < to; t++)
        {
            int x = a[t];
            c[0] += x * (b0[t] + offset);
            c[1] += x * (b1[t] + offset);
            c[2] += x * (b2[t] + offset);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Store(in Shape s, int i, int rows, int j, int cols, int* tile, bool first, bool last)
    {
        var o = s.Output;
        for (int r = 0; r < rows; r++)
        {
            int* sums = tile + (3 * r);
            int* partial = o.Partial + ((nint)(i + r) * s.N) + j;
            if (!first)
            {
                for (int q = 0; q < cols; q++)
                {
                    sums[q] += partial[q];
                }
            }
            if (!last)
            {
                for (int q = 0; q < cols; q++)
                {
                    partial[q] = sums[q];
                }
                continue;
            }
            int offset = s.Offsets is null ? 0 : s.Offsets[i + r];
            if (o.RowScale is null)
            {
                for (int q = 0; q < cols; q++)
                {
                    partial[q] = sums[q] - offset;
                }
                continue;
            }
            float rowScale = o.RowScale[i + r];
            float* y = (float*)partial;
            for (int q = 0; q < cols; q++)
            {
                float value = (sums[q] - offset) * rowScale * o.ColumnScale[j + q];
                y[q] = o.Bias is null ? value : value + o.Bias[j + q];
            }
        }
    }

    private static void RequireMatrix(Tensor t, ScalarType dtype, string name)
    {
        if (t.ndim != 2 || t.dtype != dtype)
        {
            throw new ArgumentException($"expected a 2-D {dtype} tensor, got {t.dtype} [{string.Join(", ", t.shape)}]", name);
        }
        if (t.shape[0] > int.MaxValue || t.shape[1] > int.MaxValue)
        {
            throw new ArgumentException("dimensions must fit int32", name);
        }
    }

    /// <summary>Operands and blocking of one multiply, shared by its worker threads.</summary>
    private readonly struct Shape(sbyte* a, int m, int k, sbyte* b, int n, int kBlock, int mBlock, GemmOutput output, int[]? offsets)
    {
        public readonly sbyte* A = a;
        public readonly int M = m;
        public readonly int K = k;
        public readonly sbyte* B = b;
        public readonly int N = n;
        public readonly int KBlock = Math.Max(1, kBlock);
        public readonly int MBlock = mBlock;
        public readonly GemmOutput Output = output;
        public readonly int[]? Offsets = offsets;
    }
}

/// <summary>
/// Where and how <see cref="Int8Gemm"/> writes C [m, n] (row-major, n per row): exact int32 when
/// <see cref="RowScale"/> is null, otherwise float32 C[i, j]·RowScale[i]·ColumnScale[j] (+ Bias[j]). The float
/// form holds int32 partial sums of earlier k blocks in the same memory until the last block finishes it.
/// </summary>
internal readonly unsafe struct GemmOutput(int* partial, float* rowScale, float* columnScale, float* bias)
{
    public readonly int* Partial = partial;
    public readonly float* RowScale = rowScale;
    public readonly float* ColumnScale = columnScale;
    public readonly float* Bias = bias;
}
