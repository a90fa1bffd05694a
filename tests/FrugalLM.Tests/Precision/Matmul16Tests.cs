using FrugalLM.Precision;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Precision;

/// <summary>
/// The fp32 product of 16-bit operands (<see cref="Matmul16.Upcast"/>) against a float64 recomputation from
/// the same 16-bit values. The only rounding is of each result to 16 bits (the fp32 accumulation error of a
/// 96-term dot product is ~1e-6, far below), so the relative error is bounded by half a unit in the last
/// place: 2^-9 = 2.0e-3 for bf16 (8 significant bits), 2^-12 = 2.4e-4 for fp16 (11 bits); asserted with a
/// factor of 2 margin for the norm of many rounded entries.
/// </summary>
public sealed class Matmul16Tests
{
    public Matmul16Tests() => TestSupport.Init();

    // The third size has 300 tokens x 30,000 outputs: the fp32 product runs in tiles of 4 Mi / 300 = 13,981
    // output features, so the tiled forward and backward are checked across tile boundaries (and a ragged last tile).
    [Theory]
    [InlineData(ScalarType.BFloat16, 4e-3, 5, 40)]
    [InlineData(ScalarType.Float16, 5e-4, 5, 40)]
    [InlineData(ScalarType.BFloat16, 4e-3, 100, 30_000)]
    public void UpcastLinearMatchesFloat64InValueAndGradients(ScalarType dtype, double tolerance, int tokens, int outFeatures)
    {
        using var generator = new Generator((ulong)Random.Shared.NextInt64());
        var x = randn([3, tokens, 96], generator: generator).to(dtype).requires_grad_(true);
        var w = randn([outFeatures, 96], generator: generator).to(dtype).requires_grad_(true);
        var b = randn([outFeatures], generator: generator).to(dtype).requires_grad_(true);
        var gy = randn([3, tokens, outFeatures], generator: generator).to(dtype);

        var y = Matmul16.Upcast(x, w, b);
        Assert.Equal(dtype, y.dtype);
        y.backward([gy]);

        var x64 = x.detach().to(ScalarType.Float64).requires_grad_(true);
        var w64 = w.detach().to(ScalarType.Float64).requires_grad_(true);
        var b64 = b.detach().to(ScalarType.Float64).requires_grad_(true);
        var y64 = nn.functional.linear(x64, w64, b64);
        y64.backward([gy.to(ScalarType.Float64)]);

        Assert.True(TensorAssert.RelativeError(y, y64) < tolerance, $"output {TensorAssert.RelativeError(y, y64):E2}");
        Assert.Equal(dtype, x.grad!.dtype);
        Assert.True(TensorAssert.RelativeError(x.grad!, x64.grad!) < tolerance, $"input gradient {TensorAssert.RelativeError(x.grad!, x64.grad!):E2}");
        Assert.True(TensorAssert.RelativeError(w.grad!, w64.grad!) < tolerance, $"weight gradient {TensorAssert.RelativeError(w.grad!, w64.grad!):E2}");
        Assert.True(TensorAssert.RelativeError(b.grad!, b64.grad!) < tolerance, $"bias gradient {TensorAssert.RelativeError(b.grad!, b64.grad!):E2}");
    }

    [Fact]
    public void FrozenWeightGetsNoGradientAndNoBiasIsAccepted()
    {
        // A generator of its own: the global one replays dropout masks in tests that run in parallel.
        using var generator = new Generator((ulong)Random.Shared.NextInt64());
        var x = randn([7, 32], generator: generator).to(ScalarType.BFloat16).requires_grad_(true);
        var w = randn([12, 32], generator: generator).to(ScalarType.BFloat16);
        var y = Matmul16.Upcast(x, w);
        y.sum().backward();
        Assert.NotNull(x.grad);
        Assert.Null(w.grad);
        // d(sum y)/dx: every row is the sum of W's rows.
        Assert.True(TensorAssert.RelativeError(x.grad!.to(ScalarType.Float64), w.to(ScalarType.Float64).sum(dim: 0).expand(7, 32)) < 4e-3);
        Assert.True(TensorAssert.RelativeError(y, nn.functional.linear(x.detach().to(ScalarType.Float64), w.to(ScalarType.Float64))) < 4e-3);
    }
}
