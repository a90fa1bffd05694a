using System.Globalization;

namespace FrugalLM.Planning;

/// <summary>Thrown when a run plan is inconsistent or out of range (bad input: the CLI exits with 2).</summary>
public sealed class PlanException(string message) : Exception(message);

/// <summary>
/// One run, described once: the estimator predicts its memory and the runtime executes it, so the estimate is
/// always of exactly what runs. Every field is read by both; defaults describe a plain fp32 AdamW training step.
/// </summary>
public sealed record RunPlan
{
    /// <summary>The model's architecture. <see cref="ModelSpec.Llama"/> or <see cref="ModelSpec.Opt"/> holds the configuration the runtime builds.</summary>
    public required ModelSpec Model { get; init; }

    /// <summary>Train or generate.</summary>
    public RunMode Mode { get; init; } = RunMode.Train;

    /// <summary>Numeric precision; see <see cref="Planning.Precision"/> for what is kept at which width.</summary>
    public Precision Precision { get; init; } = Precision.Fp32;

    /// <summary>Storage of the frozen base linear weights. Training a quantized base requires <see cref="Lora"/>.</summary>
    public Quantization Quantization { get; init; } = Quantization.None;

    /// <summary>LoRA adapters, or null to train every parameter (full fine-tuning / pre-training).</summary>
    public LoraSettings? Lora { get; init; }

    /// <summary>The optimizer (training only).</summary>
    public OptimizerKind Optimizer { get; init; } = OptimizerKind.AdamW;

    /// <summary>Activation checkpointing (training only).</summary>
    public Checkpointing Checkpointing { get; init; } = Checkpointing.None;

    /// <summary>
    /// Training adapters on a frozen base with 16-bit compute: norm weights and an untied LM head stay fp32 (the head
    /// then returns fp32 logits), everything else follows <see cref="Precision"/>. Half of PEFT's
    /// <c>prepare_model_for_kbit_training</c>; <see cref="KbitTraining.Prepare"/> sets it with checkpointing.
    /// Requires <see cref="Lora"/>; ignored when generating.
    /// </summary>
    public bool Fp32NormsAndHead { get; init; }

    /// <summary>The attention kernel.</summary>
    public AttentionKind Attention { get; init; } = AttentionKind.Sdpa;

    /// <summary>How logits and the loss are computed (training only).</summary>
    public LossComputation Loss { get; init; } = LossComputation.Full;

    /// <summary>FSDP strategy and world size (training only).</summary>
    public Sharding Sharding { get; init; } = Sharding.None;

    /// <summary>Which tier holds weights, gradients and the optimizer.</summary>
    public OffloadPolicy Offload { get; init; } = OffloadPolicy.None;

    /// <summary>Sequences per micro-batch (for generation: sequences decoded together).</summary>
    public int MicroBatchSize { get; init; } = 1;

    /// <summary>Tokens per sequence (for generation: prompt plus new tokens, the KV cache's length).</summary>
    public int SequenceLength { get; init; } = 512;

    /// <summary>Micro-batches accumulated per optimizer step.</summary>
    public int GradientAccumulationSteps { get; init; } = 1;

    /// <summary>GPU or CPU.</summary>
    public ComputeDevice Device { get; init; } = ComputeDevice.Cuda;

    /// <summary>Framework memory before any tensor: CUDA context, measured runtime baseline.</summary>
    public FrameworkOverhead Overhead { get; init; } = FrameworkOverhead.Cuda;

    /// <summary>Whether the run trains.</summary>
    public bool Trains => Mode == RunMode.Train;

    /// <summary>Whether every base parameter is trained (no LoRA).</summary>
    public bool TrainsAllWeights => Trains && Lora is null;

    /// <summary>Training with 16-bit compute copies and fp32 master weights.</summary>
    public bool UsesMasterWeights => Trains && Precision is Precision.Bf16 or Precision.Fp16;

    /// <summary>Bytes per element of weights, activations and gradients at the compute precision.</summary>
    public int ComputeBytes => Precision == Precision.Fp32 ? 4 : 2;

    /// <summary>Whether a training run keeps tensors of <paramref name="role"/> in fp32 whatever the compute precision
    /// (<see cref="Fp32NormsAndHead"/>: norm weights, and the LM head, which the model lists only when it is untied).</summary>
    public bool KeepsInFp32(TensorRole role) =>
        Trains && Fp32NormsAndHead && role is TensorRole.LayerNorm or TensorRole.FinalNorm or TensorRole.LmHead;

    /// <summary>Whether the LM head is a separate matrix kept in fp32, so the logits come out in fp32.</summary>
    public bool HeadInFp32 => KeepsInFp32(TensorRole.LmHead) && !Model.TieWordEmbeddings;

    /// <summary>Bytes per element of optimizer states (the masters' width; bf16 when there are no masters).</summary>
    public int OptimizerStateBytes => Precision == Precision.Bf16Pure ? 2 : 4;

    /// <summary>The offload policy as it applies on this plan's device.</summary>
    public OffloadPolicy EffectiveOffload => Offload.For(Device);

    /// <summary>Whether decoder layers are streamed from disk (<see cref="OffloadPolicy.Disk"/>).</summary>
    public bool StreamsWeights => EffectiveOffload.Weights == MemoryTier.Disk;

    /// <summary>
    /// Whether decoder layers' weights live on the host tier and are streamed through two device buffers
    /// (<see cref="OffloadPolicy.Params"/>, <see cref="OffloadPolicy.All"/>), on any device: on a CPU the buffers are
    /// still allocated and the layers still recomputed in backward, though host and device are one memory.
    /// </summary>
    public bool StreamsFromHost => Offload.Weights == MemoryTier.Host;

    /// <summary>The decoder layers streamed from disk (0 unless <see cref="StreamsWeights"/>): all but the resident ones.</summary>
    public int StreamedLayers => StreamsWeights ? Model.NumHiddenLayers - Offload.ResidentLayers : 0;

    /// <summary>The LoRA module names resolved against the model (empty without LoRA).</summary>
    public IReadOnlyList<string> LoraTargets => Lora?.ResolveTargets(Model) ?? [];

    /// <summary>
    /// Checks the plan and returns warnings about choices that run but deserve a look.
    /// </summary>
    /// <exception cref="PlanException">The plan cannot run as described.</exception>
    public IReadOnlyList<string> Validate()
    {
        var warnings = new List<string>();
        void Require(bool ok, string message)
        {
            if (!ok)
            {
                throw new PlanException(message);
            }
        }
        Require(MicroBatchSize >= 1, $"micro-batch size must be at least 1 (got {MicroBatchSize})");
        Require(SequenceLength >= 1, $"sequence length must be at least 1 (got {SequenceLength})");
        Require(GradientAccumulationSteps >= 1, $"gradient accumulation steps must be at least 1 (got {GradientAccumulationSteps})");
        Require(Sharding.WorldSize >= 1, $"FSDP world size must be at least 1 (got {Sharding.WorldSize})");
        Require(Overhead.ContextBytes >= 0 && Overhead.RuntimeBaselineBytes >= 0, "framework overhead cannot be negative");
        Require(Checkpointing.Interval >= 0, $"checkpoint interval cannot be negative (got {Checkpointing.Interval})");
        Require(Checkpointing.Interval <= Model.NumHiddenLayers,
            $"checkpoint interval {Checkpointing.Interval} exceeds the model's {Model.NumHiddenLayers} layers");
        Require(!Loss.Chunked || Loss.ChunkTokens >= 1, $"loss chunk must be at least 1 token (got {Loss.ChunkTokens})");
        if (Model.Position == PositionKind.Learned)
        {
            Require(SequenceLength <= Model.MaxPositionEmbeddings,
                $"sequence length {SequenceLength} exceeds {Model.Name}'s learned position table ({Model.MaxPositionEmbeddings})");
        }
        else if (SequenceLength > Model.MaxPositionEmbeddings)
        {
            warnings.Add(string.Create(CultureInfo.InvariantCulture,
                $"sequence length {SequenceLength} exceeds {Model.Name}'s max_position_embeddings ({Model.MaxPositionEmbeddings}): rotary positions extrapolate"));
        }
        if (Quantization.Kind == QuantizationKind.Nf4)
        {
            Require(Quantization.Nf4BlockSize >= 2, $"NF4 block size must be at least 2 (got {Quantization.Nf4BlockSize})");
        }
        ValidateLora();
        Require(!(Trains && Quantization.Kind != QuantizationKind.None && Lora is null),
            "a quantized base is frozen: training it needs LoRA adapters (--lora-r)");
        Require(!(Trains && Fp32NormsAndHead && Lora is null),
            "fp32 norms and head are for training adapters on a frozen base: they need LoRA adapters (--lora-r)");
        if (Sharding.Strategy == ShardingStrategy.None)
        {
            Require(Sharding.WorldSize == 1,
                "a world size above 1 needs an FSDP strategy (full or grad-op); plain data parallelism keeps a whole replica per GPU, which a world size of 1 already describes");
        }
        else
        {
            Require(Trains, "FSDP sharding applies to training runs");
            if (Sharding.WorldSize == 1)
            {
                warnings.Add("FSDP with a world size of 1 shards nothing");
            }
        }
        var offload = EffectiveOffload;
        Require(offload.Gradients != MemoryTier.Disk, "gradients cannot live on disk");
        Require(offload.OptimizerStates != MemoryTier.Disk, "optimizer states cannot live on disk (disk offload keeps adapters and their optimizer in memory)");
        Require(Offload.ResidentLayers >= 0 && Offload.ResidentLayers <= Model.NumHiddenLayers,
            $"resident layers must be between 0 and the model's {Model.NumHiddenLayers} (got {Offload.ResidentLayers})");
        if (StreamsWeights)
        {
            Require(Sharding.Strategy == ShardingStrategy.None, "disk offload does not compose with FSDP sharding");
            Require(!Trains || Lora is not null, "disk offload streams frozen weights: training needs LoRA adapters (--lora-r)");
            Require(!Trains || Offload.ResidentLayers == 0, "training with disk offload streams every decoder layer (resident layers apply to generation)");
            Require(Offload.StoredFloatBytes is 0 or 2 or 4, $"stored float width must be 2 or 4 bytes (got {Offload.StoredFloatBytes})");
            if (Trains && Checkpointing.Interval > 1)
            {
                warnings.Add("disk offload recomputes every streamed layer in backward: checkpointing every k layers is replaced by that");
            }
        }
        Require(!(Sharding.Strategy == ShardingStrategy.ShardGradOp && Sharding.WorldSize > 1 && offload.Weights != MemoryTier.Device),
            "grad-op sharding keeps full weights on every GPU; offload weights with --fsdp full instead");
        if (!Trains)
        {
            if (Checkpointing.Enabled)
            {
                warnings.Add("checkpointing has no effect when generating");
            }
            if (Optimizer != OptimizerKind.None)
            {
                warnings.Add("the optimizer is ignored when generating");
            }
            if (Fp32NormsAndHead)
            {
                warnings.Add("fp32 norms and head (k-bit training preparation) have no effect when generating");
            }
        }
        return warnings;
    }

    private void ValidateLora()
    {
        if (Lora is null)
        {
            return;
        }
        if (Lora.Rank < 1)
        {
            throw new PlanException($"LoRA rank must be at least 1 (got {Lora.Rank})");
        }
        if (!(Lora.Alpha > 0))
        {
            throw new PlanException($"LoRA alpha must be positive (got {Lora.Alpha})");
        }
        if (Lora.Dropout is < 0 or >= 1 || double.IsNaN(Lora.Dropout))
        {
            throw new PlanException($"LoRA dropout must be in [0, 1) (got {Lora.Dropout})");
        }
        if (Lora.TargetModules.Count == 0)
        {
            throw new PlanException("LoRA needs at least one target module");
        }
        if (Lora.TargetModules.Count > 1 && Lora.TargetModules.Contains(LoraSettings.AllLinear))
        {
            throw new PlanException($"'{LoraSettings.AllLinear}' cannot be combined with other target names");
        }
        foreach (var name in Lora.ResolveTargets(Model))
        {
            var linear = Model.LayerLinears.FirstOrDefault(l => l.Name == name)
                ?? throw new PlanException(
                    $"LoRA target '{name}' is not a linear layer of {Model.Name} (its layers have: {string.Join(", ", Model.LinearNames)}, or use {LoraSettings.AllLinear})");
            int limit = Math.Min(linear.InFeatures, linear.OutFeatures);
            if (Lora.Rank > limit)
            {
                throw new PlanException(
                    $"LoRA rank {Lora.Rank} is larger than {name} ({linear.InFeatures} -> {linear.OutFeatures}) allows: at most {limit}");
            }
        }
    }

    /// <summary>A compact description such as "bf16, nf4 base, LoRA r16 q_proj,v_proj, ckpt/1, adamw8bit".</summary>
    public string Describe()
    {
        var parts = new List<string> { PlanNames.Format(Precision) };
        if (Quantization.Kind != QuantizationKind.None)
        {
            parts.Add($"{PlanNames.Format(Quantization.Kind)} base");
        }
        parts.Add(Lora?.ToString() ?? (Trains ? "full" : "weights"));
        if (Trains)
        {
            if (Fp32NormsAndHead && ComputeBytes < 4)
            {
                parts.Add("fp32 norms+head");
            }
            if (Checkpointing.Enabled)
            {
                parts.Add(Checkpointing.Interval == 1 ? "ckpt" : $"ckpt/{Checkpointing.Interval}");
            }
            parts.Add(PlanNames.Format(Optimizer));
        }
        if (Offload != OffloadPolicy.None)
        {
            parts.Add($"offload {Offload.Name}");
        }
        if (Sharding.Strategy != ShardingStrategy.None)
        {
            parts.Add($"fsdp {PlanNames.Format(Sharding.Strategy)} x{Sharding.WorldSize}");
        }
        return string.Join(", ", parts);
    }
}
