namespace FrugalLM.Planning;

/// <summary>What the planner plans for.</summary>
public enum PlanTask
{
    /// <summary>Adapt a pre-trained model: full fine-tuning or LoRA, any base storage.</summary>
    Finetune,

    /// <summary>Train every weight from scratch or continue pre-training: full training only, unquantized.</summary>
    Pretrain,

    /// <summary>Generate text.</summary>
    Infer,
}

/// <summary>A planning question: which configurations of this model fit this device?</summary>
/// <param name="Model">The model.</param>
/// <param name="Gpu">The device (for its rates, bf16 support and host link).</param>
/// <param name="BudgetBytes">Device memory available to the run.</param>
/// <param name="SequenceLength">Tokens per sequence.</param>
/// <param name="Task">Fine-tune, pre-train or infer.</param>
/// <param name="Gpus">GPUs that may shard the model (FSDP is enumerated when above 1).</param>
/// <param name="Lora">The LoRA shape to try.</param>
/// <param name="Overhead">Framework memory.</param>
/// <param name="HostBudgetBytes">Host RAM for offloaded tensors, shared by all ranks (one node), or null for no limit.</param>
public sealed record PlanRequest(
    ModelSpec Model,
    GpuSpec Gpu,
    long BudgetBytes,
    int SequenceLength,
    PlanTask Task,
    int Gpus,
    LoraSettings Lora,
    FrameworkOverhead Overhead,
    long? HostBudgetBytes = null);

/// <summary>A configuration that fits.</summary>
/// <param name="Plan">The plan at its largest micro-batch.</param>
/// <param name="MaxMicroBatch">The largest micro-batch that fits.</param>
/// <param name="DeviceBytesAtOne">Device peak with one sequence.</param>
/// <param name="DeviceBytesAtMax">Device peak at the largest micro-batch.</param>
/// <param name="HostBytes">Host memory for offloaded tensors, all ranks together.</param>
/// <param name="TokensPerSecond">The step-time model's throughput bound (per GPU), used for ranking.</param>
public sealed record PlanCandidate(RunPlan Plan, int MaxMicroBatch, long DeviceBytesAtOne, long DeviceBytesAtMax, long HostBytes, double TokensPerSecond);

/// <summary>A configuration family that does not fit even in its leanest variant.</summary>
/// <param name="Family">Precision, base storage, what trains and the optimizer.</param>
/// <param name="Leanest">The variant with the smallest device peak at one sequence.</param>
/// <param name="DeviceBytesAtOne">That peak.</param>
/// <param name="HostBytes">Its host memory, all ranks together.</param>
/// <param name="Reason">Why it does not fit: the device, the host, or both.</param>
public sealed record PlanRejection(string Family, RunPlan Leanest, long DeviceBytesAtOne, long HostBytes, string Reason);

/// <summary>The planner's answer.</summary>
/// <param name="Request">The question.</param>
/// <param name="Fitting">Configurations that fit, best first.</param>
/// <param name="Rejected">Families with no fitting variant, closest to fitting first.</param>
/// <param name="Skipped">Why some combinations were not tried at all.</param>
public sealed record PlanResult(
    PlanRequest Request,
    IReadOnlyList<PlanCandidate> Fitting,
    IReadOnlyList<PlanRejection> Rejected,
    IReadOnlyList<string> Skipped);

/// <summary>
/// Enumerates combinations of precision, base quantization, LoRA, checkpointing, optimizer, offload and FSDP,
/// keeps those whose device peak at one sequence fits the budget (and whose offloaded tensors fit the host), finds each one's largest micro-batch and ranks
/// them by <see cref="StepTimeModel"/> throughput (highest first), then by larger micro-batch, then by fewer
/// techniques.
/// </summary>
public static class Planner
{
    /// <summary>Answers a planning question.</summary>
    public static PlanResult Plan(PlanRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (request.SequenceLength < 1)
        {
            throw new PlanException($"sequence length must be at least 1 (got {request.SequenceLength})");
        }
        if (request.Gpus < 1)
        {
            throw new PlanException($"the number of GPUs must be at least 1 (got {request.Gpus})");
        }
        if (request.BudgetBytes <= 0)
        {
            throw new PlanException("the memory budget must be positive");
        }
        var skipped = new List<string>();
        var fitting = new List<PlanCandidate>();
        var leanest = new Dictionary<string, MemoryEstimate>();
        long hostBudget = request.HostBudgetBytes ?? long.MaxValue;
        foreach (var plan in Enumerate(request, skipped))
        {
            var one = MemoryEstimator.Estimate(plan with { MicroBatchSize = 1 });
            if (one.DeviceBytes <= request.BudgetBytes && HostTotal(one) <= hostBudget)
            {
                int batch = MemoryEstimator.MaxMicroBatch(plan, request.BudgetBytes);
                var best = plan with { MicroBatchSize = batch };
                fitting.Add(new PlanCandidate(best, batch, one.DeviceBytes, MemoryEstimator.Estimate(best).DeviceBytes,
                    HostTotal(one), StepTimeModel.TokensPerSecond(best, request.Gpu)));
                continue;
            }
            var family = Family(plan);
            if (!leanest.TryGetValue(family, out var known) || Excess(one, request) < Excess(known, request))
            {
                leanest[family] = one;
            }
        }
        var fittingFamilies = fitting.Select(c => Family(c.Plan)).ToHashSet();
        var rejected = leanest.Where(kv => !fittingFamilies.Contains(kv.Key))
            .Select(kv => new PlanRejection(kv.Key, kv.Value.Plan, kv.Value.DeviceBytes, HostTotal(kv.Value), Reason(kv.Value, request)))
            .OrderBy(r => r.DeviceBytesAtOne)
            .ToArray();
        var ranked = fitting
            .OrderByDescending(c => c.TokensPerSecond)
            .ThenByDescending(c => c.MaxMicroBatch)
            .ThenBy(c => TechniqueCount(c.Plan))
            .ToArray();
        return new PlanResult(request, ranked, rejected, skipped);
    }

    /// <summary>How far a plan is from fitting: bytes over the device budget plus bytes over the host budget.</summary>
    private static long Excess(MemoryEstimate e, PlanRequest request) =>
        Math.Max(0, e.DeviceBytes - request.BudgetBytes)
        + Math.Max(0, HostTotal(e) - (request.HostBudgetBytes ?? long.MaxValue));

    private static string Reason(MemoryEstimate e, PlanRequest request)
    {
        bool device = e.DeviceBytes > request.BudgetBytes;
        bool host = HostTotal(e) > (request.HostBudgetBytes ?? long.MaxValue);
        return device && host ? "device and host" : device ? "device" : "host";
    }

    /// <summary>Host bytes of every rank of a plan together (the ranks of one node share its RAM).</summary>
    private static long HostTotal(MemoryEstimate e) => e.HostBytes * e.Plan.Sharding.WorldSize;

    /// <summary>The combinations the planner tries for a request.</summary>
    public static IEnumerable<RunPlan> Enumerate(PlanRequest request, ICollection<string>? skipped = null)
    {
        ArgumentNullException.ThrowIfNull(request);
        var gpu = request.Gpu;
        bool cpu = gpu.Device == ComputeDevice.Cpu;
        var precisions = new List<Precision> { Precision.Fp32 };
        if (gpu.SupportsBf16)
        {
            precisions.Add(Precision.Bf16);
            if (request.Task != PlanTask.Infer)
            {
                precisions.Add(Precision.Bf16Pure);
            }
        }
        else
        {
            skipped?.Add($"{gpu.Name} has no bf16: mixed precision is tried with fp16");
            precisions.Add(Precision.Fp16);
        }
        var baseline = new RunPlan
        {
            Model = request.Model,
            SequenceLength = request.SequenceLength,
            Device = gpu.Device,
            Overhead = request.Overhead,
            Loss = LossComputation.ChunkedDefault, // frugal train's default loss: the plans are of what it runs
        };
        if (request.Task == PlanTask.Infer)
        {
            foreach (var precision in precisions)
            {
                foreach (var quant in new[] { Quantization.None, Quantization.Int8, Quantization.Nf4 })
                {
                    foreach (var offload in cpu ? [OffloadPolicy.None] : new[] { OffloadPolicy.None, OffloadPolicy.Params })
                    {
                        yield return baseline with
                        {
                            Mode = RunMode.Generate,
                            Precision = precision,
                            Quantization = quant,
                            Optimizer = OptimizerKind.None,
                            Offload = offload,
                        };
                    }
                }
            }
            yield break;
        }
        var methods = new List<(Quantization Quant, LoraSettings? Lora)> { (Quantization.None, null) };
        if (request.Task == PlanTask.Finetune)
        {
            methods.Add((Quantization.None, request.Lora));
            methods.Add((Quantization.Int8, request.Lora));
            methods.Add((Quantization.Nf4, request.Lora));
        }
        var offloads = cpu ? [OffloadPolicy.None] : new[] { OffloadPolicy.None, OffloadPolicy.Optimizer, OffloadPolicy.All };
        var shardings = new List<Sharding> { Sharding.None };
        if (request.Gpus > 1)
        {
            if (cpu)
            {
                skipped?.Add("sharding is planned for GPUs only");
            }
            else
            {
                shardings.Add(new Sharding(ShardingStrategy.FullShard, request.Gpus));
                shardings.Add(new Sharding(ShardingStrategy.ShardGradOp, request.Gpus));
            }
        }
        foreach (var precision in precisions)
        {
            foreach (var (quant, lora) in methods)
            {
                foreach (var checkpointing in new[] { Checkpointing.None, Checkpointing.EveryLayer })
                {
                    foreach (var optimizer in new[] { OptimizerKind.AdamW, OptimizerKind.AdamW8bit })
                    {
                        foreach (var offload in offloads)
                        {
                            foreach (var sharding in shardings)
                            {
                                if (sharding.Strategy == ShardingStrategy.ShardGradOp && offload.Weights != MemoryTier.Device)
                                {
                                    continue; // ZeRO-2 keeps full weights on every GPU
                                }
                                yield return baseline with
                                {
                                    Precision = precision,
                                    Quantization = quant,
                                    Lora = lora,
                                    Checkpointing = checkpointing,
                                    Optimizer = optimizer,
                                    Offload = offload,
                                    Sharding = sharding,
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// <summary>The family a plan belongs to in the "does not fit" summary.</summary>
    public static string Family(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var storage = plan.Quantization.Kind == QuantizationKind.None ? "" : $" {PlanNames.Format(plan.Quantization.Kind)} base,";
        var what = plan.Trains ? (plan.Lora is null ? " full," : $" {plan.Lora},") : "";
        var optimizer = plan.Trains ? $" {PlanNames.Format(plan.Optimizer)}" : " generate";
        return $"{PlanNames.Format(plan.Precision)},{storage}{what}{optimizer}";
    }

    private static int TechniqueCount(RunPlan plan) =>
        (plan.Quantization.Kind != QuantizationKind.None ? 1 : 0) + (plan.Lora is null ? 0 : 1)
        + (plan.Checkpointing.Enabled ? 1 : 0) + (plan.Offload == OffloadPolicy.None ? 0 : 1)
        + (plan.Sharding.Strategy == ShardingStrategy.None ? 0 : 1) + (plan.Optimizer == OptimizerKind.AdamW8bit ? 1 : 0);
}

/// <summary>
/// A deliberately simple step-time model, used only to rank plans against each other:
/// matmul FLOPs at the device's peak rate for the plan's precision, plus recomputation, plus the bytes that cross the
/// host link for offloading. Quantized kernels, communication between GPUs, the CPU optimizer's own time and
/// kernel efficiency are not modelled.
/// </summary>
public static class StepTimeModel
{
    /// <summary>Forward matmul FLOPs per token: 2 x matmul parameters (decoder linears, adapters, LM head) plus attention's 2·L·s·d_attn.</summary>
    public static double ForwardFlopsPerToken(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var m = plan.Model;
        double linears = (double)m.NumHiddenLayers * m.LayerLinears.Sum(l => l.WeightCount);
        double adapters = plan.Lora is { } lora
            ? (double)m.NumHiddenLayers * plan.LoraTargets.Sum(t =>
            {
                var l = m.LayerLinears.First(x => x.Name == t);
                return (double)lora.Rank * (l.InFeatures + l.OutFeatures);
            })
            : 0;
        double head = (double)m.VocabSize * m.EmbeddingDim;
        double attention = 2.0 * m.NumHiddenLayers * plan.SequenceLength * m.AttentionDim;
        return 2 * (linears + adapters + head) + attention;
    }

    /// <summary>
    /// Tokens per second per GPU. Training: b·s tokens over (FLOPs / peak rate + host-link bytes / link bandwidth).
    /// Training FLOPs are forward x (1 + backward + recompute): backward is 2 forwards when weights get gradients
    /// and 1 when they are frozen (input gradients only); checkpointing recomputes one forward. Host-link bytes per
    /// micro-batch: streamed weights once per pass, gradients leaving the device, and (per optimizer step, shared by
    /// the accumulated micro-batches) the updated weights coming back from a host optimizer.
    /// Generation: b new tokens per decode step, which takes the longer of its FLOPs at the peak rate and reading
    /// the weights and a full-length KV cache at the device's memory bandwidth, plus streaming offloaded weights.
    /// </summary>
    public static double TokensPerSecond(RunPlan plan, GpuSpec gpu)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(gpu);
        double rate = gpu.Tflops(plan.Precision) * 1e12;
        if (rate <= 0 || plan.MicroBatchSize <= 0)
        {
            return 0;
        }
        var estimate = MemoryEstimator.Estimate(plan);
        var offload = plan.EffectiveOffload;
        double weightBytes = estimate.Bytes("weights");
        double link = gpu.HostLinkGBps * 1e9;
        double Transfer(double bytes) => bytes <= 0 ? 0 : link > 0 ? bytes / link : double.PositiveInfinity;
        if (!plan.Trains)
        {
            double batch = plan.MicroBatchSize;
            double compute = ForwardFlopsPerToken(plan) * batch / rate;
            double memory = (weightBytes + estimate.Bytes("kv_cache")) / (gpu.MemoryBandwidthGBps * 1e9);
            double step = Math.Max(compute, memory) + Transfer(offload.Weights != MemoryTier.Device ? weightBytes : 0);
            return batch / step;
        }
        double tokens = (double)plan.MicroBatchSize * plan.SequenceLength;
        double backward = plan.TrainsAllWeights ? 2 : 1;
        double recompute = plan.Checkpointing.Enabled ? 1 : 0;
        double traffic = 0;
        if (offload.Weights != MemoryTier.Device)
        {
            traffic += weightBytes * (2 + recompute);
        }
        if (offload.Gradients != MemoryTier.Device)
        {
            traffic += estimate.Bytes("gradients") + estimate.Bytes("gradients_head");
        }
        if (offload.OptimizerStates != MemoryTier.Device && offload.Weights == MemoryTier.Device)
        {
            traffic += weightBytes / plan.GradientAccumulationSteps;
        }
        double seconds = ForwardFlopsPerToken(plan) * (1 + backward + recompute) * tokens / rate + Transfer(traffic);
        return tokens / seconds;
    }
}
