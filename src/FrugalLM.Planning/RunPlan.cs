namespace FrugalLM.Planning;

/// <summary>What a run does with the model.</summary>
public enum RunMode
{
    /// <summary>Forward, backward and optimizer steps.</summary>
    Train,

    /// <summary>Forward passes only, with a KV cache.</summary>
    Generate,
}

/// <summary>Numeric precision of a run.</summary>
public enum Precision
{
    /// <summary>Everything in fp32.</summary>
    Fp32,

    /// <summary>Training: bf16 compute with fp32 masters. Inference: bf16 weights.</summary>
    Bf16,

    /// <summary>Training: fp16 compute with fp32 masters and loss scaling. Inference: fp16 weights.</summary>
    Fp16,

    /// <summary>Training with bf16 weights and no fp32 masters.</summary>
    Bf16Pure,
}

/// <summary>The optimizer a training run uses.</summary>
public enum OptimizerKind
{
    /// <summary>AdamW with fp32 moments (8 bytes per trainable parameter).</summary>
    AdamW,

    /// <summary>No optimizer (inference).</summary>
    None,
}

/// <summary>
/// One run, described once: the estimator predicts its memory and the runtime executes it, so the
/// estimate is always of exactly what runs.
/// </summary>
public sealed record RunPlan
{
    /// <summary>The model's architecture.</summary>
    public required LlamaConfig Model { get; init; }

    /// <summary>Train or generate.</summary>
    public RunMode Mode { get; init; } = RunMode.Train;

    /// <summary>Numeric precision.</summary>
    public Precision Precision { get; init; } = Precision.Fp32;

    /// <summary>The optimizer (training only).</summary>
    public OptimizerKind Optimizer { get; init; } = OptimizerKind.AdamW;

    /// <summary>Sequences per micro-batch.</summary>
    public int MicroBatchSize { get; init; } = 1;

    /// <summary>Tokens per sequence (for generation: prompt plus new tokens).</summary>
    public int SequenceLength { get; init; } = 512;

    /// <summary>Micro-batches accumulated per optimizer step.</summary>
    public int GradientAccumulationSteps { get; init; } = 1;
}
