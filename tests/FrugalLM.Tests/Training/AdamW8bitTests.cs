using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Training;

public sealed class AdamW8bitTests
{
    public AdamW8bitTests() => TestSupport.Init();

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void DynamicMapHas256SortedCodesDenseNearZero(bool signed)
    {
        var map = BlockwiseQuantizer.DynamicMap(signed);
        Assert.Equal(256, map.Length);
        Assert.Equal(map.Order(), map);
        Assert.Equal(1.0f, map[^1]);
        Assert.Contains(0f, map);
        Assert.Equal(signed, map[0] < -0.9f);
        // Seven decades, each with more codes than the one below it; the smallest code is the midpoint of
        // [0.1, 1] x 1e-6 = 5.5e-7 (the unsigned map splits that decade in two: (0.1 + 0.55) / 2 x 1e-6), and
        // the signed map's most negative code is -(0.98594 + 1) / 2 = -0.99297.
        int decade(double lo, double hi) => map.Count(v => Math.Abs(v) >= lo && Math.Abs(v) < hi);
        Assert.True(decade(1e-6, 1e-5) >= 1);
        Assert.True(decade(0.1, 1.0) > decade(0.01, 0.1));
        Assert.Equal(signed ? 5.5e-7 : 3.25e-7, map.Where(v => v > 0).Min(), 1e-12);
        if (signed)
        {
            Assert.Equal(-0.99296875, map[0], 1e-6);
        }
    }

    [Fact]
    public void QuantizeDequantizeGivesTheNearestCodeOfEachBlock()
    {
        using var quantizer = new BlockwiseQuantizer(signed: true, 256);
        var map = BlockwiseQuantizer.DynamicMap(true).Select(v => (double)v).ToArray();
        using var values = randn(1000) * exp(randn(1000) * 2); // magnitudes over several orders
        var (codes, scales) = quantizer.Allocate(1000);
        quantizer.Quantize(values, codes, scales);
        using var restored = quantizer.Dequantize(codes, scales, [1000]);
        var v = values.data<float>().ToArray();
        var r = restored.data<float>().ToArray();
        var s = scales.data<float>().ToArray();
        for (int i = 0; i < 1000; i++)
        {
            double absmax = s[i / 256];
            // Brute force: no code of the map, scaled by the block's absmax, is closer (up to fp32 rounding).
            double best = map.Min(c => Math.Abs(c * absmax - v[i]));
            Assert.True(Math.Abs(r[i] - v[i]) <= best + 1e-6 * absmax, $"value {i}: {v[i]} -> {r[i]} (nearest code {best} away)");
        }
        Assert.Equal(4, scales.shape[0]);
        Assert.Equal(1024, codes.shape[0]);
    }

    [Fact]
    public void EightBitAdamWTracksFp32AdamWWithAQuarterOfTheState()
    {
        var random = new Random(13);
        var phrase = Enumerable.Range(0, 29).Select(_ => random.Next(101)).ToArray();
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 6000).Select(i => i % 3 == 0 ? random.Next(101) : phrase[i % 29]).ToArray(), 32);
        // MinTensorSize keeps small tensors in fp32; this model's matrices (64 x 144 = 9216) are above it.
        (double Loss, long StateBytes) Train(OptimizerKind kind)
        {
            using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 40, std: 0.05);
            var trainer = new Trainer(model, corpus, new TrainOptions { Steps = 60, MicroBatch = 4, LearningRate = 3e-3, Optimizer = kind, LogEvery = 60 });
            var result = trainer.Run();
            return (result.EvalLoss, trainer.Optimizer.StateBytes);
        }
        var fp32 = Train(OptimizerKind.AdamW);
        var int8 = Train(OptimizerKind.AdamW8bit);
        Assert.True(Math.Abs(int8.Loss - fp32.Loss) / fp32.Loss < 0.03, $"fp32 {fp32.Loss:F4}, 8-bit {int8.Loss:F4}");
        Assert.True(int8.StateBytes < fp32.StateBytes * 0.35, $"{int8.StateBytes} vs {fp32.StateBytes}");
    }
}
