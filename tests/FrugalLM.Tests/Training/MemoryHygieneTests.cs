using FrugalLM.Inference;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Training;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Training;

/// <summary>
/// Native memory must not creep: after warm-up, 50 decode steps and 20 training steps leave the resident
/// set where it was (measured: within +-4 MiB of jitter from the allocator and the managed heap). A leaked
/// training step is far larger: its logits and their gradient alone are 2 x 8 x 128 x 8000 x 4 B = 62.5 MiB.
/// The subtler leak this guards against is TorchSharp's finalizer-freed native Scalars fragmenting the heap
/// (~1.5 MiB per step with this model before <see cref="StepScope"/> collected them; 19 steps exceed the
/// margin). Leaked decode steps hold logits, cache views and the sampler's sorted copies (~0.2 MiB each).
/// </summary>
[Collection(nameof(MemorySensitive))]
public sealed class MemoryHygieneTests(ITestOutputHelper output)
{
    private const long TrainMarginBytes = 12L << 20;
    private const long DecodeMarginBytes = 4L << 20;

    private static LlamaForCausalLM Model()
    {
        var config = TestSupport.TinyConfig() with { VocabSize = 8000, HiddenSize = 128, IntermediateSize = 352, HeadDim = 32, NumHiddenLayers = 3 };
        var model = new LlamaForCausalLM(config);
        model.InitializeWeights(seed: 17);
        return model;
    }

    [Fact]
    public void TrainingStepsDoNotGrowResidentMemory()
    {
        TestSupport.Init();
        using var model = Model();
        var random = new Random(5);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 60_000).Select(_ => random.Next(8000)).ToArray(), 128);
        var samples = new List<long>();
        var trainer = new Trainer(model, corpus, new TrainOptions { Steps = 25, MicroBatch = 8, LogEvery = 1, EvalBatches = 1 });
        trainer.Run(p => samples.Add(MemoryProbe.CurrentBytes));
        long afterWarmup = samples[4], end = samples[^2]; // the last report follows the final evaluation
        output.WriteLine("resident MiB per step: " + string.Join(" ", samples.Select(s => s >> 20)));
        output.WriteLine($"training: resident after 5 warm-up steps {MemoryProbe.Mib(afterWarmup)}, after 24 steps {MemoryProbe.Mib(end)}, max {MemoryProbe.Mib(samples.Max())}");
        Assert.True(end - afterWarmup < TrainMarginBytes, $"resident set grew by {MemoryProbe.Mib(end - afterWarmup)} over 19 steps");
    }

    [Fact]
    public void DecodeStepsDoNotGrowResidentMemory()
    {
        TestSupport.Init();
        using var model = Model();
        model.eval();
        var samples = new List<long>();
        int[] prompt = Enumerable.Range(1, 30).ToArray();
        var options = new SamplingOptions { MaxNewTokens = 60, Temperature = 0.9, TopK = 50, Seed = 3 };
        foreach (var _ in new TokenGenerator(model).Generate(prompt, options))
        {
            samples.Add(MemoryProbe.CurrentBytes);
        }
        Assert.Equal(60, samples.Count);
        long afterWarmup = samples[9], end = samples[^1];
        output.WriteLine($"decode: resident after 10 warm-up tokens {MemoryProbe.Mib(afterWarmup)}, after 60 {MemoryProbe.Mib(end)}");
        Assert.True(end - afterWarmup < DecodeMarginBytes, $"resident set grew by {MemoryProbe.Mib(end - afterWarmup)} over 50 decode steps");
    }
}

/// <summary>Tests that read the process's resident set run one at a time.</summary>
[CollectionDefinition(nameof(MemorySensitive), DisableParallelization = true)]
public sealed class MemorySensitive;
