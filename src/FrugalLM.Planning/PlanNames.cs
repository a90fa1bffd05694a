namespace FrugalLM.Planning;

/// <summary>
/// The command-line spellings of plan settings, in one place so every command (estimate, plan, train) accepts and
/// prints the same words.
/// </summary>
public static class PlanNames
{
    private static readonly (string Name, Precision Value)[] Precisions =
        [("fp32", Precision.Fp32), ("bf16", Precision.Bf16), ("fp16", Precision.Fp16), ("bf16-pure", Precision.Bf16Pure)];

    private static readonly (string Name, QuantizationKind Value)[] Quantizations =
        [("none", QuantizationKind.None), ("int8", QuantizationKind.Int8), ("nf4", QuantizationKind.Nf4)];

    private static readonly (string Name, OptimizerKind Value)[] Optimizers =
        [("adamw", OptimizerKind.AdamW), ("adamw8bit", OptimizerKind.AdamW8bit), ("sgd", OptimizerKind.SgdMomentum), ("none", OptimizerKind.None)];

    private static readonly (string Name, ShardingStrategy Value)[] Strategies =
        [("none", ShardingStrategy.None), ("full", ShardingStrategy.FullShard), ("grad-op", ShardingStrategy.ShardGradOp)];

    private static readonly (string Name, AttentionKind Value)[] Attentions =
        [("sdpa", AttentionKind.Sdpa), ("eager", AttentionKind.Eager)];

    private static readonly (string Name, RunMode Value)[] Modes =
        [("train", RunMode.Train), ("generate", RunMode.Generate), ("infer", RunMode.Generate)];

    /// <summary>Accepted precision names.</summary>
    public static IReadOnlyList<string> PrecisionNames { get; } = Precisions.Select(p => p.Name).ToArray();

    /// <summary>Accepted quantization names.</summary>
    public static IReadOnlyList<string> QuantizationNames { get; } = Quantizations.Select(p => p.Name).ToArray();

    /// <summary>Accepted optimizer names.</summary>
    public static IReadOnlyList<string> OptimizerNames { get; } = Optimizers.Select(p => p.Name).ToArray();

    /// <summary>Accepted FSDP strategy names.</summary>
    public static IReadOnlyList<string> StrategyNames { get; } = Strategies.Select(p => p.Name).ToArray();

    /// <summary>Accepted attention names.</summary>
    public static IReadOnlyList<string> AttentionNames { get; } = Attentions.Select(p => p.Name).ToArray();

    /// <summary>Accepted mode names.</summary>
    public static IReadOnlyList<string> ModeNames { get; } = Modes.Select(p => p.Name).ToArray();

    /// <summary>Accepted offload policy names.</summary>
    public static IReadOnlyList<string> OffloadNames { get; } = OffloadPolicy.Named.Select(p => p.Name).ToArray();

    /// <summary>Parses a precision name.</summary>
    public static Precision ParsePrecision(string name) => Find(Precisions, name, "precision");

    /// <summary>Parses a quantization name.</summary>
    public static QuantizationKind ParseQuantization(string name) => Find(Quantizations, name, "quantization");

    /// <summary>Parses an optimizer name.</summary>
    public static OptimizerKind ParseOptimizer(string name) => Find(Optimizers, name, "optimizer");

    /// <summary>Parses an FSDP strategy name.</summary>
    public static ShardingStrategy ParseStrategy(string name) => Find(Strategies, name, "FSDP strategy");

    /// <summary>Parses an attention name.</summary>
    public static AttentionKind ParseAttention(string name) => Find(Attentions, name, "attention");

    /// <summary>Parses a mode name (<c>infer</c> is a synonym of <c>generate</c>).</summary>
    public static RunMode ParseMode(string name) => Find(Modes, name, "mode");

    /// <summary>Parses an offload policy name.</summary>
    public static OffloadPolicy ParseOffload(string name) =>
        OffloadPolicy.Named.FirstOrDefault(p => string.Equals(p.Name, name, StringComparison.OrdinalIgnoreCase))
        ?? throw new PlanException($"unknown offload '{name}' (expected one of: {string.Join(", ", OffloadNames)})");

    /// <summary>The CLI name of a precision.</summary>
    public static string Format(Precision value) => Name(Precisions, value);

    /// <summary>The CLI name of a quantization.</summary>
    public static string Format(QuantizationKind value) => Name(Quantizations, value);

    /// <summary>The CLI name of an optimizer.</summary>
    public static string Format(OptimizerKind value) => Name(Optimizers, value);

    /// <summary>The CLI name of an FSDP strategy.</summary>
    public static string Format(ShardingStrategy value) => Name(Strategies, value);

    /// <summary>The CLI name of an attention kind.</summary>
    public static string Format(AttentionKind value) => Name(Attentions, value);

    /// <summary>The CLI name of a mode.</summary>
    public static string Format(RunMode value) => Name(Modes, value);

    /// <summary>The CLI name of a tier.</summary>
    public static string Format(MemoryTier value) => value.ToString().ToLowerInvariant();

    private static T Find<T>((string Name, T Value)[] table, string name, string what)
    {
        foreach (var (n, v) in table)
        {
            if (string.Equals(n, name?.Trim(), StringComparison.OrdinalIgnoreCase))
            {
                return v;
            }
        }
        throw new PlanException($"unknown {what} '{name}' (expected one of: {string.Join(", ", table.Select(t => t.Name))})");
    }

    private static string Name<T>((string Name, T Value)[] table, T value) where T : struct, Enum =>
        table.First(t => EqualityComparer<T>.Default.Equals(t.Value, value)).Name;
}
