using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Tests.Cli;
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
/// margin). Leaked decode steps of the bundled model hold logits, cache views and the sampler's copies (the
/// logits alone are 0.2 MiB a step: its vocabulary is 50,257 tokens); the native heap is checked as well
/// (measured: +0.2 MiB over 50 tokens, the KV cache's growth).
/// </summary>
[Collection(nameof(MemorySensitive))]
public sealed class MemoryHygieneTests(ITestOutputHelper output)
{
    private const long TrainMarginBytes = 12L << 20;
    private const double DecodeMarginMib = 4;

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
        // A child `frugal generate` on the bundled model: the test process's resident set moves with whatever the
        // other tests left behind (its managed heap alone is ~170 MiB by the time this runs, and a late
        // collection or a lingering thread moved it by 5.8 MiB in one CI run), the child's only with decoding.
        var (exit, _, stderr) = FrugalProcess.RunWith(new Dictionary<string, string> { ["FRUGAL_MEMTRACE"] = "1" },
            "generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "60",
            "--temperature", "0.9", "--top-k", "50", "--seed", "3", "--threads", "1");
        Assert.True(exit == 0, stderr);
        var tokens = stderr.Split('\n')
            .Where(line => line.StartsWith(MemoryTrace.Prefix + " token", StringComparison.Ordinal))
            .Select(line => (Resident: MibAfter(line, "resident"), Heap: MibAfter(line, "heap")))
            .ToList();
        Assert.True(tokens.Count >= 40, $"only {tokens.Count} tokens were generated:\n{stderr}");
        var (afterWarmup, end) = (tokens[9], tokens[^1]);
        output.WriteLine($"decode of {tokens.Count} tokens: resident after 10 warm-up tokens {afterWarmup.Resident:F1} MiB, at the end {end.Resident:F1} MiB; native heap {afterWarmup.Heap:F1} -> {end.Heap:F1} MiB");
        Assert.True(end.Resident - afterWarmup.Resident < DecodeMarginMib, $"resident set grew by {end.Resident - afterWarmup.Resident:F1} MiB over {tokens.Count - 10} decode steps");
        Assert.True(end.Heap - afterWarmup.Heap < DecodeMarginMib, $"native heap grew by {end.Heap - afterWarmup.Heap:F1} MiB over {tokens.Count - 10} decode steps");
    }

    private static double MibAfter(string line, string key)
    {
        var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        return double.Parse(parts[Array.IndexOf(parts, key) + 1], System.Globalization.CultureInfo.InvariantCulture);
    }
}

/// <summary>Tests that read the process's resident set run one at a time.</summary>
[CollectionDefinition(nameof(MemorySensitive), DisableParallelization = true)]
public sealed class MemorySensitive;
