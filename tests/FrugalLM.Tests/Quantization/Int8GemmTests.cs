using FrugalLM.Quantization;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Quantization;

/// <summary>Every int8 kernel against an exact int64 matrix product.</summary>
public sealed class Int8GemmTests
{
    public Int8GemmTests() => TestSupport.Init();

    public static TheoryData<Int8Kernel> Kernels => new() { Int8Kernel.Auto, Int8Kernel.Scalar, Int8Kernel.Avx2, Int8Kernel.Avx512BW, Int8Kernel.AvxVnni };

    // (M, N, K): single elements, one token, K below / at / past each vector width (16, 32), ragged tiles
    // in both M (not a multiple of 4) and N (not a multiple of 3), and a shape past the L2 budget so that
    // k splits into two blocks (4096 + 7) and rows into two groups (64 + 6).
    private static readonly (int M, int N, int K)[] Shapes =
    [
        (1, 1, 1), (1, 5, 15), (2, 3, 16), (3, 4, 17), (4, 6, 31), (5, 7, 32), (6, 8, 33), (7, 11, 64),
        (1, 37, 67), (9, 13, 129), (13, 10, 257), (17, 2, 1000), (70, 8, 4103),
    ];

    [Theory]
    [MemberData(nameof(Kernels))]
    public void MatchesAnExactInt64ProductOnEveryShape(Int8Kernel kernel)
    {
        if (!Int8Gemm.IsSupported(kernel))
        {
            using var a0 = randint(-128, 128, [2, 40], dtype: ScalarType.Int8);
            Assert.Throws<PlatformNotSupportedException>(() => Int8Gemm.Multiply(a0, a0, kernel: kernel).Dispose());
            return;
        }
        foreach (var (m, n, k) in Shapes)
        {
            using var scope = NewDisposeScope();
            // The full int8 range, -128 and 127 included.
            var a = randint(-128, 128, [m, k], dtype: ScalarType.Int8);
            var b = randint(-128, 128, [n, k], dtype: ScalarType.Int8);
            var expected = Reference(a, b);
            foreach (int threads in new[] { 1, 3 })
            {
                var c = Int8Gemm.Multiply(a, b, threads, kernel);
                Assert.True(c.to(ScalarType.Int64).Same(expected), $"{kernel} differs at M={m} N={n} K={k} with {threads} threads");
            }
        }
    }

    [Theory]
    [MemberData(nameof(Kernels))]
    public void ExtremeValuesNeitherSaturateNorOverflow(Int8Kernel kernel)
    {
        if (!Int8Gemm.IsSupported(kernel))
        {
            Assert.False(kernel is Int8Kernel.Auto or Int8Kernel.Scalar);
            return;
        }
        using var scope = NewDisposeScope();
        // Only -128 and 127: every adjacent pair of products is ±16256..16384, where a u8 x s8 pair sum with
        // an offset operand would saturate int16; and K = 4099 all -128 puts C at 128·128·K ≈ 6.7e7.
        int k = 4099;
        var a = randint(0, 2, [6, k], dtype: ScalarType.Int16).mul(255).sub(128).to(ScalarType.Int8);
        var b = randint(0, 2, [5, k], dtype: ScalarType.Int16).mul(255).sub(128).to(ScalarType.Int8);
        a[0] = full(k, -128, ScalarType.Int8);
        b[0] = full(k, -128, ScalarType.Int8);
        var c = Int8Gemm.Multiply(a, b, kernel: kernel);
        Assert.True(c.to(ScalarType.Int64).Same(Reference(a, b)));
        Assert.Equal(128L * 128 * k, c[0, 0].item<int>());
    }

    [Fact]
    public void ReadsRowsAtAnyAddressAndWritesIntoAGivenTensor()
    {
        using var scope = NewDisposeScope();
        // Row 1 of a [4, 67] tensor starts 67 bytes in: no operand is aligned to anything.
        var bigA = randint(-128, 128, [4, 67], dtype: ScalarType.Int8);
        var bigB = randint(-128, 128, [9, 67], dtype: ScalarType.Int8);
        var a = bigA.narrow(0, 1, 3);
        var b = bigB.narrow(0, 1, 8);
        var c = full(3, 8, 12345, ScalarType.Int32);
        Int8Gemm.Multiply(a, b, c);
        Assert.True(c.to(ScalarType.Int64).Same(Reference(a, b)));
    }

    [Fact]
    public void RejectsMismatchedOrOversizedOperands()
    {
        using var scope = NewDisposeScope();
        var a = randint(-128, 128, [3, 10], dtype: ScalarType.Int8);
        var b = randint(-128, 128, [4, 11], dtype: ScalarType.Int8);
        Assert.Throws<ArgumentException>(() => Int8Gemm.Multiply(a, b));
        Assert.Throws<ArgumentException>(() => Int8Gemm.Multiply(a.to(ScalarType.Int32), a));
        Assert.Throws<ArgumentException>(() => Int8Gemm.Multiply(a, a, empty(3, 4, ScalarType.Int32)));
        var wide = randint(-128, 128, [1, Int8Gemm.MaxInnerDimension + 1], dtype: ScalarType.Int8);
        Assert.Throws<ArgumentException>(() => Int8Gemm.Multiply(wide, wide));
        Assert.Throws<ArgumentException>(() => Int8Gemm.Multiply(a.t(), a.t()));
    }

    private static Tensor Reference(Tensor a, Tensor b) => a.to(ScalarType.Int64).mm(b.to(ScalarType.Int64).t());
}
