using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

public sealed class SeedAndPeerTests
{
    [Fact]
    public void SeedMethodReproducesTheArticlesWorkedExample()
    {
        // "LLaMA-6B" in int8 with an 8-bit AdamW: 6 + 6 + 12 + 1.3 = 25.3 GB (decimal), activations per sequence
        // (4096 + 11008) x 32 x 2048 x 1 B = 989,855,744 B = 0.99 GB, and an 80 GB A100 takes
        // floor((80 - 25.3) / 0.989855744) = 55 sequences ("about 50", "(80 - 25.3) / 0.99 = 55").
        var plan = new RunPlan
        {
            Model = ModelCatalog.Resolve("llama-7b"),
            Quantization = Quantization.Int8,
            Optimizer = OptimizerKind.AdamW8bit,
            SequenceLength = 2048,
        };
        var seed = SeedMethod.Estimate(SeedMethod.InputsFor(plan, parameters: 6_000_000_000));
        Assert.Equal(6_000_000_000, seed.ParameterBytes);
        Assert.Equal(6_000_000_000, seed.GradientBytes);
        Assert.Equal(12_000_000_000, seed.OptimizerBytes);
        Assert.Equal(1_300_000_000, seed.CudaContextBytes);
        Assert.Equal(25_300_000_000, seed.ModelBytes);
        Assert.Equal(989_855_744, seed.ActivationBytesPerSequence);
        int batch = seed.MaxBatch(80_000_000_000);
        Assert.InRange(batch, 50, 55);
        Assert.Equal(55, batch);
    }

    [Fact]
    public void SeedMethodFp32AdamWMatchesTheArticlesFirstFigures()
    {
        // fp32: 6B x 4 = 24 GB of parameters, 24 GB of gradients, 6B x 8 = 48 GB of AdamW states.
        var plan = new RunPlan { Model = ModelCatalog.Resolve("llama-7b"), SequenceLength = 2048 };
        var seed = SeedMethod.Estimate(SeedMethod.InputsFor(plan, parameters: 6_000_000_000));
        Assert.Equal(24_000_000_000, seed.ParameterBytes);
        Assert.Equal(48_000_000_000, seed.OptimizerBytes);
        Assert.Equal(0, seed.MaxBatch(80_000_000_000)); // 97.3 GB of model part alone
    }

    [Fact]
    public void AccelerateDropsTheLmHeadAndTakesTheMaximum()
    {
        var rows = PeerEstimators.Accelerate(ModelCatalog.Resolve("llama-7b"));
        // AutoModel (no lm_head): 6,738,415,616 - 32000 x 4096 = 6,607,343,616 parameters x 4 B.
        Assert.Equal(26_429_374_464, rows[0].TotalBytes);
        // float32 training: max(model, grads, 2 x optimizer, 4 x step) = 4 x 26,429,374,464.
        Assert.Equal(105_717_497_856, rows[0].TrainingBytes);
        // float16: total halved; training max(fp32, 1.5 fp32, 2 fp32, 2 fp32) = 2 x fp32 size.
        Assert.Equal(13_214_687_232, rows[1].TotalBytes);
        Assert.Equal(52_858_748_928, rows[1].TrainingBytes);
        Assert.Equal(6_607_343_616, rows[2].TotalBytes);
        Assert.Null(rows[2].TrainingBytes);
        Assert.Equal(3_303_671_808, rows[3].TotalBytes);
        // convert_bytes divides by 1024 three times and prints "GB": 26,429,374,464 B shows as "24.61 GB".
        Assert.Equal(24.61, Math.Round(rows[0].TotalBytes / (double)ByteSize.GiB, 2));
    }

    [Fact]
    public void DeepSpeedZero2AndZero3ModelStates()
    {
        const long p = 6_738_415_616;
        var model = ModelCatalog.Resolve("llama-7b");
        var zero2 = PeerEstimators.DeepSpeedZero2(model);
        Assert.Equal((2 * p, 24 * p), (zero2[0].PerGpuBytes, zero2[0].PerCpuBytes));  // offload: 2P GPU; P x 16 x 1.5 CPU
        Assert.Equal((20 * p, 6 * p), (zero2[1].PerGpuBytes, zero2[1].PerCpuBytes));  // 2P + 18P; P x 4 x 1.5
        // The largest module is the embedding (and the LM head): 32000 x 4096 = 131,072,000 parameters.
        Assert.Equal(131_072_000, PeerEstimators.LargestModuleParameters(model));
        var zero3 = PeerEstimators.DeepSpeedZero3(model);
        long largest = 4L * 131_072_000;
        Assert.Equal((largest, 27 * p), (zero3[0].PerGpuBytes, zero3[0].PerCpuBytes));          // params + optimizer offloaded
        Assert.Equal((largest + 2 * p, 24 * p), (zero3[2].PerGpuBytes, zero3[2].PerCpuBytes));  // optimizer offloaded
        Assert.Equal((largest + 18 * p, 6L * 131_072_000), (zero3[4].PerGpuBytes, zero3[4].PerCpuBytes)); // nothing offloaded, zero_init
        Assert.Equal(6 * p, zero3[5].PerCpuBytes); // nothing offloaded, no zero_init: P x 4 x 1.5
    }

    [Fact]
    public void OurFp32EstimateExceedsEveryModelStatesOnlyFigure()
    {
        // The detailed estimate adds activations, logits and the context to the 16 B/parameter of model states,
        // so it must exceed both peers' single-GPU figures for fp32 AdamW training.
        var model = ModelCatalog.Resolve("llama-7b");
        var ours = MemoryEstimator.Estimate(new RunPlan { Model = model, SequenceLength = 2048 }).DeviceBytes;
        Assert.True(ours > PeerEstimators.Accelerate(model)[0].TrainingBytes);
        Assert.True(ours > 16 * model.ParameterCount);
    }
}
