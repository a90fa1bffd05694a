using System.CommandLine;
using System.Globalization;
using FrugalLM.Planning;

namespace FrugalLM.Cli.Commands;

// The runtime has namespaces FrugalLM.Precision, FrugalLM.Checkpointing and FrugalLM.Sharding; these names mean the plan types.
using Checkpointing = FrugalLM.Planning.Checkpointing;
using Precision = FrugalLM.Planning.Precision;
using Sharding = FrugalLM.Planning.Sharding;

/// <summary>
/// The options that describe a <see cref="RunPlan"/>, shared by every command that builds one (estimate now,
/// train later), so a plan is spelled the same way everywhere.
/// </summary>
internal sealed class PlanOptions
{
    public Option<string> Model { get; } = new("--model")
    {
        Description = "Model preset (llama-7b, llama2-70b, llama3-8b, mistral-7b, opt-6.7b, ...) or a folder with config.json",
        Required = true,
    };

    public Option<string> Mode { get; } = new("--mode") { Description = "train or generate (infer)", DefaultValueFactory = _ => "train" };

    public Option<string> Precision { get; } = new("--precision")
    {
        Description = "fp32, bf16 or fp16 (16-bit compute with fp32 masters when training), bf16-pure (no masters)",
        DefaultValueFactory = _ => "fp32",
    };

    public Option<string> Quant { get; } = new("--quant") { Description = "Base weights: none, int8 (LLM.int8) or nf4", DefaultValueFactory = _ => "none" };

    public Option<bool> DoubleQuant { get; } = new("--nf4-double-quant") { Description = "Quantize NF4 block scales to 8 bits" };

    public Option<int> LoraRank { get; } = new("--lora-r") { Description = "LoRA rank (0: train every weight)", DefaultValueFactory = _ => 0 };

    public Option<double?> LoraAlpha { get; } = new("--lora-alpha") { Description = "LoRA alpha (default 2 x rank)" };

    public Option<string> LoraTargets { get; } = new("--lora-targets")
    {
        Description = "Comma-separated module names, or all-linear",
        DefaultValueFactory = _ => "q_proj,v_proj",
    };

    public Option<double> LoraDropout { get; } = new("--lora-dropout") { Description = "LoRA dropout", DefaultValueFactory = _ => 0.0 };

    public Option<string?> Optimizer { get; } = new("--optimizer") { Description = "adamw, adamw8bit, sgd (momentum) or none (default: adamw when training)" };

    public Option<int> CheckpointEvery { get; } = new("--checkpoint-every")
    {
        Description = "Gradient checkpointing: 0 off, 1 every layer, k one checkpoint per k layers",
        DefaultValueFactory = _ => 0,
    };

    public Option<bool> Fp32NormsAndHead { get; } = new("--fp32-norms-and-head")
    {
        Description = "Training LoRA in 16 bits: norm weights and an untied LM head in fp32 (frugal train's default with --quantize int8)",
    };

    public Option<string> Attention { get; } = new("--attention") { Description = "sdpa (flash/memory-efficient) or eager", DefaultValueFactory = _ => "sdpa" };

    public Option<string> Loss { get; } = new("--loss") { Description = "chunked (LM head and loss fused over chunks of tokens, frugal train's default) or full (fp32 logits for all tokens, as transformers)", DefaultValueFactory = _ => "chunked" };

    public Option<int> LossChunk { get; } = new("--loss-chunk") { Description = "Tokens per chunk for --loss chunked", DefaultValueFactory = _ => LossComputation.DefaultChunkTokens };

    public Option<string> Fsdp { get; } = new("--fsdp") { Description = "FSDP strategy: none, full (ZeRO-3) or grad-op (ZeRO-2)", DefaultValueFactory = _ => "none" };

    public Option<int> Gpus { get; } = new("--gpus") { Description = "FSDP world size (GPUs sharing the model)", DefaultValueFactory = _ => 1 };

    public Option<string> Offload { get; } = new("--offload") { Description = "none, optimizer, params, all or disk", DefaultValueFactory = _ => "none" };

    public Option<int> Batch { get; } = new("--batch") { Description = "Micro-batch size (sequences)", DefaultValueFactory = _ => 1 };

    public Option<int> Sequence { get; } = new("--seq") { Description = "Tokens per sequence", DefaultValueFactory = _ => 2048 };

    public Option<int> GradientAccumulation { get; } = new("--grad-accum") { Description = "Micro-batches per optimizer step", DefaultValueFactory = _ => 1 };

    public Option<string?> Gpu { get; } = new("--gpu") { Description = $"Device: {string.Join(", ", GpuCatalog.Names)}" };

    public Option<string?> Budget { get; } = new("--budget") { Description = "Device memory budget, e.g. 24GiB (overrides the GPU's size)" };

    public Option<string?> Memory { get; } = new("--memory") { Description = "RAM for --gpu cpu (default: MemAvailable from /proc/meminfo)" };

    public Option<string?> CudaContext { get; } = new("--cuda-context") { Description = "CUDA context size (default 1.3GB, as the article)" };

    public Option<string?> RuntimeBaseline { get; } = new("--runtime-baseline") { Description = "Measured resident memory of the runtime before the model (e.g. 450MiB)" };

    /// <summary>Adds every option to a command.</summary>
    public void AddTo(Command command)
    {
        Option[] all =
        [
            Model, Mode, Precision, Quant, DoubleQuant, LoraRank, LoraAlpha, LoraTargets, LoraDropout, Optimizer,
            CheckpointEvery, Fp32NormsAndHead, Attention, Loss, LossChunk, Fsdp, Gpus, Offload, Batch, Sequence, GradientAccumulation,
            Gpu, Budget, Memory, CudaContext, RuntimeBaseline,
        ];
        foreach (var option in all)
        {
            command.Options.Add(option);
        }
    }

    /// <summary>The device named by --gpu (or null), with --memory for the CPU.</summary>
    public GpuSpec? ResolveGpu(ParseResult result)
    {
        var name = result.GetValue(Gpu);
        if (name is null)
        {
            return null;
        }
        var memory = result.GetValue(Memory);
        return GpuCatalog.Find(name, memory is null ? null : ParseSize(memory, "--memory"));
    }

    /// <summary>The device budget: --budget, else the device's memory, else null.</summary>
    public long? ResolveBudget(ParseResult result, GpuSpec? gpu)
    {
        var budget = result.GetValue(Budget);
        if (budget is not null)
        {
            long bytes = ParseSize(budget, "--budget");
            if (bytes <= 0)
            {
                throw new PlanException("--budget must be positive");
            }
            return bytes;
        }
        return gpu?.MemoryBytes;
    }

    /// <summary>Framework overhead for the device: the CUDA context on GPUs, the measured baseline everywhere.</summary>
    public FrameworkOverhead ResolveOverhead(ParseResult result, ComputeDevice device)
    {
        var context = result.GetValue(CudaContext);
        var baseline = result.GetValue(RuntimeBaseline);
        long contextBytes = device == ComputeDevice.Cpu ? 0
            : context is null ? FrameworkOverhead.DefaultCudaContextBytes : ParseSize(context, "--cuda-context");
        return new FrameworkOverhead(contextBytes, baseline is null ? 0 : ParseSize(baseline, "--runtime-baseline"));
    }

    /// <summary>Builds the plan the options describe.</summary>
    /// <exception cref="PlanException">An option has an invalid value.</exception>
    /// <exception cref="ModelConfigException">The model cannot be resolved.</exception>
    public RunPlan Build(ParseResult result, GpuSpec? gpu)
    {
        var model = ModelCatalog.Resolve(result.GetValue(Model)!);
        var mode = PlanNames.ParseMode(result.GetValue(Mode)!);
        var device = gpu?.Device ?? ComputeDevice.Cuda;
        int rank = result.GetValue(LoraRank);
        if (rank < 0)
        {
            throw new PlanException($"--lora-r cannot be negative (got {rank})");
        }
        LoraSettings? lora = null;
        if (rank > 0)
        {
            var targets = result.GetValue(LoraTargets)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            lora = new LoraSettings(rank, result.GetValue(LoraAlpha) ?? 2.0 * rank, targets, result.GetValue(LoraDropout));
        }
        var optimizer = result.GetValue(Optimizer);
        var quant = PlanNames.ParseQuantization(result.GetValue(Quant)!);
        return new RunPlan
        {
            Model = model,
            Mode = mode,
            Precision = PlanNames.ParsePrecision(result.GetValue(Precision)!),
            Quantization = new Planning.Quantization(quant, Nf4DoubleQuant: result.GetValue(DoubleQuant)),
            Lora = lora,
            Optimizer = optimizer is not null ? PlanNames.ParseOptimizer(optimizer)
                : mode == RunMode.Train ? OptimizerKind.AdamW : OptimizerKind.None,
            Checkpointing = new Checkpointing(result.GetValue(CheckpointEvery)),
            Fp32NormsAndHead = result.GetValue(Fp32NormsAndHead),
            Attention = PlanNames.ParseAttention(result.GetValue(Attention)!),
            Loss = ParseLoss(result.GetValue(Loss)!, result.GetValue(LossChunk)),
            Sharding = new Sharding(PlanNames.ParseStrategy(result.GetValue(Fsdp)!), result.GetValue(Gpus)),
            Offload = PlanNames.ParseOffload(result.GetValue(Offload)!),
            MicroBatchSize = result.GetValue(Batch),
            SequenceLength = result.GetValue(Sequence),
            GradientAccumulationSteps = result.GetValue(GradientAccumulation),
            Device = device,
            Overhead = ResolveOverhead(result, device),
        };
    }

    /// <summary>Parses a size option, naming the option in the error.</summary>
    public static long ParseSize(string text, string option)
    {
        try
        {
            return ByteSize.Parse(text);
        }
        catch (FormatException e)
        {
            throw new PlanException($"{option}: {e.Message}");
        }
    }

    private static LossComputation ParseLoss(string name, int chunk) => name.Trim().ToLowerInvariant() switch
    {
        "full" => LossComputation.Full,
        "chunked" => new LossComputation(true, chunk),
        _ => throw new PlanException(string.Create(CultureInfo.InvariantCulture, $"unknown loss '{name}' (expected full or chunked)")),
    };
}
