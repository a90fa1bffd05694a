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
        (double Loss, long StateBytes, long Expected8Bit, Dictionary<string, ScalarType> Dtypes) Train(OptimizerKind kind)
        {
            using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 40, std: 0.05);
            var trainer = new Trainer(model, corpus, new TrainOptions { Steps = 60, MicroBatch = 4, LearningRate = 3e-3, Optimizer = kind, LogEvery = 60 });
            var result = trainer.Run();
            // The layout the optimizer promises: fp32 moments (8 B) for the embedding and tensors under
            // min_8bit_size, else one byte per value padded to whole blocks plus an fp32 absmax per block, twice.
            long expected = model.named_parameters().Sum(p =>
            {
                long n = p.parameter.numel(), blocks = (n + AdamW8bitLayout.BlockSize - 1) / AdamW8bitLayout.BlockSize;
                return p.name == "model.embed_tokens.weight" || n < AdamW8bitLayout.MinTensorSize ? 8 * n : 2 * blocks * (AdamW8bitLayout.BlockSize + 4);
            });
            var dtypes = trainer.Optimizer.StateTensors().ToDictionary(t => t.Name, t => t.Tensor.dtype);
            return (result.EvalLoss, trainer.Optimizer.StateBytes, expected, dtypes);
        }
        var fp32 = Train(OptimizerKind.AdamW);
        var int8 = Train(OptimizerKind.AdamW8bit);
        Assert.True(Math.Abs(int8.Loss - fp32.Loss) / fp32.Loss < 0.03, $"fp32 {fp32.Loss:F4}, 8-bit {int8.Loss:F4}");
        Assert.Equal(int8.Expected8Bit, int8.StateBytes);
        Assert.True(int8.StateBytes < fp32.StateBytes * 0.45, $"{int8.StateBytes} vs {fp32.StateBytes}");
        Assert.Equal(ScalarType.Float32, int8.Dtypes["exp_avg.model.embed_tokens.weight"]);
        Assert.Equal(ScalarType.Byte, int8.Dtypes["exp_avg.lm_head.weight"]);
        Assert.Equal(ScalarType.Byte, int8.Dtypes["exp_avg_sq.model.layers.0.mlp.up_proj.weight"]);
        Assert.Equal(ScalarType.Float32, int8.Dtypes["exp_avg.model.layers.0.self_attn.k_proj.weight"]); // 2048 values
    }
}
