using System.Globalization;
using System.Text.Json.Serialization;
using FrugalLM.Planning;

namespace FrugalLM.Cli.Bench;

/// <summary>
/// One configuration of <c>frugal bench</c>: a model, a technique combination and a workload. The parent process
/// serializes it to a child (one configuration per process, so every peak is its own), and the same values
/// become the PyTorch peer's arguments where the peer has the configuration.
/// </summary>
internal sealed record BenchCase
{
    /// <summary>Short model label (the folder or config file name).</summary>
    public required string Model { get; init; }

    /// <summary>The model's config.json.</summary>
    public required string Config { get; init; }

    /// <summary>A folder with that config and seeded random weights (fp32), prepared by the parent.</summary>
    public required string Weights { get; init; }

    /// <summary>train or generate.</summary>
    public string Mode { get; init; } = "train";

    /// <summary>fp32, bf16, fp16 or bf16-pure.</summary>
    public string Precision { get; init; } = "fp32";

    /// <summary>Gradient checkpointing of every decoder layer.</summary>
    public bool Checkpointing { get; init; }

    /// <summary>LoRA rank (0: full training).</summary>
    public int LoraRank { get; init; }

    /// <summary>LoRA targets.</summary>
    public string LoraTargets { get; init; } = "q_proj,v_proj";

    /// <summary>none or int8 (LLM.int8()).</summary>
    public string Quantize { get; init; } = "none";

    /// <summary>adamw or adamw8bit.</summary>
    public string Optimizer { get; init; } = "adamw";

    /// <summary>Loss chunk in tokens (frugal train's default; 0: full fp32 logits, as transformers and the peer).</summary>
    public int LossChunk { get; init; } = LossComputation.DefaultChunkTokens;

    /// <summary>none, optimizer (the step on the host in C#), params (a LoRA base's layers copied from the host tier), all,
    /// or disk (a LoRA base's layers read from the weights folder).</summary>
    public string Offload { get; init; } = "none";

    /// <summary>FSDP strategy: none, full or grad-op.</summary>
    public string Fsdp { get; init; } = "none";

    /// <summary>Processes under FSDP (launched through <c>frugal launch</c> above one); memory and speed are rank 0's.</summary>
    public int Ranks { get; init; } = 1;

    /// <summary>Sequences per step.</summary>
    public int Batch { get; init; } = 4;

    /// <summary>Training tokens per sequence.</summary>
    public int Seq { get; init; } = 256;

    /// <summary>Timed steps (one whole generation each when generating).</summary>
    public int Steps { get; init; } = 3;

    /// <summary>Untimed steps before them.</summary>
    public int Warmup { get; init; } = 1;

    /// <summary>CPU threads of both runtimes.</summary>
    public int Threads { get; init; } = 2;

    /// <summary>Seed of data and adapters.</summary>
    public int Seed { get; init; }

    /// <summary>Prompt length when generating.</summary>
    public int PromptTokens { get; init; } = 32;

    /// <summary>New tokens per generation.</summary>
    public int NewTokens { get; init; } = 64;

    /// <summary>A readable label of the technique combination.</summary>
    [JsonIgnore]
    public string Technique
    {
        get
        {
            var parts = new List<string> { Precision };
            if (Quantize != "none")
            {
                parts.Add($"{Quantize} base");
            }
            if (Mode == "train")
            {
                parts.Add(LoraRank > 0 ? $"LoRA r{LoraRank}" : "full");
                if (Checkpointing)
                {
                    parts.Add("ckpt");
                }
                if (Optimizer != "adamw")
                {
                    parts.Add(Optimizer);
                }
                if (LossChunk == 0)
                {
                    parts.Add("full logits");
                }
                else if (LossChunk != LossComputation.DefaultChunkTokens)
                {
                    parts.Add(string.Create(CultureInfo.InvariantCulture, $"loss chunk {LossChunk}"));
                }
            }
            else
            {
                parts.Add("generate");
            }
            if (Offload != "none")
            {
                parts.Add($"offload {Offload}");
            }
            if (Fsdp != "none")
            {
                parts.Add(string.Create(CultureInfo.InvariantCulture, $"FSDP {Fsdp} x{Ranks} (per rank)"));
            }
            return string.Join(", ", parts);
        }
    }

    /// <summary>True when the PyTorch peer (tools/peer_bench.py) runs the same configuration.</summary>
    [JsonIgnore]
    public bool PeerHas => Offload == "none" && Fsdp == "none" && (Mode == "train"
        ? Precision is "fp32" or "bf16" && Quantize == "none" && Optimizer == "adamw"
        : Precision is "fp32" or "bf16" && Quantize is "none" or "int8");

    /// <summary>The plan this case runs, with <paramref name="disk"/> as its policy when it offloads to disk.</summary>
    public RunPlan Plan(ModelSpec spec, OffloadPolicy disk) => Plan(spec) with
    {
        Offload = Offload switch
        {
            "disk" => disk,
            "none" => OffloadPolicy.None,
            _ => PlanNames.ParseOffload(Offload),
        },
        Sharding = Fsdp == "none" ? Planning.Sharding.None : new Planning.Sharding(PlanNames.ParseStrategy(Fsdp), Ranks),
    };

    /// <summary>The plan this case runs (the estimator reads it; the child runs it).</summary>
    public RunPlan Plan(ModelSpec spec) => new()
    {
        Model = spec,
        Mode = Mode == "train" ? RunMode.Train : RunMode.Generate,
        Precision = PlanNames.ParsePrecision(Precision),
        Optimizer = Mode == "train" ? PlanNames.ParseOptimizer(Optimizer) : OptimizerKind.None,
        Quantization = Quantize == "int8" ? Planning.Quantization.Int8 : Planning.Quantization.None,
        Checkpointing = Mode == "train" && Checkpointing ? new Planning.Checkpointing(1) : Planning.Checkpointing.None,
        Loss = Mode == "train" && LossChunk > 0 ? new LossComputation(true, LossChunk) : LossComputation.Full,
        Lora = LoraRank > 0 ? new LoraSettings(LoraRank, 2.0 * LoraRank, LoraTargets.Split(','), 0) : null,
        MicroBatchSize = Mode == "train" ? Batch : 1,
        SequenceLength = Mode == "train" ? Seq : PromptTokens + NewTokens,
        Device = ComputeDevice.Cpu,
    };

    /// <summary>The peer's command-line arguments for this case.</summary>
    public IEnumerable<string> PeerArguments()
    {
        var args = new List<string>
        {
            "--config", Config, "--mode", Mode, "--precision", Precision, "--threads", Inv(Threads), "--seed", Inv(Seed),
            "--steps", Inv(Steps), "--warmup", Inv(Warmup),
        };
        if (Mode == "train")
        {
            args.AddRange(["--batch", Inv(Batch), "--seq", Inv(Seq), "--checkpointing", Checkpointing ? "1" : "0", "--lora-r", Inv(LoraRank)]);
            if (LoraRank > 0)
            {
                args.AddRange(["--lora-targets", LoraTargets]);
            }
        }
        else
        {
            args.AddRange(["--batch", "1", "--prompt-tokens", Inv(PromptTokens), "--new-tokens", Inv(NewTokens), "--quantize", Quantize]);
        }
        return args;
    }

    private static string Inv(int value) => value.ToString(CultureInfo.InvariantCulture);
}

/// <summary>What one run of a case measured (ours or the peer's), in bytes and seconds.</summary>
internal sealed record BenchMeasurement
{
    /// <summary>"frugal" or "pytorch".</summary>
    public required string Runtime { get; init; }

    /// <summary>Resident set before the model (libraries, data).</summary>
    public long BaselineBytes { get; init; }

    /// <summary>Peak resident set (VmHWM after a reset at the baseline), read after the last step.</summary>
    public long PeakBytes { get; init; }

    /// <summary>Resident set after the warm-up, before the timed steps (model states in place).</summary>
    public long SteadyBytes { get; init; }

    /// <summary>Peak during the timed steps (VmHWM reset after the warm-up).</summary>
    public long StepPeakBytes { get; init; }

    /// <summary>Median training tokens/s (batch x seq over the median step).</summary>
    public double? TokensPerSecond { get; init; }

    /// <summary>Median prefill tokens/s.</summary>
    public double? PrefillTokensPerSecond { get; init; }

    /// <summary>Median decode tokens/s.</summary>
    public double? DecodeTokensPerSecond { get; init; }

    /// <summary>Seconds of each timed step.</summary>
    public IReadOnlyList<double> StepSeconds { get; init; } = [];

    /// <summary>Loss of the first and last step (training; random tokens keep it near ln(vocab)).</summary>
    public double? LossFirst { get; init; }

    /// <summary>Loss of the last step.</summary>
    public double? LossLast { get; init; }

    /// <summary>Parameters of the model.</summary>
    public long Parameters { get; init; }

    /// <summary>Parameters the optimizer updates.</summary>
    public long TrainableParameters { get; init; }

    /// <summary>Measured optimizer-state bytes (ours).</summary>
    public long? OptimizerStateBytes { get; init; }

    /// <summary>Peak above the baseline.</summary>
    [JsonIgnore]
    public long PeakAboveBaseline => PeakBytes - BaselineBytes;
}

/// <summary>A case with the estimator's prediction and the measurements of both runtimes.</summary>
internal sealed record BenchResult
{
    public required BenchCase Case { get; init; }

    /// <summary>The estimator's device peak for the case's plan, above the runtime baseline.</summary>
    public long PredictedBytes { get; init; }

    /// <summary>The estimator's components (key to bytes), baseline excluded.</summary>
    public IReadOnlyDictionary<string, long> PredictedComponents { get; init; } = new Dictionary<string, long>();

    /// <summary>Our runs (one per repeat).</summary>
    public List<BenchMeasurement> Ours { get; init; } = [];

    /// <summary>The peer's runs (empty where it has no such configuration or was not asked for).</summary>
    public List<BenchMeasurement> Peer { get; init; } = [];

    /// <summary>Why the peer has no figure, when it has none.</summary>
    public string? PeerNote { get; init; }

    /// <summary>Error of a failed run of ours.</summary>
    public string? Error { get; init; }
}
