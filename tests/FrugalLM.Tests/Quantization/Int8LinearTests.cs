using FrugalLM.Models;
using FrugalLM.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Quantization;

/// <summary>LLM.int8() semantics of <see cref="Int8Linear"/>: quantization, outlier split, accuracy, gradients.</summary>
public sealed class Int8LinearTests
{
    public Int8LinearTests() => TestSupport.Init();

    [Fact]
    public void StoresRowAbsmaxInt8WeightsAsBitsandbytesDoes()
    {
        using var scope = NewDisposeScope();
        var w = randn(6, 40) * 0.1;
        w[2] = zeros(40);
        using var layer = Int8Linear.FromLinear(Linear(w, randn(6)));
        var absmax = w.abs().amax([1L]);
        Assert.True(layer.Scb.Same(absmax));
        var expected = (w * (127.0f / absmax.where(absmax.gt(0), ones_like(absmax))).unsqueeze(1)).round().to(ScalarType.Int8);
        Assert.True(layer.Weight.Same(expected));
        Assert.Equal(127, layer.Weight[0].abs().max().item<sbyte>());
        Assert.True(layer.Weight[2].eq(0).all().item<bool>());
        // Dequantized, every element is within half a step (absmax / 254) of the original.
        var error = (layer.DequantizedWeight(ScalarType.Float32) - w).abs();
        Assert.True(error.le((absmax / 254 * 1.0001).unsqueeze(1)).all().item<bool>());
        Assert.Equal(ScalarType.BFloat16, layer.DequantizedWeight(ScalarType.BFloat16).dtype);
        Assert.Equal((40L, 6L), LinearLayers.Describe(layer));
    }

    [Fact]
    public void RegistersWeightAndScbBuffersUnderHfNames()
    {
        using var layer = Int8Linear.FromLinear(Linear(randn(5, 8), randn(5)));
        var buffers = layer.named_buffers().ToDictionary(b => b.name, b => b.buffer);
        Assert.Equal(ScalarType.Int8, buffers["weight"].dtype);
        Assert.Equal(ScalarType.Float32, buffers["SCB"].dtype);
        Assert.Equal(["bias"], layer.named_parameters().Select(p => p.name));
        Assert.False(layer.Bias!.requires_grad);
    }

    [Fact]
    public void ModuleToDtypeKeepsTheInt8WeightAndFloat32Scales()
    {
        using var scope = NewDisposeScope();
        using var layer = Int8Linear.FromLinear(Linear(randn(6, 20), randn(6)));
        var weight = layer.Weight.clone();
        var scb = layer.Scb.clone();
        layer.to(ScalarType.BFloat16);
        Assert.True(layer.Weight.Same(weight));
        Assert.True(layer.Scb.Same(scb));
        Assert.Equal(ScalarType.BFloat16, layer.Bias!.dtype);
        Assert.Equal(ScalarType.BFloat16, layer.forward(randn(3, 20).to(ScalarType.BFloat16)).dtype);
    }

    [Fact]
    public void NormalInputsMatchTheFloatLayerToInt8Precision()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = randn(128, 1024) * 0.05;
        var bias = randn(128) * 0.1;
        var x = randn(16, 1024);
        using var layer = Int8Linear.FromLinear(Linear(w, bias));
        var expected = nn.functional.linear(x.to(ScalarType.Float64), w.to(ScalarType.Float64), bias.to(ScalarType.Float64));
        double error = TensorAssert.RelativeError(layer.forward(x), expected);
        // Absmax int8 rounds each element by up to half a step, absmax/254: for Gaussian rows of 1024 the
        // absmax is ~3.4σ, so each operand carries ~3.4/(127·√12) ≈ 0.8 % relative noise and the product
        // ~1.1 %. Above 2e-3: the layer did quantize; below 2e-2: no more error than int8 itself brings.
        Assert.InRange(error, 2e-3, 2e-2);
    }

    [Fact]
    public void DecompositionCutsTheErrorOfLargeFeaturesTenfold()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // A weight exactly representable in int8 (CB·SCB/127 with ±127 in every row), so the float layer and
        // the int8 one hold the same weights and the error is the activations' alone, which the split targets.
        var cb = randint(-127, 128, [128, 1024]).to(ScalarType.Float32);
        cb[.., 0] = full(128, 127f);
        var scb = rand(128) * 0.2 + 0.05;
        var w = cb * (scb / 127).unsqueeze(1);
        var x = WithOutlierFeatures(16, 1024);
        var expected = x.to(ScalarType.Float64).mm(w.to(ScalarType.Float64).t());
        using var split = Int8Linear.FromLinear(Linear(w, null), threshold: 6.0);
        using var plain = Int8Linear.FromLinear(Linear(w, null), threshold: 0.0);
        double withSplit = TensorAssert.RelativeError(split.forward(x), expected);
        double without = TensorAssert.RelativeError(plain.forward(x), expected);
        // Without the split, features of 20..60 set each token's absmax, so every ordinary feature (σ = 1) is
        // rounded to steps of ~0.3..0.5; with it, the ordinary features use steps of ~3.4/127 ≈ 0.027 and the
        // large ones are exact: ~15x less error in practice.
        Assert.True(without >= 10 * withSplit, $"split {withSplit:E2} vs plain {without:E2}");
    }

    [Fact]
    public void DecompositionCutsTheErrorSevenfoldAtLlama7bWidthAgainstFloatWeights()
    {
        // At the width where LLM.int8() reports outlier features (d_model 4096, 6.7B models), Gaussian float
        // weights, three features of magnitude 20..60. Without the split, each token's absmax is ~40x the
        // typical feature, so all 4093 ordinary features round to steps of ~0.3..0.5 (error ~8%); with it,
        // what remains is the weight's own int8 rounding (row steps of ~3.9σ/127: error ~1%), which the split
        // cannot remove. Measured: 7.4x here, against 15x when the weights are exactly representable (the test
        // above, which isolates the activation error the decomposition addresses).
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = randn(64, 4096) * 0.02;
        var x = WithOutlierFeatures(8, 4096);
        var expected = x.to(ScalarType.Float64).mm(w.to(ScalarType.Float64).t());
        using var split = Int8Linear.FromLinear(Linear(w, null), threshold: 6.0);
        using var plain = Int8Linear.FromLinear(Linear(w, null), threshold: 0.0);
        double withSplit = TensorAssert.RelativeError(split.forward(x), expected);
        double without = TensorAssert.RelativeError(plain.forward(x), expected);
        Assert.True(without >= 6 * withSplit, $"split {withSplit:E2} vs plain {without:E2}");
        Assert.True(withSplit < 1.5e-2, $"split error {withSplit:E2}");
    }

    [Fact]
    public void DecompositionHelpsAgainstTheOriginalFloatWeightsToo()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = randn(128, 1024) * 0.05;
        var x = WithOutlierFeatures(16, 1024);
        var expected = x.to(ScalarType.Float64).mm(w.to(ScalarType.Float64).t());
        using var split = Int8Linear.FromLinear(Linear(w, null), threshold: 6.0);
        using var plain = Int8Linear.FromLinear(Linear(w, null), threshold: 0.0);
        double withSplit = TensorAssert.RelativeError(split.forward(x), expected);
        double without = TensorAssert.RelativeError(plain.forward(x), expected);
        // Against Gaussian float weights the outlier columns still carry the weight's own int8 rounding
        // (bitsandbytes dequantizes them from CB as well), which large features magnify: the split then wins
        // ~5x here, not 15x. 3x is the floor this configuration must keep.
        Assert.True(without >= 3 * withSplit, $"split {withSplit:E2} vs plain {without:E2}");
        Assert.True(withSplit < 1.5e-2, $"split error {withSplit:E2}");
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void FindsOutlierColumnsExactly(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var x = randn(5, 40).clamp(-5, 5);
        x[1, 3] = tensor(6.0f);     // exactly at the threshold counts
        x[4, 10] = tensor(-6.0f);
        x[0, 11] = tensor(41.5f);
        x[2, 0] = tensor(-7.5f);
        x[3, 20] = tensor(5.9f);    // just below does not
        using var layer = Int8Linear.FromLinear(Linear(randn(7, 40), null), threshold: 6.0);
        using var activations = layer.QuantizeActivations(x.to(dtype));
        Assert.Equal([0L, 3L, 10L, 11L], activations.OutlierColumns.data<long>().ToArray());
        // Outlier columns are zero in the int8 part, in every row.
        Assert.True(activations.Values.index_select(1, activations.OutlierColumns).eq(0).all().item<bool>());
        using var plain = Int8Linear.FromLinear(Linear(randn(7, 40), null), threshold: 0.0);
        using var none = plain.QuantizeActivations(x.to(dtype));
        Assert.Equal(0, none.OutlierColumns.numel());
        Assert.Equal(127, none.Values[0].abs().max().item<sbyte>());
    }

    [Theory]
    [InlineData(3, 300, 70)]
    [InlineData(35, 4103, 20)] // 70 x 4103 activations pass the kernel's L2 budget: two k blocks, two row groups
    public void Int8PathEqualsAFloat64RecomputationOfTheSameQuantizedMath(int batch, int k, int n)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = randn(n, k) * 0.05;
        var bias = randn(n);
        var x = WithOutlierFeatures(batch * 3, k).view(batch, 3, k);
        using var layer = Int8Linear.FromLinear(Linear(w, bias), threshold: 6.0);
        using var acts = layer.QuantizeActivations(x);
        var x2 = x.reshape(-1, k);
        var outliers = acts.OutlierColumns;
        Assert.True(outliers.numel() > 0);

        // Activations: torch's own fp32 arithmetic on the same formula, bit for bit.
        var keep = ones(k).index_fill_(0, outliers, 0);
        var kept = x2 * keep;
        var absmax = kept.abs().amax([1L]);
        Assert.True(acts.AbsMax.Same(absmax));
        // The row scale as the kernel forms it, one correctly rounded fp32 division (torch's scalar / tensor may
        // take a reciprocal first and differ by an ulp, which flips a rare product sitting on a .5 boundary).
        var scales = tensor(absmax.data<float>().ToArray().Select(a => 127f / a).ToArray());
        Assert.True(acts.Values.Same((kept * scales.unsqueeze(1)).round().to(ScalarType.Int8)));

        // Output: exact integer products, then the dequantization and outlier terms in float64.
        var q = acts.Values.to(ScalarType.Float64);
        var cb = layer.Weight.to(ScalarType.Float64);
        var scb = layer.Scb.to(ScalarType.Float64);
        var int8Part = q.mm(cb.t()) * (acts.AbsMax.to(ScalarType.Float64) / 127).unsqueeze(1) * (scb / 127).unsqueeze(0);
        var wDeq = cb * (scb / 127).unsqueeze(1);
        var outlierPart = x2.to(ScalarType.Float64).index_select(1, outliers).mm(wDeq.index_select(1, outliers).t());
        var expected = int8Part + outlierPart + bias.to(ScalarType.Float64);
        var y = layer.forward(x);
        Assert.Equal([batch, 3L, n], y.shape);
        // fp32 dequantization: a handful of roundings of 2^-24 each per element.
        double error = TensorAssert.RelativeError(y.reshape(-1, n), expected);
        Assert.True(error < 1e-6, $"relative error {error:E2}");
    }

    [Fact]
    public void BFloat16InputsGiveTheFloat32ResultRounded()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var layer = Int8Linear.FromLinear(Linear(randn(33, 70) * 0.1, randn(33)), threshold: 6.0);
        var x16 = WithOutlierFeatures(5, 70).to(ScalarType.BFloat16);
        var y16 = layer.forward(x16);
        Assert.Equal(ScalarType.BFloat16, y16.dtype);
        Assert.True(y16.Same(layer.forward(x16.to(ScalarType.Float32)).to(ScalarType.BFloat16)));
    }

    [Theory]
    [InlineData(40, 24, false)]
    [InlineData(4100, 1100, true)] // more weight rows than one dequantized block (4 Mi elements) holds
    public void InputGradientGoesThroughTheDequantizedWeight(int k, int n, bool trainBias)
    {
        using var scope = NewDisposeScope();
        var bias = randn(n);
        using var layer = Int8Linear.FromLinear(Linear(randn(n, k) * 0.05, bias));
        layer.Bias!.requires_grad = trainBias;
        var x = randn(2, 3, k).requires_grad_(true);
        var y = layer.forward(x);
        Assert.True(y.requires_grad);
        var g = randn(2, 3, n);
        (y * g).sum().backward();
        var expected = g.reshape(-1, n).to(ScalarType.Float64).mm(layer.DequantizedWeight(ScalarType.Float64)).reshape(2, 3, k);
        // fp32 accumulation over n terms: ~1e-7 relative; 1e-5 leaves room for blocked summation order.
        double error = TensorAssert.RelativeError(x.grad!, expected);
        Assert.True(error < 1e-5, $"relative error {error:E2}");
        if (trainBias)
        {
            Assert.True(TensorAssert.RelativeError(layer.Bias.grad!, g.sum([0L, 1L])) < 1e-6);
        }
        else
        {
            Assert.Null(layer.Bias.grad);
        }
    }

    [Fact]
    public void BuildsNoGraphWhenNothingNeedsAGradient()
    {
        using var scope = NewDisposeScope();
        using var layer = Int8Linear.FromLinear(Linear(randn(8, 16), randn(8)));
        Assert.False(layer.forward(randn(2, 16)).requires_grad);
        using (no_grad())
        {
            Assert.False(layer.forward(randn(2, 16).requires_grad_(true)).requires_grad);
        }
        var x = randn(2, 16, dtype: ScalarType.BFloat16).requires_grad_(true);
        var y = layer.forward(x);
        y.sum().backward();
        Assert.Equal(ScalarType.BFloat16, x.grad!.dtype);
    }

    [Fact]
    public void RejectsBadInputs()
    {
        using var scope = NewDisposeScope();
        using var layer = Int8Linear.FromLinear(Linear(randn(8, 16), null));
        Assert.Throws<ArgumentException>(() => layer.forward(randn(2, 15)));
        Assert.Throws<ArgumentOutOfRangeException>(() => Int8Linear.FromLinear(Linear(randn(8, 16), null), threshold: -1));
        Assert.Throws<ArgumentException>(() => new Int8Linear(randn(8, 16), ones(8), null, 6.0));
        Assert.Throws<ArgumentException>(() => new Int8Linear(zeros(8, 16, ScalarType.Int8), ones(7), null, 6.0));
    }

    /// <summary>Gaussian activations whose columns 5, 17 and 40 hold ±20..60 in every row, as LLM.int8() describes.</summary>
    internal static Tensor WithOutlierFeatures(int rows, int features)
    {
        var x = randn(rows, features);
        var columns = tensor(new long[] { 5, 17, 40 });
        var signs = randint(0, 2, [rows, 3]).to(ScalarType.Float32) * 2 - 1;
        x.index_copy_(1, columns, (rand(rows, 3) * 40 + 20) * signs);
        return x;
    }

    internal static Linear Linear(Tensor weight, Tensor? bias) =>
        nn.Linear(new Parameter(weight.clone(), requires_grad: false), bias is null ? null : new Parameter(bias.clone(), requires_grad: false));
}
