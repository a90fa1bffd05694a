using System.Text.RegularExpressions;

namespace FrugalLM.Lora;

/// <summary>How a <see cref="LoraTargets"/> selects modules.</summary>
public enum LoraTargetKind
{
    /// <summary>A list of names, each matching a module path exactly or as a dotted suffix.</summary>
    Names,

    /// <summary>A regular expression that must match the whole module path.</summary>
    Regex,

    /// <summary>Every linear layer except the output head (<c>lm_head</c>).</summary>
    AllLinear,
}

/// <summary>
/// Which linear layers an adapter wraps (or, as <see cref="LoraConfig.Exclude"/>, leaves alone), with PEFT's
/// <c>target_modules</c> semantics: a list of names matches a module whose path equals a name or ends with
/// <c>"." + name</c> (so <c>q_proj</c> and <c>self_attn.q_proj</c> both select every layer's query
/// projection); a string is a regular expression matched against the whole path (Python's
/// <c>re.fullmatch</c>); <c>all-linear</c> is every linear layer but the output head.
/// </summary>
public sealed class LoraTargets
{
    /// <summary>PEFT's spelling of <see cref="LoraTargetKind.AllLinear"/>.</summary>
    public const string AllLinearName = "all-linear";

    /// <summary>The prefix that makes <see cref="Parse"/> read a regular expression.</summary>
    public const string RegexPrefix = "re:";

    private readonly Regex? regex;

    private LoraTargets(LoraTargetKind kind, IReadOnlyList<string> names, string? pattern)
    {
        Kind = kind;
        Names = names;
        RegexPattern = pattern;
        if (pattern is not null)
        {
            try
            {
                // \z, not $: Python's fullmatch does not let a trailing newline through.
                regex = new Regex($"^(?:{pattern})\\z", RegexOptions.CultureInvariant, TimeSpan.FromSeconds(1));
            }
            catch (ArgumentException e)
            {
                throw new ArgumentException($"target pattern '{pattern}' is not a valid regular expression: {e.Message}", nameof(pattern), e);
            }
        }
    }

    /// <summary>Every linear layer except the output head.</summary>
    public static LoraTargets AllLinear { get; } = new(LoraTargetKind.AllLinear, [], null);

    /// <summary>How the modules are selected.</summary>
    public LoraTargetKind Kind { get; }

    /// <summary>The names, for <see cref="LoraTargetKind.Names"/>; empty otherwise.</summary>
    public IReadOnlyList<string> Names { get; }

    /// <summary>The regular expression, for <see cref="LoraTargetKind.Regex"/>; null otherwise.</summary>
    public string? RegexPattern { get; }

    /// <summary>Targets by name: each matches a module path exactly or as a dotted suffix.</summary>
    /// <exception cref="ArgumentException">No names, or an empty one.</exception>
    public static LoraTargets FromNames(IEnumerable<string> names)
    {
        var list = names.Select(n => n.Trim()).ToList();
        if (list.Count == 0)
        {
            throw new ArgumentException("target modules: give at least one name", nameof(names));
        }
        if (list.Any(n => n.Length == 0 || n.StartsWith('.') || n.EndsWith('.')))
        {
            throw new ArgumentException($"target modules: '{string.Join(",", list)}' has an empty name or a name with a leading or trailing dot", nameof(names));
        }
        return new LoraTargets(LoraTargetKind.Names, list.Distinct(StringComparer.Ordinal).ToList(), null);
    }

    /// <summary>Targets by a regular expression that must match a whole module path.</summary>
    /// <exception cref="ArgumentException">The pattern is empty or not a valid regular expression.</exception>
    public static LoraTargets FromRegex(string pattern)
    {
        if (string.IsNullOrEmpty(pattern))
        {
            throw new ArgumentException("target pattern is empty", nameof(pattern));
        }
        return new LoraTargets(LoraTargetKind.Regex, [], pattern);
    }

    /// <summary>
    /// Reads a command-line value: <c>all-linear</c>; <c>re:PATTERN</c> for a regular expression; otherwise
    /// comma-separated names (<c>q_proj,v_proj</c>).
    /// </summary>
    public static LoraTargets Parse(string text)
    {
        var trimmed = text.Trim();
        if (trimmed.Equals(AllLinearName, StringComparison.OrdinalIgnoreCase))
        {
            return AllLinear;
        }
        return trimmed.StartsWith(RegexPrefix, StringComparison.Ordinal)
            ? FromRegex(trimmed[RegexPrefix.Length..])
            : FromNames(trimmed.Split(',', StringSplitOptions.TrimEntries));
    }

    /// <summary>
    /// Whether the module at <paramref name="path"/> is selected. <see cref="LoraTargetKind.AllLinear"/>
    /// accepts every path; the caller leaves out the output head and non-linear modules.
    /// </summary>
    public bool Matches(string path) => Kind switch
    {
        LoraTargetKind.Names => Names.Any(n => MatchesName(path, n)),
        LoraTargetKind.Regex => regex!.IsMatch(path),
        _ => true,
    };

    /// <summary>PEFT's list rule: the path is the name, or ends with "." + name.</summary>
    internal static bool MatchesName(string path, string name) =>
        path == name || (path.Length > name.Length && path.EndsWith(name, StringComparison.Ordinal) && path[^(name.Length + 1)] == '.');

    /// <inheritdoc />
    public override string ToString() => Kind switch
    {
        LoraTargetKind.Names => string.Join(",", Names),
        LoraTargetKind.Regex => RegexPrefix + RegexPattern,
        _ => AllLinearName,
    };
}
