namespace FrugalLM.Planning;

/// <summary>What <c>accelerate estimate-memory</c> prints for one dtype, in bytes.</summary>
/// <param name="Dtype">float32, float16, int8 or int4.</param>
/// <param name="TotalBytes">"Total Size": the model without its LM head, at that dtype.</param>
/// <param name="TrainingBytes">"Training using Adam": the largest of its four training figures; null ("N/A") for int8/int4.</param>
public sealed record AccelerateRow(string Dtype, long TotalBytes, long? TrainingBytes);

/// <summary>DeepSpeed's model-states estimate for one option set, in bytes.</summary>
/// <param name="Options">The options as DeepSpeed prints them.</param>
/// <param name="PerGpuBytes">"per GPU".</param>
/// <param name="PerCpuBytes">"per CPU".</param>
public sealed record DeepSpeedRow(string Options, long PerGpuBytes, long PerCpuBytes);

/// <summary>
/// The formulas of two widely used estimators, re-implemented so FrugalLM can print them side by side with its own
/// (docs/estimator.md explains the differences):
/// <list type="bullet">
/// <item><description>Hugging Face Accelerate's <c>estimate-memory</c> (src/accelerate/commands/estimate.py at commit
/// 16cb6eb): it instantiates <c>AutoModel</c>, i.e. the bare decoder without the LM head, sums parameters and
/// buffers, divides by 2/4/8 for float16/int8/int4, and reports for training the maximum (not the sum) of its
/// model, gradient, optimizer and step figures; <c>convert_bytes</c> divides by 1024 but prints "GB".</description></item>
/// <item><description>DeepSpeed's <c>estimate_zero2_model_states_mem_needs</c> and
/// <c>estimate_zero3_model_states_mem_needs</c> (deepspeed/runtime/zero at commit edaa722): parameters, gradients
/// and optimizer states only, no activations, times a 1.5 "additional buffer factor" on the CPU side.</description></item>
/// </list>
/// </summary>
public static class PeerEstimators
{
    /// <summary>Accelerate's rows for float32, float16, int8 and int4. Buffers (the rotary inv_freq, a few hundred
    /// bytes) are left out.</summary>
    public static IReadOnlyList<AccelerateRow> Accelerate(ModelSpec model)
    {
        ArgumentNullException.ThrowIfNull(model);
        // AutoModel drops the LM head; with tied embeddings the head owns no separate parameters anyway.
        long fp32 = 4 * (model.ParameterCount - model.LmHeadParameterCount);
        // estimate_training_usage: float32 -> max(model, grads, 2 x optimizer, 4 x step) = 4 x fp32 size;
        // float16/bfloat16 -> max(fp32, fp32 + fp16, 2 x fp32, 2 x fp32) = 2 x fp32 size; other dtypes -> N/A.
        return
        [
            new("float32", fp32, 4 * fp32),
            new("float16", fp32 / 2, 2 * fp32),
            new("int8", fp32 / 4, null),
            new("int4", fp32 / 8, null),
        ];
    }

    /// <summary>The largest parameter count of any single module's own parameters (DeepSpeed's largest_layer_params).</summary>
    public static long LargestModuleParameters(ModelSpec model)
    {
        ArgumentNullException.ThrowIfNull(model);
        long largestLinear = model.LayerLinears.Max(l => l.ParameterCount);
        return Math.Max(Math.Max(model.EmbeddingParameterCount, model.LmHeadParameterCount),
            Math.Max(largestLinear, model.PositionParameterCount));
    }

    /// <summary>ZeRO-2, per GPU and per CPU, with and without optimizer offload.</summary>
    public static IReadOnlyList<DeepSpeedRow> DeepSpeedZero2(ModelSpec model, int gpusPerNode = 1, int nodes = 1,
        double additionalBufferFactor = 1.5)
    {
        ArgumentNullException.ThrowIfNull(model);
        long p = model.ParameterCount;
        int gpus = gpusPerNode * nodes;
        return
        [
            new("offload_optimizer=cpu", 2 * p, (long)(p * Math.Max(4 * gpus, 16) * additionalBufferFactor)),
            // 2 B fp16 params + 18 B / gpus of fp16 grads, fp32 grads, fp32 params and two fp32 moments.
            new("offload_optimizer=none", 2 * p + (long)(18.0 * p / gpus), (long)(p * 4 * gpusPerNode * additionalBufferFactor)),
        ];
    }

    /// <summary>ZeRO-3, per GPU and per CPU, for the option sets DeepSpeed prints.</summary>
    public static IReadOnlyList<DeepSpeedRow> DeepSpeedZero3(ModelSpec model, int gpusPerNode = 1, int nodes = 1,
        double additionalBufferFactor = 1.5)
    {
        ArgumentNullException.ThrowIfNull(model);
        long p = model.ParameterCount, largest = LargestModuleParameters(model);
        int gpus = gpusPerNode * nodes;
        double gpusFactor = 1.0 / nodes;
        long largestMemory = 4 * largest;
        var rows = new List<DeepSpeedRow>();
        foreach (bool zeroInit in new[] { true, false })
        {
            rows.Add(new($"offload_param=cpu, offload_optimizer=cpu, zero_init={(zeroInit ? 1 : 0)}", largestMemory,
                (long)(p * (zeroInit ? 18 * gpusFactor : Math.Max(4 * gpusPerNode, 18 * gpusFactor)) * additionalBufferFactor)));
        }
        foreach (bool zeroInit in new[] { true, false })
        {
            rows.Add(new($"offload_param=none, offload_optimizer=cpu, zero_init={(zeroInit ? 1 : 0)}", largestMemory + (long)(2.0 * p / gpus),
                (long)(p * (zeroInit ? 16 * gpusFactor : Math.Max(4 * gpusPerNode, 16 * gpusFactor)) * additionalBufferFactor)));
        }
        foreach (bool zeroInit in new[] { true, false })
        {
            rows.Add(new($"offload_param=none, offload_optimizer=none, zero_init={(zeroInit ? 1 : 0)}", largestMemory + (long)(18.0 * p / gpus),
                (long)((zeroInit ? largest : p) * 4 * gpusPerNode * additionalBufferFactor)));
        }
        return rows;
    }
}
