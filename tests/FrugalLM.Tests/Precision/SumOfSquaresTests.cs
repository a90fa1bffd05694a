using FrugalLM.Native;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Precision;

/// <summary>The C# sum of squares behind gradient norms, against a float64 recomputation by libtorch.</summary>
public sealed class SumOfSquaresTests
{
    public SumOfSquaresTests() => TestSupport.Init();

    [Theory]
    [InlineData(ScalarType.Float32, 1, 1)]
    [InlineData(ScalarType.Float32, 777_777, 2)] // several chunks, a ragged last one and a vector tail
    [InlineData(ScalarType.BFloat16, 777_777, 2)]
    [InlineData(ScalarType.BFloat16, 13, 1)]
    [InlineData(ScalarType.Float16, 300_001, 2)]
    public void MatchesAFloat64Recomputation(ScalarType dtype, long count, int threads)
    {
        using var values = (randn(count) * 3).to(dtype);
        Assert.True(SumOfSquares.TryCompute(values, threads, out double sum));
        // The reference widens the same stored values exactly and sums in float64; both sum in double, in different
        // orders: ~count x 1e-16 relative at most.
        using var wide = values.to(ScalarType.Float64);
        double expected = wide.square().sum().item<double>();
        Assert.Equal(1.0, sum / expected, 10);
    }

    [Fact]
    public void InfinityAndNaNPropagate()
    {
        using var values = randn(1000).to(ScalarType.BFloat16);
        values[17] = tensor(float.PositiveInfinity).to(ScalarType.BFloat16);
        Assert.True(SumOfSquares.TryCompute(values, 2, out double sum));
        Assert.True(double.IsPositiveInfinity(sum));
        values[400] = tensor(float.NaN).to(ScalarType.BFloat16);
        Assert.True(SumOfSquares.TryCompute(values, 2, out sum));
        Assert.True(double.IsNaN(sum));
    }

    [Fact]
    public void OfFallsBackToLibtorchsNormWhereItCannotRead()
    {
        using var matrix = (randn(300, 401) * 2).to(ScalarType.BFloat16);
        using var transposed = matrix.t();
        using var wide = matrix.to(ScalarType.Float64);
        double expected = wide.square().sum().item<double>();
        // Read in place: double sums, ~1e-12. Through libtorch's fp32 norm, squared: fp32 accumulation over 120,300
        // values, doubled by the square (measured 5.7e-6 relative): bounded at 5e-5.
        Assert.Equal(1.0, SumOfSquares.Of(matrix) / expected, 10);
        Assert.Equal(1.0, SumOfSquares.Of(transposed) / expected, 4);
    }

    [Fact]
    public void LeavesWhatItCannotReadToLibtorch()
    {
        using var matrix = randn(30, 40);
        using var transposed = matrix.t();
        Assert.False(SumOfSquares.TryCompute(transposed, 2, out _));
        using var doubles = randn(10, dtype: ScalarType.Float64);
        Assert.False(SumOfSquares.TryCompute(doubles, 2, out _));
    }
}
