using FrugalLM.Lora;
using FrugalLM.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Lora;

/// <summary>One wrapped layer: its forward against a float64 recomputation, initialization, scaling, merging.</summary>
public sealed class LoraLinearTests(Xunit.Abstractions.ITestOutputHelper output)
{
    static LoraLinearTests() => TestSupport.Init();

    private static (Linear Base, LoraLinear Layer) Wrapped(long inFeatures, long outFeatures, int rank, double alpha, bool rsLora, ScalarType dtype = ScalarType.Float32, long seed = 1)
    {
        var generator = new Generator((ulong)seed);
        var linear = nn.Linear(
            new Parameter(randn([outFeatures, inFeatures], generator: generator).mul_(0.2).to(dtype)),
            new Parameter(randn([outFeatures], generator: generator).mul_(0.1).to(dtype)));
        var layer = new LoraLinear(linear);
        layer.AddAdapter("default", rank, alpha, dropout: 0.1, rsLora, generator);
        using (no_grad())
        {
            layer.LoraB("default").copy_(randn([outFeatures, rank], generator: generator) * 0.3);
        }
        layer.SetActive("default");
        layer.eval();
        return (linear, layer);
    }

    // x Wᵀ + b + (x Aᵀ) Bᵀ · scale, all in float64 from the same (float32) values.
    private static Tensor Reference(Tensor x, Linear linear, LoraLinear layer, string adapter, double scale)
    {
        var x64 = x.to(ScalarType.Float64);
        var w = linear.weight.detach().to(ScalarType.Float64);
        var b = linear.bias!.detach().to(ScalarType.Float64);
        var a = layer.LoraA(adapter).detach().to(ScalarType.Float64);
        var bb = layer.LoraB(adapter).detach().to(ScalarType.Float64);
        return x64.matmul(w.t()) + b + x64.matmul(a.t()).matmul(bb.t()) * scale;
    }

    [Fact]
    public void ForwardEqualsAFloat64Reference()
    {
        var (linear, layer) = Wrapped(48, 40, rank: 6, alpha: 12, rsLora: false);
        using var x = randn(3, 5, 48);
        using var noGrad = no_grad();
        using var y = layer.forward(x);
        using var reference = Reference(x, linear, layer, "default", 12.0 / 6);
        // fp32 dot products of length 48 (and 6) against float64: rounding is ~1e-7 relative.
        double error = TensorAssert.RelativeError(y, reference);
        Assert.True(error < 1e-6, $"relative error {error:E2}");
        Assert.Equal(ScalarType.Float32, y.dtype);
        // The adapter's share is far above that tolerance, so the comparison sees it.
        using var baseOnly = linear.forward(x);
        Assert.True(TensorAssert.RelativeError(baseOnly, reference) > 1e-2);
    }

    [Fact]
    public void RsLoraScalesByAlphaOverRootRank()
    {
        var (linear, layer) = Wrapped(32, 24, rank: 16, alpha: 8, rsLora: true);
        Assert.Equal(8 / Math.Sqrt(16), layer.Scaling("default"), 12);
        using var x = randn(4, 32);
        using var noGrad = no_grad();
        using var y = layer.forward(x);
        using var rs = Reference(x, linear, layer, "default", 8 / Math.Sqrt(16));
        using var plain = Reference(x, linear, layer, "default", 8.0 / 16);
        Assert.True(TensorAssert.RelativeError(y, rs) < 1e-6);
        Assert.True(TensorAssert.RelativeError(y, plain) > 1e-2);
    }

    [Fact]
    public void FreshAdapterFollowsPeftInitializationAndChangesNothing()
    {
        var linear = nn.Linear(new Parameter(randn(64, 100)), null);
        var layer = new LoraLinear(linear);
        layer.AddAdapter("default", rank: 16, alpha: 32, dropout: 0, useRsLora: false, new Generator(5));
        layer.SetActive("default");
        var a = layer.LoraA("default");
        // kaiming_uniform_(a=√5) on fan_in 100: U(-0.1, 0.1), std 0.1/√3.
        Assert.Equal([16L, 100L], a.shape);
        Assert.True(a.abs().max().item<float>() <= 0.1f);
        Assert.InRange(a.std().item<float>(), 0.1 / Math.Sqrt(3) * 0.9, 0.1 / Math.Sqrt(3) * 1.1);
        Assert.Equal([64L, 16L], layer.LoraB("default").shape);
        Assert.True(layer.LoraB("default").eq(0).all().item<bool>());
        using var x = randn(2, 7, 100);
        using var noGrad = no_grad();
        Assert.True(layer.forward(x).Same(linear.forward(x)));
    }

    [Fact]
    public void LowPrecisionBaseKeepsFloat32AdapterAndItsOutputDtype()
    {
        var (linear, layer) = Wrapped(48, 40, rank: 4, alpha: 8, rsLora: false, ScalarType.BFloat16);
        Assert.Equal(ScalarType.Float32, layer.AdapterDtype);
        Assert.Equal(ScalarType.Float32, layer.LoraA("default").dtype);
        using var x = randn(3, 48).to(ScalarType.BFloat16);
        using var noGrad = no_grad();
        using var y = layer.forward(x);
        Assert.Equal(ScalarType.BFloat16, y.dtype);
        // bf16 keeps 8 bits of mantissa: the base matmul and the final cast cost ~1e-2 relative.
        using var reference = Reference(x, linear, layer, "default", 2);
        Assert.True(TensorAssert.RelativeError(y, reference) < 2e-2);
    }

    [Fact]
    public void DropoutActsOnTheAdapterInputOnlyWhileTraining()
    {
        var (linear, layer) = Wrapped(64, 32, rank: 8, alpha: 16, rsLora: false);
        layer.AddAdapter("half", 8, 16, dropout: 0.5, useRsLora: false);
        layer.SetActive("half");
        using (no_grad())
        {
            layer.LoraB("half").copy_(randn(32, 8));
        }
        using var x = randn(6, 64);
        using var noGrad = no_grad();
        using var evalOnce = layer.forward(x);
        Assert.True(layer.forward(x).Same(evalOnce), "eval mode (the mode the layer was in) must not drop");
        layer.train();
        using var first = layer.forward(x);
        using var second = layer.forward(x);
        Assert.True(TensorAssert.RelativeError(first, second) > 1e-3);
        layer.eval();
        Assert.True(layer.forward(x).Same(evalOnce));
    }

    [Fact]
    public void MergeThenUnmergeRestoresTheWeightWithinFp32Rounding()
    {
        var (linear, layer) = Wrapped(64, 48, rank: 8, alpha: 16, rsLora: false);
        using var before = linear.weight.detach().clone();
        using var x = randn(5, 64);
        using var noGrad = no_grad();
        using var unmerged = layer.forward(x);
        layer.Merge();
        Assert.Equal("default", layer.MergedAdapter);
        using var merged = layer.forward(x);
        Assert.True(TensorAssert.RelativeError(merged, unmerged) < 1e-6);
        Assert.True(TensorAssert.RelativeError(linear.weight, before) > 1e-2);
        layer.Unmerge();
        Assert.Null(layer.MergedAdapter);
        double error = TensorAssert.RelativeError(linear.weight, before);
        Assert.True(error <= 1e-6, $"weight relative error after merge + unmerge {error:E2}");
    }

    [Fact]
    public void WrapsAnotherQuantizedBaseButRefusesToMergeIntoIt()
    {
        // Only float Linear and Int8Linear bases know how to take a sum; any other ILinearLayer is refused.
        var stub = new Int8LinearStub(randn(24, 32));
        var layer = new LoraLinear(stub);
        layer.AddAdapter("default", 4, 8, 0, false, new Generator(2));
        layer.SetActive("default");
        using (no_grad())
        {
            layer.LoraB("default").copy_(randn(24, 4));
        }
        using var x = randn(3, 32);
        using var noGrad = no_grad();
        using var expected = x.matmul(stub.DequantizedWeight(ScalarType.Float32).t())
            + x.matmul(layer.LoraA("default").t()).matmul(layer.LoraB("default").t()) * 2;
        Assert.True(TensorAssert.RelativeError(layer.forward(x), expected) < 1e-6);
        var error = Assert.Throws<NotSupportedException>(() => layer.Merge());
        Assert.Contains("Int8LinearStub", error.Message);
        Assert.Contains("unmerged", error.Message);
        Assert.Null(layer.MergedAdapter);
    }

    // An Int8Linear quantized from a random float layer (with bias), wrapped, with a random non-zero adapter:
    // A from PEFT's initialization (uniform in ±1/√in), B N(0, 0.3²), scale alpha / r = 2. The update is about
    // half the size of W, far above the int8 rounding.
    private static (Int8Linear Base, LoraLinear Layer) WrappedInt8(long inFeatures, long outFeatures, int rank, long seed)
    {
        var generator = new Generator((ulong)seed);
        using var linear = nn.Linear(
            new Parameter(randn([outFeatures, inFeatures], generator: generator).mul_(0.2)),
            new Parameter(randn([outFeatures], generator: generator).mul_(0.1)));
        var int8 = Int8Linear.FromLinear(linear);
        var layer = new LoraLinear(int8);
        layer.AddAdapter("default", rank, 2.0 * rank, dropout: 0, useRsLora: false, generator);
        using (no_grad())
        {
            layer.LoraB("default").copy_(randn([outFeatures, rank], generator: generator) * 0.3);
        }
        layer.SetActive("default");
        layer.eval();
        return (int8, layer);
    }

    private static Tensor Dequantized64(Int8Linear layer) =>
        layer.Weight.to(ScalarType.Float64) * (layer.Scb.to(ScalarType.Float64) / 127).unsqueeze(1);

    [Fact]
    public void MergingIntoAnInt8BaseRequantizesTheSumAndReportsItsError()
    {
        var (int8, layer) = WrappedInt8(96, 80, rank: 8, seed: 11);
        using var noGrad = no_grad();
        // The float64 reference of the merged layer: W' = W_float + scale·B·A with W_float = weight·SCB/127.
        using var before = Dequantized64(int8);
        using var delta = layer.LoraB("default").to(ScalarType.Float64).matmul(layer.LoraA("default").to(ScalarType.Float64)) * 2.0;
        using var merged64 = before + delta;
        using var bias = int8.Bias!.detach().to(ScalarType.Float64);
        using var x = randn([4, 7, 96], generator: new Generator(12));
        using var x64 = x.to(ScalarType.Float64);
        using var reference = x64.matmul(merged64.t()) + bias;

        double reported = layer.Merge() ?? throw new Xunit.Sdk.XunitException("an int8 merge must report its error");
        Assert.Equal("default", layer.MergedAdapter);
        Assert.Equal(ScalarType.Int8, int8.Weight.dtype);

        // The weight: every element is within half a step (SCB'/254) of W', SCB' being W''s row absmax, so
        // the error is a rounding error, and the reported error is this error measured in float32.
        using var after = Dequantized64(int8);
        using var rowAbsMax = merged64.abs().amax([1L]);
        Assert.True(TensorAssert.RelativeError(int8.Scb, rowAbsMax) < 1e-6);
        using var halfStep = (rowAbsMax / 254).unsqueeze(1);
        double worst = ((after - merged64).abs() / halfStep).max().item<double>();
        Assert.True(worst <= 1 + 1e-4, $"an element moved {worst:F4} half-steps");
        double measured = TensorAssert.RelativeError(after, merged64);
        Assert.True(Math.Abs(measured - reported) <= 1e-3 * measured, $"reported {reported:E4}, measured in float64 {measured:E4}");
        // Uniform rounding of ±half a step gives step/√12 per element: for Gaussian rows of 96 (absmax ≈ 2.5σ),
        // ~2.5/(127·√12) ≈ 6e-3 of the weight's size. It is > 0 and well under 1e-2.
        Assert.InRange(reported, 1e-3, 1e-2);

        // The output. With the weight alone in error, x·(dequant W'' − W')ᵀ is as large relative to x·W'ᵀ as the
        // weight error is relative to W' (x is isotropic): the reported number is what the output sees.
        using var weightOnly = x64.matmul(after.t()) + bias;
        double outputFromWeight = TensorAssert.RelativeError(weightOnly, reference);
        Assert.InRange(outputFromWeight / reported, 0.75, 1.33);
        // The merged layer's forward also rounds each token to int8 (error e_x, measured on the same x); the two
        // independent roundings add at most e_w + e_x to first order.
        using var y = layer.forward(x);
        using var activations = int8.QuantizeActivations(x);
        using var xq = activations.Values.to(ScalarType.Float64) * (activations.AbsMax.to(ScalarType.Float64) / 127).unsqueeze(1);
        double activationError = TensorAssert.RelativeError(xq, x64.reshape(-1, 96));
        double error = TensorAssert.RelativeError(y, reference);
        Assert.True(error <= reported + activationError, $"forward error {error:E3}, weight {reported:E3} + activations {activationError:E3}");
        // The adapter's contribution is far above that tolerance, so the comparison sees the merge.
        using var baseOnly = x64.matmul(before.t()) + bias;
        Assert.True(TensorAssert.RelativeError(baseOnly, reference) > 20 * (reported + activationError));
        output.WriteLine($"int8 merge: reported {reported:E3}, measured {measured:E3}, output from weight {outputFromWeight:E3}, activations {activationError:E3}, forward {error:E3}");
    }

    [Fact]
    public void UnmergingAnInt8BaseIsRefusedAndLeavesTheMergedWeight()
    {
        var (int8, layer) = WrappedInt8(40, 32, rank: 4, seed: 21);
        Assert.NotNull(layer.Merge());
        Assert.True(layer.MergedIrreversibly);
        using var weight = int8.Weight.clone();
        using var scb = int8.Scb.clone();
        var error = Assert.Throws<NotSupportedException>(layer.Unmerge);
        Assert.Contains("int8", error.Message);
        Assert.Contains("reload the base", error.Message);
        // Every path that would unmerge refuses the same way and changes nothing.
        Assert.Throws<NotSupportedException>(() => layer.Enabled = false);
        Assert.Throws<NotSupportedException>(() => layer.SetActive(null));
        Assert.Throws<NotSupportedException>(() => layer.RemoveAdapter("default"));
        Assert.Equal("default", layer.MergedAdapter);
        Assert.True(layer.Enabled);
        Assert.True(int8.Weight.Same(weight));
        Assert.True(int8.Scb.Same(scb));
        // Merging again is the usual no-op.
        Assert.Null(layer.Merge());
        Assert.True(int8.Weight.Same(weight));
    }

    [Fact]
    public void RejectsARankThatDoesNotFitAndANonLinearBase()
    {
        var layer = new LoraLinear(nn.Linear(16, 8));
        var error = Assert.Throws<ArgumentException>(() => layer.AddAdapter("default", 9, 16, 0, false));
        Assert.Contains("between 1 and 8", error.Message);
        Assert.Throws<ArgumentException>(() => layer.AddAdapter("default", 0, 16, 0, false));
        Assert.Throws<ArgumentException>(() => new LoraLinear(nn.ReLU()));
        Assert.Throws<ArgumentException>(() => layer.AddAdapter("bad.name", 2, 4, 0, false));
    }
}
