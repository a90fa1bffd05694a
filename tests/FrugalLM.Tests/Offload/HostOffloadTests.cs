using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Offload;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using FrugalLM.Training;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Tests.Offload;

/// <summary>
/// Params offload (<c>--offload params|all</c>) on this CPU, where host and device are one memory: what the issue asks
/// of it here is placement, accounting and numerics. The decoder layers' frozen weights sit on the host tier and are
/// copied into two layer buffers as they run, so the streamed model must compute exactly what the resident one does,
/// train LoRA adapters to the same values, and hold the bytes the estimator gives each tier.
/// </summary>
[Collection(nameof(GlobalRandom))]
public sealed class HostOffloadTests
{
    public HostOffloadTests() => TestSupport.Init();

    private static LlamaConfig Config() => TestSupport.TinyConfig() with { NumHiddenLayers = 3 };

    private static RunPlan Plan(HfCheckpoint checkpoint, PrecisionMode precision, QuantizationKind quantization, OffloadPolicy offload, RunMode mode = RunMode.Generate) => new()
    {
        Model = checkpoint.Spec(),
        Mode = mode,
        Precision = precision,
        Quantization = quantization == QuantizationKind.Int8 ? Planning.Quantization.Int8 : Planning.Quantization.None,
        Optimizer = mode == RunMode.Generate ? OptimizerKind.None : OptimizerKind.AdamW,
        Lora = mode == RunMode.Generate ? null : new LoraSettings(4, 8, [LoraSettings.AllLinear], 0.1),
        Offload = offload,
        Device = ComputeDevice.Cpu,
    };

    [Theory]
    [InlineData(PrecisionMode.Fp32, QuantizationKind.None)]
    [InlineData(PrecisionMode.Bf16, QuantizationKind.None)]
    [InlineData(PrecisionMode.Bf16, QuantizationKind.Int8)]
    public void GeneratesTheTokensAndLogitsOfTheInMemoryModelWithTheEstimatorsBytes(PrecisionMode precision, QuantizationKind quantization)
    {
        using var dir = TestSupport.TempDir();
        StreamedBase.SaveRandom(dir.Path, ScalarType.BFloat16);
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        var prompt = Enumerable.Range(0, 5).Select(_ => Random.Shared.Next(3, 101)).ToArray();
        var options = new SamplingOptions { Temperature = 0, MaxNewTokens = 12 };
        var dtype = precision == PrecisionMode.Bf16 ? ScalarType.BFloat16 : ScalarType.Float32;
        Int8Options? int8 = quantization == QuantizationKind.Int8 ? new Int8Options() : null;

        using var memory = checkpoint.CreateModel(dtype, int8);
        using var memoryApplied = Techniques.Apply(memory, Plan(checkpoint, precision, quantization, OffloadPolicy.None));
        var hostPlan = Plan(checkpoint, precision, quantization, OffloadPolicy.Params);
        using var host = checkpoint.CreateModel(dtype, int8);
        // Scalars aside (an int8 layer's one-byte format tag, neither streamed nor estimated).
        long weightBytes = host.parameters().Concat(host.buffers()).Where(t => t.ndim > 0).Sum(TensorMemory.ByteCount);
        using var hostApplied = Techniques.Apply(host, hostPlan);
        memory.eval();
        host.eval();

        var offload = hostApplied.Offload!;
        Assert.True(offload.FromHost);
        Assert.Equal(3, offload.StreamedLayers);
        // Between uses the streamed layers hold nothing of their own: their weights are on the host tier.
        Assert.All(host.named_parameters().Where(p => p.name.StartsWith("model.layers.", StringComparison.Ordinal)),
            p => Assert.Equal(0, p.parameter.numel()));
        Assert.Equal(new TokenGenerator(memory).Generate(prompt, options).ToArray(), new TokenGenerator(host).Generate(prompt, options).ToArray());
        using (no_grad())
        {
            using var ids = tensor(prompt.Select(t => (long)t).ToArray()).unsqueeze(0);
            using var a = memory.forward(ids);
            using var b = host.forward(ids);
            Assert.True(a.Same(b), $"logits differ: {TensorAssert.RelativeError(b, a):E2}");
        }

        // One plan, two readers: two buffers of the largest layer, every weight on the host tier, nothing on disk.
        var estimate = MemoryEstimator.Estimate(hostPlan);
        Assert.Equal(DiskOffloadLayout.Slots * offload.LargestLayerBytes, offload.Stats.BufferBytes);
        Assert.Equal(offload.Stats.BufferBytes, estimate.Bytes("weight_stream"));
        Assert.Equal(weightBytes, estimate.PlacedBytes(MemoryTier.Host));
        Assert.Equal(estimate.Bytes("weights"), estimate.PlacedBytes(MemoryTier.Host));
        Assert.Equal(0, estimate.DiskBytes);
        Assert.Equal(0, MemoryEstimator.Estimate(hostPlan with { Offload = OffloadPolicy.None }).Bytes("weight_stream"));
    }

    [Theory]
    [InlineData(QuantizationKind.None, false)]
    [InlineData(QuantizationKind.Int8, false)]
    [InlineData(QuantizationKind.None, true)] // all: the adapters' step on the host too
    public void LoraOnAHostStreamedBaseTrainsLikeInMemory(QuantizationKind quantization, bool all)
    {
        using var dir = TestSupport.TempDir();
        StreamedBase.SaveRandom(dir.Path, ScalarType.Float32);
        var (corpus, options) = (StreamedBase.RandomCorpus(), StreamedBase.Options);
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        var plan = Plan(checkpoint, PrecisionMode.Fp32, quantization, OffloadPolicy.None, RunMode.Train);

        var (memoryLosses, memoryAdapters) = Train(checkpoint, plan, corpus, options);
        var (hostLosses, hostAdapters) = Train(checkpoint, plan with { Offload = all ? OffloadPolicy.All : OffloadPolicy.Params }, corpus, options with { OptimizerOnHost = all });

        // fp32; the recomputed forward feeds backward the same values, as for disk offload (1e-6: the order in which
        // gradients accumulate into the adapters' grad slots is the only freedom). The host optimizer is bit-identical to
        // the in-memory one (HostOptimizerTests), so `all` keeps the same bound.
        Assert.Equal(memoryLosses.Count, hostLosses.Count);
        for (int i = 0; i < memoryLosses.Count; i++)
        {
            Assert.Equal(memoryLosses[i], hostLosses[i], 1e-6);
        }
        foreach (var (name, expected) in memoryAdapters)
        {
            double error = TensorAssert.RelativeError(hostAdapters[name], expected);
            Assert.True(error < 1e-6, $"{name}: {error:E2}");
        }
    }

    [Fact]
    public void FullTrainingWithParamsOffloadIsRefusedNamingWhatToUseInstead()
    {
        using var model = new LlamaForCausalLM(Config());
        var plan = new RunPlan { Model = model.Spec("tiny"), Offload = OffloadPolicy.Params, Device = ComputeDevice.Cpu };
        var e = Assert.Throws<NotSupportedException>(() => Techniques.Apply(model, plan));
        Assert.Contains("LoRA", e.Message, StringComparison.Ordinal);
        Assert.Contains("--offload optimizer", e.Message, StringComparison.Ordinal);
    }

    private static (List<double> Losses, Dictionary<string, Tensor> Adapters) Train(HfCheckpoint checkpoint, RunPlan plan, ITrainingData corpus, TrainOptions options)
    {
        manual_seed(11);
        using var model = checkpoint.CreateModel(ScalarType.Float32, plan.Quantization.Kind == QuantizationKind.Int8 ? new Int8Options() : null);
        using var applied = Techniques.Apply(model, plan, seed: 5);
        Assert.Equal(plan.StreamsFromHost, applied.Offload is not null);
        var losses = new List<double>();
        new Trainer(model, corpus, options, applied.Precision).Run(p => losses.Add(p.Loss));
        var adapters = model.named_parameters().Where(p => p.name.Contains("lora_", StringComparison.Ordinal))
            .ToDictionary(p => p.name, p => p.parameter.detach().clone());
        return (losses, adapters);
    }
}
