using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Offload;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Offload;

/// <summary>
/// LoRA fine-tuning on a frozen base streamed from disk against the same run with the base in memory: each streamed
/// layer runs without a graph in forward and is read again and recomputed in backward, which is the same arithmetic in
/// the same order (CPU kernels are deterministic for equal inputs), dropout masks replayed from the saved RNG state.
/// </summary>
[Collection(nameof(GlobalRandom))]
public sealed class DiskOffloadTrainingTests
{
    public DiskOffloadTrainingTests() => TestSupport.Init();

    [Theory]
    [InlineData(QuantizationKind.None)]
    [InlineData(QuantizationKind.Int8)]
    public void LoraOnAStreamedBaseTrainsLikeInMemory(QuantizationKind quantization)
    {
        using var dir = TestSupport.TempDir();
        StreamedBase.SaveRandom(dir.Path, ScalarType.BFloat16);
        var (corpus, options) = (StreamedBase.RandomCorpus(), StreamedBase.Options);
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        var plan = new RunPlan
        {
            Model = checkpoint.Spec(),
            Quantization = quantization == QuantizationKind.Int8 ? Planning.Quantization.Int8 : Planning.Quantization.None,
            Lora = new LoraSettings(4, 8, [LoraSettings.AllLinear], 0.1),
            Device = ComputeDevice.Cpu,
        };

        var (memoryLosses, memoryAdapters) = Train(checkpoint, plan, corpus, options);
        var (diskLosses, diskAdapters) = Train(checkpoint, plan with { Offload = DiskOffload.Policy(checkpoint) }, corpus, options);

        // fp32 throughout; the recomputed forward feeds backward the same values. Bounded at 1e-6 relative (ordering of
        // gradient accumulation into the adapters' grad slots is the only freedom, as for checkpointing's 1e-6 check).
        Assert.Equal(memoryLosses.Count, diskLosses.Count);
        for (int i = 0; i < memoryLosses.Count; i++)
        {
            Assert.Equal(memoryLosses[i], diskLosses[i], 1e-6);
        }
        Assert.Equal(memoryAdapters.Keys.Order(), diskAdapters.Keys.Order());
        foreach (var (name, expected) in memoryAdapters)
        {
            double error = TensorAssert.RelativeError(diskAdapters[name], expected);
            Assert.True(error < 1e-6, $"{name}: {error:E2}");
        }
    }

    private static (List<double> Losses, Dictionary<string, Tensor> Adapters) Train(HfCheckpoint checkpoint, RunPlan plan, ITrainingData corpus, TrainOptions options)
    {
        manual_seed(11);
        using var model = checkpoint.CreateModel(ScalarType.Float32, plan.Quantization.Kind == QuantizationKind.Int8 ? new Int8Options() : null,
            plan.StreamsWeights ? DiskOffload.Streamed(0) : null);
        using var applied = Techniques.Apply(model, plan, seed: 5, weights: checkpoint);
        Assert.Equal(plan.StreamsWeights, applied.Offload is not null);
        var losses = new List<double>();
        new Trainer(model, corpus, options, applied.Precision).Run(p => losses.Add(p.Loss));
        if (applied.Offload is { } offload)
        {
            // Each step runs every layer twice (forward, and backward's recompute); the two buffers still hold the last two
            // layers at the turn to backward and the first two at the next step's start: 2 x 3 - 4 reads per step.
            Assert.True(offload.Stats.Loads >= options.Steps * (2 * 3 - 4), $"{offload.Stats.Loads} loads");
        }
        var adapters = model.named_parameters().Where(p => p.name.Contains("lora_", StringComparison.Ordinal))
            .ToDictionary(p => p.name, p => p.parameter.detach().clone());
        return (losses, adapters);
    }
}

/// <summary>The fixtures of the streamed-base tests (disk and params offload): a random 3-layer tiny LLaMA folder, and a
/// random corpus and short training run for LoRA on it.</summary>
internal static class StreamedBase
{
    public static TrainOptions Options { get; } = new() { Steps = 5, MicroBatch = 2, LearningRate = 1e-2, GradClip = 1.0, LogEvery = 1, Seed = 3 };

    public static void SaveRandom(string folder, ScalarType stored)
    {
        using var source = new LlamaForCausalLM(TestSupport.TinyConfig() with { NumHiddenLayers = 3 });
        source.InitializeWeights(Random.Shared.NextInt64(1, 1 << 30), std: 0.1);
        HfCheckpoint.Save(source, folder, stored);
    }

    public static TokenCorpus RandomCorpus()
    {
        var random = new Random(Random.Shared.Next());
        return TokenCorpus.FromTokens(Enumerable.Range(0, 40 * 17).Select(_ => random.Next(101)).ToArray(), 16);
    }
}
