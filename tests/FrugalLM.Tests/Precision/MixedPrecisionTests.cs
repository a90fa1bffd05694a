using FrugalLM.Models.Llama;
using FrugalLM.Precision;
using FrugalLM.Training;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Tests.Precision;

public sealed class MixedPrecisionTests
{
    public MixedPrecisionTests() => TestSupport.Init();

    private static TokenCorpus Corpus(int seed)
    {
        var random = new Random(seed);
        return TokenCorpus.FromTokens(Enumerable.Range(0, 2000).Select(_ => random.Next(101)).ToArray(), 16);
    }

    [Fact]
    public void LossScalerHalvesOnOverflowAndGrowsAfterTheInterval()
    {
        var scaler = new LossScaler();
        Assert.Equal(65536.0, scaler.Scale);
        scaler.Update(foundInfOrNaN: true);
        Assert.Equal(32768.0, scaler.Scale);
        Assert.Equal(1, scaler.SkippedSteps);
        for (int i = 0; i < 1999; i++)
        {
            scaler.Update(false);
        }
        Assert.Equal(32768.0, scaler.Scale);
        scaler.Update(false);
        Assert.Equal(65536.0, scaler.Scale);
        Assert.Equal(0, scaler.CleanSteps);
        for (int i = 0; i < 1500; i++)
        {
            scaler.Update(false);
        }
        scaler.Update(true); // an overflow resets the count of clean steps
        for (int i = 0; i < 1999; i++)
        {
            scaler.Update(false);
        }
        Assert.Equal(32768.0, scaler.Scale);
    }

    [Fact]
    public void Fp16StepWithOverflowIsSkippedAndTheScaleHalved()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 6, std: 0.1);
        // 2^60 makes every fp16 gradient overflow on the first step.
        using var mixed = MixedPrecision.Apply(model, PrecisionMode.Fp16, scaler: new LossScaler(initialScale: Math.Pow(2, 60)));
        var corpus = Corpus(1);
        var trainer = new Trainer(model, corpus, new TrainOptions { MicroBatch = 2 }, mixed);
        var before = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.clone());
        var masters = mixed.Masters.ToDictionary(m => m.Name, m => m.Master.clone());
        var result = trainer.Step(corpus.TrainBatches(2, 0, 0).Take(1).ToList());
        Assert.True(result.Skipped);
        Assert.Equal(Math.Pow(2, 59), mixed.Scaler!.Scale);
        foreach (var (name, p) in model.named_parameters())
        {
            Assert.True(p.Same(before[name]), name);
        }
        foreach (var (name, master) in mixed.Masters)
        {
            Assert.True(master.Same(masters[name]), name);
        }
        // With a sane scale the next steps go through and change the weights.
        mixed.Scaler.Restore(1024, 0, 1);
        var next = trainer.Step(corpus.TrainBatches(2, 0, 0).Skip(1).Take(1).ToList());
        Assert.False(next.Skipped);
        Assert.False(model.named_parameters().First().parameter.Same(before[model.named_parameters().First().name]));
    }

    [Theory]
    [InlineData(PrecisionMode.Bf16, 1)]
    [InlineData(PrecisionMode.Bf16, 2)]
    [InlineData(PrecisionMode.Fp16, 1)]
    public void MastersAreFp32AndTheComputeWeightsTheirRoundedCopies(PrecisionMode mode, int accumulation)
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 7, std: 0.1);
        var original = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.clone());
        using var mixed = MixedPrecision.Apply(model, mode, accumulation);
        var dtype = mode == PrecisionMode.Fp16 ? ScalarType.Float16 : ScalarType.BFloat16;
        var masters = mixed.Masters.ToDictionary(m => m.Name, m => m.Master);
        Assert.Equal(original.Keys.Order(), masters.Keys.Order());
        foreach (var (name, master) in masters)
        {
            Assert.Equal(ScalarType.Float32, master.dtype);
            Assert.True(master.Same(original[name]), name); // taken before the cast: exact
        }
        var corpus = Corpus(2);
        var trainer = new Trainer(model, corpus, new TrainOptions { MicroBatch = 2, GradientAccumulation = accumulation, LearningRate = 1e-2 }, mixed);
        for (int i = 0; i < 3; i++)
        {
            var result = trainer.Step(corpus.TrainBatches(2, 0, 0).Skip(i * accumulation).Take(accumulation).ToList());
            Assert.False(result.Skipped);
            Assert.True(double.IsFinite(result.Loss));
        }
        foreach (var (name, p) in model.named_parameters())
        {
            Assert.Equal(dtype, p.dtype);
            Assert.True(p.Same(masters[name].to(dtype)), name);
            Assert.False(masters[name].Same(original[name]), name);
        }
    }

    [Fact]
    public void Bf16MixedTracksFp32Closely()
    {
        // Same data, same start: after 30 steps the bf16 run's fp32 masters stay near the fp32 run's weights
        // (bf16 keeps 8 bits of mantissa in the forward/backward; masters keep the updates exact).
        var corpus = Corpus(3);
        double Train(PrecisionMode mode)
        {
            using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 8, std: 0.05);
            using var mixed = MixedPrecision.Apply(model, mode);
            var trainer = new Trainer(model, corpus, new TrainOptions { Steps = 30, MicroBatch = 4, LearningRate = 3e-3, LogEvery = 30 }, mixed);
            return trainer.Run().EvalLoss;
        }
        double fp32 = Train(PrecisionMode.Fp32), bf16 = Train(PrecisionMode.Bf16);
        Assert.True(Math.Abs(bf16 - fp32) / fp32 < 0.02, $"fp32 {fp32}, bf16 {bf16}");
    }
}
