using System.Text.RegularExpressions;

namespace FrugalLM.Lora;

/// <summary>Which biases train alongside an adapter (PEFT's <c>bias</c>).</summary>
public enum LoraBias
{
    /// <summary>No bias trains (PEFT "none").</summary>
    None,

    /// <summary>The biases of the wrapped layers train and are saved with the adapter (PEFT "lora_only").</summary>
    LoraOnly,

    /// <summary>Every bias of the model trains and is saved with the adapter (PEFT "all").</summary>
    All,
}

/// <summary>
/// A LoRA adapter's settings, named and defaulted as PEFT's <c>LoraConfig</c> (r 8, alpha 8, no dropout, no
/// bias, and PEFT's LLaMA default targets <c>q_proj</c>, <c>v_proj</c>). The adapter adds
/// <c>dropout(x) Aᵀ Bᵀ · scale</c> to each wrapped layer's output, with A [r, in], B [out, r] and scale
/// alpha / r (alpha / √r with <see cref="UseRsLora"/>).
/// </summary>
public sealed record LoraConfig
{
    /// <summary>The rank r (PEFT <c>r</c>).</summary>
    public int Rank { get; init; } = 8;

    /// <summary>The scale numerator alpha (PEFT <c>lora_alpha</c>).</summary>
    public double Alpha { get; init; } = 8;

    /// <summary>Dropout probability on the adapter's input while training (PEFT <c>lora_dropout</c>).</summary>
    public double Dropout { get; init; }

    /// <summary>The layers to wrap (PEFT <c>target_modules</c>).</summary>
    public LoraTargets Targets { get; init; } = LoraTargets.FromNames(["q_proj", "v_proj"]);

    /// <summary>Layers never to wrap even when targeted (PEFT <c>exclude_modules</c>): names or a regex.</summary>
    public LoraTargets? Exclude { get; init; }

    /// <summary>Which biases train (PEFT <c>bias</c>).</summary>
    public LoraBias Bias { get; init; } = LoraBias.None;

    /// <summary>Rank-stabilized LoRA: scale alpha / √r instead of alpha / r (PEFT <c>use_rslora</c>).</summary>
    public bool UseRsLora { get; init; }

    /// <summary>
    /// Per-module ranks (PEFT <c>rank_pattern</c>): a key is a regular expression matched against the whole
    /// module path or a dotted suffix of it.
    /// </summary>
    public IReadOnlyDictionary<string, int> RankPattern { get; init; } = new Dictionary<string, int>();

    /// <summary>Per-module alphas (PEFT <c>alpha_pattern</c>), keyed like <see cref="RankPattern"/>.</summary>
    public IReadOnlyDictionary<string, double> AlphaPattern { get; init; } = new Dictionary<string, double>();

    /// <summary>
    /// Only wrap layers of these decoder-layer indices (PEFT <c>layers_to_transform</c>); null means all.
    /// Needs name targets, as in PEFT.
    /// </summary>
    public IReadOnlyList<int>? LayersToTransform { get; init; }

    /// <summary>
    /// Names of the layer list(s) whose index <see cref="LayersToTransform"/> reads (PEFT
    /// <c>layers_pattern</c>, e.g. <c>layers</c>); null means the first numbered path segment.
    /// </summary>
    public IReadOnlyList<string>? LayersPattern { get; init; }

    /// <summary>The scale of an adapter of rank <paramref name="rank"/> and alpha <paramref name="alpha"/>.</summary>
    public double ScaleFor(int rank, double alpha) => UseRsLora ? alpha / Math.Sqrt(rank) : alpha / rank;

    /// <summary>The scale of a module without a pattern override.</summary>
    public double Scale => ScaleFor(Rank, Alpha);

    /// <summary>Checks the values; throws <see cref="ArgumentException"/> naming the bad one.</summary>
    public void Validate()
    {
        static void Require(bool ok, string message)
        {
            if (!ok)
            {
                throw new ArgumentException(message);
            }
        }
        Require(Rank >= 1, $"LoRA rank must be at least 1 (got {Rank})");
        Require(double.IsFinite(Alpha) && Alpha > 0, $"LoRA alpha must be a positive number (got {Alpha})");
        Require(Dropout >= 0 && Dropout < 1, $"LoRA dropout must be in [0, 1) (got {Dropout})");
        Require(Exclude is null || Exclude.Kind != LoraTargetKind.AllLinear, "LoRA exclude cannot be all-linear");
        foreach (var (key, rank) in RankPattern)
        {
            Require(rank >= 1, $"LoRA rank_pattern '{key}': rank must be at least 1 (got {rank})");
            Require(IsRegex(key), $"LoRA rank_pattern key '{key}' is not a valid regular expression");
        }
        foreach (var (key, alpha) in AlphaPattern)
        {
            Require(double.IsFinite(alpha) && alpha > 0, $"LoRA alpha_pattern '{key}': alpha must be a positive number (got {alpha})");
            Require(IsRegex(key), $"LoRA alpha_pattern key '{key}' is not a valid regular expression");
        }
        Require(LayersToTransform is null || Targets.Kind != LoraTargetKind.Regex, "LoRA layers_to_transform cannot be combined with a regex target (as in PEFT)");
        Require(LayersPattern is null || LayersToTransform is not null, "LoRA layers_pattern needs layers_to_transform");
        Require(LayersToTransform is null || LayersToTransform.All(i => i >= 0), "LoRA layers_to_transform indices must be >= 0");
    }

    /// <summary>
    /// Whether the module at <paramref name="path"/> is wrapped, by PEFT's <c>check_target_module_exists</c>:
    /// excluded modules never are; then the targets decide, and with <see cref="LayersToTransform"/> only
    /// modules of those layer indices qualify (<c>all-linear</c> counts as the list of linear names, as PEFT
    /// 0.14 expands it). <paramref name="isOutputHead"/> leaves the head out of
    /// <c>all-linear</c>.
    /// </summary>
    public bool Selects(string path, bool isOutputHead)
    {
        if (Exclude is not null && Exclude.Matches(path))
        {
            return false;
        }
        if (Targets.Kind == LoraTargetKind.AllLinear ? isOutputHead : !Targets.Matches(path))
        {
            return false;
        }
        // As in PEFT, the layer filter applies to name targets that matched as a suffix (not to a whole
        // path named exactly, nor to a regex).
        if (LayersToTransform is not { Count: > 0 } || Targets.Kind == LoraTargetKind.Regex
            || (Targets.Kind == LoraTargetKind.Names && Targets.Names.Contains(path)))
        {
            return true;
        }
        var patterns = LayersPattern is { Count: > 0 } ? LayersPattern : [@"[^.]*"];
        foreach (var pattern in patterns)
        {
            // PEFT: re.match(r".*?\.{pattern}\.(\d+)\.", key): the first numbered segment after the pattern.
            var match = Regex.Match(path, $@"^.*?\.{pattern}\.(\d+)\.", RegexOptions.CultureInvariant);
            if (match.Success)
            {
                return LayersToTransform.Contains(int.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture));
            }
        }
        return false;
    }

    /// <summary>
    /// Rank and alpha of the module at <paramref name="path"/>: the first key of <see cref="RankPattern"/>
    /// then <see cref="AlphaPattern"/> that matches the whole path or a dotted suffix decides both, as in
    /// PEFT's <c>get_pattern_key</c> (so a rank key that matches first also selects the alpha by that key).
    /// </summary>
    public (int Rank, double Alpha) RankAndAlphaFor(string path)
    {
        foreach (var key in RankPattern.Keys.Concat(AlphaPattern.Keys))
        {
            if (Regex.IsMatch(path, $@"^(?:.*\.)?(?:{key})\z", RegexOptions.CultureInvariant))
            {
                return (RankPattern.TryGetValue(key, out var r) ? r : Rank, AlphaPattern.TryGetValue(key, out var a) ? a : Alpha);
            }
        }
        return (Rank, Alpha);
    }

    private static bool IsRegex(string pattern)
    {
        try
        {
            _ = new Regex(pattern, RegexOptions.CultureInvariant);
            return true;
        }
        catch (ArgumentException)
        {
            return false;
        }
    }
}
