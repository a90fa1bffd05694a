using System.Globalization;

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

    /// <summary>
    /// Training: bf16 compute copies of the weights, gradients on those copies, fp32 master weights that the
    /// optimizer updates. Inference: bf16 weights.
    /// </summary>
    Bf16,

    /// <summary>As <see cref="Bf16"/> with fp16 compute copies and dynamic loss scaling.</summary>
    Fp16,

    /// <summary>Training with bf16 weights, gradients and optimizer states and no fp32 masters.</summary>
    Bf16Pure,
}

/// <summary>How the frozen base weights of the decoder layers' linear layers are stored.</summary>
public enum QuantizationKind
{
    /// <summary>At the run's compute precision.</summary>
    None,

    /// <summary>
    /// LLM.int8(): int8 weights with one fp32 absmax scale per output row (bitsandbytes' CB/SCB); inputs'
    /// outlier features above <see cref="Quantization.OutlierThreshold"/> are multiplied in 16-bit.
    /// </summary>
    Int8,

    /// <summary>
    /// QLoRA's 4-bit NormalFloat: two 4-bit codes per byte and one absmax per block of
    /// <see cref="Quantization.Nf4BlockSize"/> weights (fp32, or 8-bit with double quantization).
    /// </summary>
    Nf4,
}

/// <summary>Base-weight quantization. Only the weights of linear layers inside decoder layers are quantized;
/// embeddings, norms, biases and the LM head keep the compute precision.</summary>
/// <param name="Kind">None, int8 or NF4.</param>
/// <param name="Nf4BlockSize">Weights per NF4 absmax block (bitsandbytes default 64).</param>
/// <param name="Nf4DoubleQuant">Quantize the NF4 absmax values to 8 bits in blocks of 256 (QLoRA's double quantization).</param>
/// <param name="OutlierThreshold">LLM.int8() outlier threshold on input features (bitsandbytes default 6.0).</param>
public sealed record Quantization(
    QuantizationKind Kind,
    int Nf4BlockSize = 64,
    bool Nf4DoubleQuant = false,
    double OutlierThreshold = 6.0)
{
    /// <summary>Absmax values per second-level block under double quantization.</summary>
    public const int DoubleQuantBlockSize = 256;

    /// <summary>No quantization.</summary>
    public static Quantization None { get; } = new(QuantizationKind.None);

    /// <summary>LLM.int8() with default settings.</summary>
    public static Quantization Int8 { get; } = new(QuantizationKind.Int8);

    /// <summary>Linear layers left unquantized, by name or path (LLM.int8() keeps the output head in 16/32 bits).</summary>
    public IReadOnlyList<string> SkipModules { get; init; } = ["lm_head"];

    /// <summary>NF4 with 64-weight blocks and fp32 absmax.</summary>
    public static Quantization Nf4 { get; } = new(QuantizationKind.Nf4);

    /// <summary>Stored bytes of one quantized linear weight with <paramref name="count"/> elements and <paramref name="rows"/> output rows.</summary>
    public long WeightBytes(long count, int rows) => Kind switch
    {
        QuantizationKind.Int8 => count + 4L * rows,
        QuantizationKind.Nf4 => Nf4Bytes(count),
        _ => throw new InvalidOperationException("not a quantized format"),
    };

    private long Nf4Bytes(long count)
    {
        long blocks = Ceil(count, Nf4BlockSize);
        long absmax = Nf4DoubleQuant ? blocks + 4 * Ceil(blocks, DoubleQuantBlockSize) + 4 : 4 * blocks;
        return Ceil(count, 2) + absmax;
    }

    private static long Ceil(long a, long b) => (a + b - 1) / b;
}

/// <summary>LoRA adapters on the decoder layers' linear layers; the base model is frozen.</summary>
/// <param name="Rank">r: inner width of each adapter.</param>
/// <param name="Alpha">Scale numerator: the update is B·A·(alpha / r).</param>
/// <param name="TargetModules">HF module names (q_proj, v_proj, ...) or the single name <c>all-linear</c>.</param>
/// <param name="Dropout">Dropout on the adapter input while training (PEFT's lora_dropout).</param>
public sealed record LoraSettings(int Rank, double Alpha, IReadOnlyList<string> TargetModules, double Dropout)
{
    /// <summary>The target name meaning every linear layer of the decoder layers (not the LM head), as in PEFT.</summary>
    public const string AllLinear = "all-linear";

    /// <summary>The PEFT example the article cites: r=16, alpha=32, dropout 0.05 on q_proj and v_proj.</summary>
    public static LoraSettings ArticleExample { get; } = new(16, 32, ["q_proj", "v_proj"], 0.05);

    /// <summary>The concrete module names targeted in <paramref name="model"/>.</summary>
    public IReadOnlyList<string> ResolveTargets(ModelSpec model) =>
        TargetModules.Count == 1 && TargetModules[0] == AllLinear ? model.LinearNames : TargetModules;

    /// <summary>e.g. "LoRA r16 q_proj,v_proj".</summary>
    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture, $"LoRA r{Rank} {string.Join(',', TargetModules)}");

    /// <summary>Equality by value, including the target list.</summary>
    public bool Equals(LoraSettings? other) =>
        other is not null && Rank == other.Rank && Alpha.Equals(other.Alpha) && Dropout.Equals(other.Dropout)
        && TargetModules.SequenceEqual(other.TargetModules);

    /// <summary>Hash consistent with <see cref="Equals(LoraSettings?)"/>.</summary>
    public override int GetHashCode() => HashCode.Combine(Rank, Alpha, Dropout, string.Join(',', TargetModules));
}

/// <summary>The optimizer a training run uses.</summary>
public enum OptimizerKind
{
    /// <summary>AdamW with two moments per trainable parameter at the master precision (fp32: 8 bytes).</summary>
    AdamW,

    /// <summary>
    /// bitsandbytes' block-wise 8-bit AdamW: two uint8 moments plus one fp32 absmax per moment per
    /// <see cref="AdamW8bitLayout.BlockSize"/> values; tensors under <see cref="AdamW8bitLayout.MinTensorSize"/>
    /// elements keep fp32 moments.
    /// </summary>
    AdamW8bit,

    /// <summary>SGD with one momentum buffer per trainable parameter.</summary>
    SgdMomentum,

    /// <summary>No optimizer state (inference, or measuring forward and backward alone).</summary>
    None,
}

/// <summary>The state layout of the 8-bit AdamW (bitsandbytes defaults), shared by estimator and runtime.</summary>
public static class AdamW8bitLayout
{
    /// <summary>Values per fp32 absmax block of each quantized moment.</summary>
    public const int BlockSize = 2048;

    /// <summary>Tensors with fewer elements keep fp32 moments (bitsandbytes' min_8bit_size).</summary>
    public const int MinTensorSize = 4096;
}

/// <summary>
/// How the optimizer step walks a tensor: in flat chunks of <see cref="ChunkElements"/> values, so its fp32
/// temporaries (widened gradient, denominator, working copies of 16-bit or 8-bit moments and weights) are those of
/// one chunk, not of the largest tensor (a 32000 x 4096 embedding would need 0.5 GiB of them per temporary).
/// The estimator and the runtime's AdamW both read it.
/// </summary>
public static class OptimizerStepLayout
{
    /// <summary>Values per chunk: a multiple of <see cref="AdamW8bitLayout.BlockSize"/>, so chunks cut 8-bit moments at block edges.</summary>
    public const long ChunkElements = 1L << 20;

    /// <summary>
    /// Whether the runtime's AdamW updates in place with its fused kernel, so the step has no temporaries: on the CPU, with
    /// fp32 values (parameters or masters) and fp32 or 8-bit moments, or bf16 values with bf16 moments (bf16-pure): the
    /// runtime's <c>AdamW.FusedCpuStep</c> rule.
    /// </summary>
    public static bool Fused(bool cpu, bool moments16Bit, bool parameter16Bit) => cpu && moments16Bit == parameter16Bit;

    /// <summary>
    /// Peak bytes of fp32 temporaries per value of a chunk the runtime's AdamW holds at once: the scaled gradient
    /// (and its fp32 copy when the gradient is 16-bit), the denominator, fp32 working copies of moments stored
    /// in 16 or 8 bits (with 8-bit codes widened to int64 while they are decoded and encoded), and of a
    /// parameter that is not fp32.
    /// </summary>
    public static long TemporaryBytesPerValue(bool gradient16Bit, bool moments16Bit, bool moments8Bit, bool parameter16Bit)
    {
        long bytes = 4 + 4; // g x multiplier, denominator
        bytes += gradient16Bit ? 4 : 0;
        bytes += moments16Bit ? 8 : 0;
        bytes += moments8Bit ? 8 + 8 + 8 : 0; // two fp32 moments, an int64 index and a float temporary in flight
        bytes += parameter16Bit ? 4 : 0;
        return bytes;
    }
}

/// <summary>
/// How weights are read from safetensors files: in slices of whole rows of at most <see cref="SliceBytes"/>,
/// dropping the file's mapped pages after each, so converting a tensor's dtype costs one slice, not a second
/// copy of the tensor. A linear layer quantized to int8 while loading exists whole in fp32 for a moment, with
/// its absolute values, its scaled copy and its int8 result (<see cref="QuantizeBytesPerValue"/>). The estimator
/// and the loader both read it.
/// </summary>
public static class WeightLoadLayout
{
    /// <summary>Largest slice read at once.</summary>
    public const long SliceBytes = 8L << 20;

    /// <summary>Peak bytes per weight value while one layer is quantized to int8 on load.</summary>
    public const long QuantizeBytesPerValue = 4 + 4 + 4 + 1;
}

/// <summary>
/// How disk offload streams decoder layers, read by the estimator and by the runtime's layer streamer: every streamed
/// layer is read into one of <see cref="Slots"/> reusable buffers of one layer each; while one layer runs, the next is
/// read into the other on a background thread.
/// </summary>
public static class DiskOffloadLayout
{
    /// <summary>Layer buffers: the layer in flight and the one read ahead.</summary>
    public const int Slots = 2;
}

/// <summary>
/// How a 16-bit linear product is computed where the CPU has no arithmetic for its dtype (fp16 here): in fp32,
/// tiled over the output features so the fp32 copies of the weight and of the output exist one tile of at most
/// <see cref="TileElements"/> values at a time; the input's fp32 copy is whole. The estimator and
/// <c>Matmul16</c> both read it.
/// </summary>
public static class UpcastLayout
{
    /// <summary>Largest weight tile, and largest output tile, in values.</summary>
    public const long TileElements = 4L << 20;
}

/// <summary>Gradient (activation) checkpointing of decoder layers.</summary>
/// <param name="Interval">0: off. k ≥ 1: the stack is cut into segments of k consecutive decoder layers; only each
/// segment's input is kept and the segment is recomputed in backward.</param>
public sealed record Checkpointing(int Interval)
{
    /// <summary>No checkpointing.</summary>
    public static Checkpointing None { get; } = new(0);

    /// <summary>One checkpoint per decoder layer (HF <c>gradient_checkpointing_enable()</c>).</summary>
    public static Checkpointing EveryLayer { get; } = new(1);

    /// <summary>Whether any layer is recomputed.</summary>
    public bool Enabled => Interval > 0;
}

/// <summary>Which attention kernel runs.</summary>
public enum AttentionKind
{
    /// <summary>Fused scaled-dot-product attention (flash / memory-efficient): O(s) memory, keeps the log-sum-exp.</summary>
    Sdpa,

    /// <summary>Explicit softmax(QKᵀ)V: keeps the s x s probabilities of every head.</summary>
    Eager,
}

/// <summary>How logits and the cross-entropy loss are computed while training.</summary>
/// <param name="Chunked">
/// Compute LM head and loss over chunks of tokens in one reused buffer, with each chunk's gradients computed at once
/// (fused), instead of all logits at once.
/// </param>
/// <param name="ChunkTokens">Tokens per chunk when chunked.</param>
public sealed record LossComputation(bool Chunked, int ChunkTokens = LossComputation.DefaultChunkTokens)
{
    /// <summary>
    /// Tokens per chunk of the command line's default loss. Measured on the bundled model (vocab 50257, 4 x 256 tokens,
    /// fp32, 2 threads): 872-892 tokens/s at 256, 793-834 at 1024, 716-742 with all logits at once.
    /// </summary>
    public const int DefaultChunkTokens = 256;

    /// <summary>Full fp32 logits for every token (HF's default; this record's default in a <see cref="RunPlan"/>).</summary>
    public static LossComputation Full { get; } = new(false);

    /// <summary>Chunks of <see cref="DefaultChunkTokens"/> tokens: the default of <c>frugal train</c>, <c>estimate</c> and <c>plan</c>.</summary>
    public static LossComputation ChunkedDefault { get; } = new(true);
}

/// <summary>FSDP sharding strategy (PyTorch names; DeepSpeed ZeRO stage in brackets).</summary>
public enum ShardingStrategy
{
    /// <summary>No sharding.</summary>
    None,

    /// <summary>FULL_SHARD (ZeRO-3): weights, gradients and optimizer states sharded; layers gathered as they run.</summary>
    FullShard,

    /// <summary>SHARD_GRAD_OP (ZeRO-2): gradients and optimizer states sharded; full weights kept on every rank.</summary>
    ShardGradOp,
}

/// <summary>Sharding across data-parallel ranks.</summary>
/// <param name="Strategy">The FSDP strategy.</param>
/// <param name="WorldSize">Ranks (GPUs) sharing the model.</param>
public sealed record Sharding(ShardingStrategy Strategy, int WorldSize)
{
    /// <summary>One rank, nothing sharded.</summary>
    public static Sharding None { get; } = new(ShardingStrategy.None, 1);

    /// <summary>Whether anything is divided between ranks.</summary>
    public bool Shards => Strategy != ShardingStrategy.None && WorldSize > 1;
}

/// <summary>Where a memory component lives.</summary>
public enum MemoryTier
{
    /// <summary>The accelerator (or, for a CPU run, the process's RAM).</summary>
    Device,

    /// <summary>Host RAM next to an accelerator.</summary>
    Host,

    /// <summary>Files on disk, memory-mapped or streamed.</summary>
    Disk,
}

/// <summary>
/// Which tier holds the weights, the gradients and the optimizer (its states and the fp32 master weights).
/// Whatever is not on the device is streamed through device buffers one unit (decoder layer) at a time, and an
/// optimizer off the device runs its step where its states are.
/// </summary>
/// <param name="Name">The CLI name of the policy.</param>
/// <param name="Weights">Tier of the (compute-precision or quantized) weights.</param>
/// <param name="Gradients">Tier of the gradients.</param>
/// <param name="OptimizerStates">Tier of the optimizer states and master weights (where the step runs).</param>
public sealed record OffloadPolicy(string Name, MemoryTier Weights, MemoryTier Gradients, MemoryTier OptimizerStates)
{
    /// <summary>Everything on the device.</summary>
    public static OffloadPolicy None { get; } = new("none", MemoryTier.Device, MemoryTier.Device, MemoryTier.Device);

    /// <summary>ZeRO-Offload: gradients, optimizer states and masters on the host; the step runs on the CPU.</summary>
    public static OffloadPolicy Optimizer { get; } = new("optimizer", MemoryTier.Device, MemoryTier.Host, MemoryTier.Host) { StepsOnHost = true };

    /// <summary>Weights on the host, streamed layer by layer; gradients and optimizer stay on the device.</summary>
    public static OffloadPolicy Params { get; } = new("params", MemoryTier.Host, MemoryTier.Device, MemoryTier.Device);

    /// <summary>Weights, gradients and optimizer on the host (FSDP CPUOffload(offload_params=True)).</summary>
    public static OffloadPolicy All { get; } = new("all", MemoryTier.Host, MemoryTier.Host, MemoryTier.Host) { StepsOnHost = true };

    /// <summary>
    /// The frozen weights of the decoder layers stay in the model folder's safetensors files and are read into reusable
    /// buffers one layer at a time, the next layer read ahead (<see cref="DiskOffloadLayout"/>); gradients and the
    /// optimizer (a LoRA run's adapters and their states) stay on the host. Embeddings, final norm and head stay resident,
    /// as do the first <see cref="ResidentLayers"/> decoder layers.
    /// </summary>
    public static OffloadPolicy Disk { get; } = new("disk", MemoryTier.Disk, MemoryTier.Host, MemoryTier.Host);

    /// <summary>
    /// Under disk offload: decoder layers kept resident (the first ones), the rest streamed from disk. 0 streams every
    /// layer. A memory budget chooses it (<c>--memory-budget</c>).
    /// </summary>
    public int ResidentLayers { get; init; }

    /// <summary>
    /// Under disk offload: bytes per element of the floating weights in the files streamed from (2 for a bf16/fp16
    /// folder, 4 for fp32); 0 means as computed. A stored width other than the compute width is converted on every
    /// read through a staging slice (<see cref="WeightLoadLayout.SliceBytes"/>).
    /// </summary>
    public int StoredFloatBytes { get; init; }

    /// <summary>
    /// Under disk offload with an int8 base: true when the files hold the int8 weights (a folder written by
    /// <c>frugal quantize</c>), false when each linear weight is read in float and quantized on every read.
    /// </summary>
    public bool StoredInt8 { get; init; }

    /// <summary>
    /// Whether the optimizer step runs on the host in the vectorized C# kernel (ZeRO-Offload: <see cref="Optimizer"/>,
    /// <see cref="All"/>), which works in place on the masters and moments with no temporaries beyond a few stack
    /// buffers per thread; otherwise the in-memory AdamW steps with libtorch ops chunk by chunk (disk offload keeps it).
    /// </summary>
    public bool StepsOnHost { get; init; }

    /// <summary>The named policies.</summary>
    public static IReadOnlyList<OffloadPolicy> Named { get; } = [None, Optimizer, Params, All, Disk];

    /// <summary>
    /// The policy as it applies on <paramref name="device"/>: on a CPU run the host RAM is the device, so Host
    /// becomes Device.
    /// </summary>
    public OffloadPolicy For(ComputeDevice device) => device == ComputeDevice.Cpu
        ? this with { Weights = Lift(Weights), Gradients = Lift(Gradients), OptimizerStates = Lift(OptimizerStates) }
        : this;

    private static MemoryTier Lift(MemoryTier tier) => tier == MemoryTier.Host ? MemoryTier.Device : tier;
}

/// <summary>What executes the run.</summary>
public enum ComputeDevice
{
    /// <summary>A CUDA GPU (pays a CUDA context).</summary>
    Cuda,

    /// <summary>The CPU: device memory is the process's RAM.</summary>
    Cpu,
}

/// <summary>Memory the framework uses before any tensor exists.</summary>
/// <param name="ContextBytes">CUDA context and kernels on the GPU (the article's ~1.3 GB); 0 on the CPU.</param>
/// <param name="RuntimeBaselineBytes">Resident memory of the process with the runtime loaded and no model, as the
/// runtime measures it (libtorch, .NET, tokenizer); counted on the device tier of a CPU run and on the host
/// otherwise. 0 until a measurement is supplied.</param>
public sealed record FrameworkOverhead(long ContextBytes, long RuntimeBaselineBytes)
{
    /// <summary>The article's CUDA context estimate, 1.3 GB (decimal).</summary>
    public const long DefaultCudaContextBytes = 1_300_000_000L;

    /// <summary>A GPU run with the default context and no measured baseline.</summary>
    public static FrameworkOverhead Cuda { get; } = new(DefaultCudaContextBytes, 0);

    /// <summary>A CPU run with no measured baseline.</summary>
    public static FrameworkOverhead Cpu { get; } = new(0, 0);
}
