using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

public sealed class PlannerTests
{
    private static PlanRequest Request(string model, string gpu, PlanTask task = PlanTask.Finetune, long? host = null, int gpus = 1)
    {
        var device = GpuCatalog.Find(gpu);
        return new PlanRequest(ModelCatalog.Resolve(model), device, device.MemoryBytes, 2048, task, gpus,
            LoraSettings.ArticleExample, FrameworkOverhead.Cuda, host);
    }

    [Fact]
    public void Llama7bOnA3090FitsWithLoraButNotFp32FullTraining()
    {
        var result = Planner.Plan(Request("llama-7b", "rtx3090", host: 16 * ByteSize.GiB));
        Assert.NotEmpty(result.Fitting);
        Assert.Contains(result.Fitting, c => c.Plan.Quantization.Kind == QuantizationKind.Nf4 && c.Plan.Lora is not null
            && c.Plan.Checkpointing.Enabled);
        Assert.DoesNotContain(result.Fitting, c => c.Plan.Precision == Precision.Fp32 && c.Plan.Lora is null);
        Assert.Contains(result.Rejected, r => r.Family == "fp32, full, adamw");
        foreach (var c in result.Fitting)
        {
            Assert.True(c.MaxMicroBatch >= 1);
            Assert.True(c.DeviceBytesAtMax <= result.Request.BudgetBytes);
            Assert.True(c.HostBytes <= 16 * ByteSize.GiB);
            Assert.True(MemoryEstimator.Estimate(c.Plan with { MicroBatchSize = c.MaxMicroBatch + 1 }).DeviceBytes > result.Request.BudgetBytes);
        }
    }

    [Fact]
    public void FittingPlansAreRankedByThroughputThenBatch()
    {
        var result = Planner.Plan(Request("llama-7b", "a100-80gb"));
        for (int i = 1; i < result.Fitting.Count; i++)
        {
            var (before, after) = (result.Fitting[i - 1], result.Fitting[i]);
            Assert.True(before.TokensPerSecond > after.TokensPerSecond
                || (before.TokensPerSecond == after.TokensPerSecond && before.MaxMicroBatch >= after.MaxMicroBatch));
        }
    }

    [Fact]
    public void RecomputationAndFullBackwardCostThroughput()
    {
        var gpu = GpuCatalog.Find("a100-80gb");
        var lora = new RunPlan
        {
            Model = ModelCatalog.Resolve("llama-7b"),
            Precision = Precision.Bf16,
            Lora = LoraSettings.ArticleExample,
            SequenceLength = 2048,
        };
        double plain = StepTimeModel.TokensPerSecond(lora, gpu);
        // Frozen weights: forward + 1 backward = 2 passes; checkpointing adds a third; full training 1 + 2.
        Assert.Equal(plain * 2 / 3, StepTimeModel.TokensPerSecond(lora with { Checkpointing = Checkpointing.EveryLayer }, gpu), 6);
        double full = StepTimeModel.TokensPerSecond(lora with { Lora = null }, gpu);
        Assert.True(full < plain);
    }

    [Fact]
    public void DecodingIsBoundByReadingWeightsAndCache()
    {
        var gpu = GpuCatalog.Find("rtx3090");
        var plan = new RunPlan
        {
            Model = ModelCatalog.Resolve("llama-7b"),
            Mode = RunMode.Generate,
            Precision = Precision.Bf16,
            Optimizer = OptimizerKind.None,
            SequenceLength = 2048,
        };
        // One sequence: 2 x 6.7e9 FLOPs take 0.2 ms at 71 TFLOP/s, reading 13.5 GB at 936 GB/s takes 14 ms.
        var e = MemoryEstimator.Estimate(plan);
        double expected = 1 / ((e.Bytes("weights") + e.Bytes("kv_cache")) / 936e9);
        Assert.Equal(expected, StepTimeModel.TokensPerSecond(plan, gpu), expected * 1e-12);
        Assert.True(StepTimeModel.TokensPerSecond(plan with { Quantization = Quantization.Nf4 }, gpu) > expected);
    }

    [Fact]
    public void GpusWithoutBf16PlanInFp16()
    {
        var result = Planner.Plan(Request("llama-7b", "v100-32gb", host: 16 * ByteSize.GiB));
        Assert.DoesNotContain(result.Fitting, c => c.Plan.Precision is Precision.Bf16 or Precision.Bf16Pure);
        Assert.Contains(result.Fitting, c => c.Plan.Precision == Precision.Fp16);
        Assert.Contains(result.Skipped, s => s.Contains("bf16"));
    }

    [Fact]
    public void NothingFitsWhenTheModelIsFarTooLarge()
    {
        var result = Planner.Plan(Request("llama-65b", "t4", PlanTask.Pretrain, host: ByteSize.GiB));
        Assert.Empty(result.Fitting);
        Assert.NotEmpty(result.Rejected);
    }

    [Fact]
    public void ShardingAcrossGpusIsEnumeratedAndDividesTheModel()
    {
        var result = Planner.Plan(Request("llama-7b", "rtx3090", PlanTask.Pretrain, host: 8 * ByteSize.GiB, gpus: 8));
        Assert.Contains(result.Fitting, c => c.Plan.Sharding.Strategy == ShardingStrategy.FullShard && c.Plan.Lora is null);
    }

    [Fact]
    public void InferenceFitsAndReportsConcurrentSequences()
    {
        var result = Planner.Plan(Request("llama-7b", "rtx3090", PlanTask.Infer));
        Assert.All(result.Fitting, c => Assert.Equal(RunMode.Generate, c.Plan.Mode));
        Assert.Contains(result.Fitting, c => c.Plan.Precision == Precision.Bf16 && c.MaxMicroBatch >= 1);
    }
}
