using System.CommandLine;
using FrugalLM.Planning;

namespace FrugalLM.Cli;

// FrugalLM.Quantization is also a namespace; here the name means the plan record.
using Quantization = FrugalLM.Planning.Quantization;

/// <summary>The <c>--quantize</c> options shared by train, generate and eval.</summary>
internal sealed class QuantizeOptions
{
    public Option<string> Quantize { get; } = new("--quantize") { Description = "Base linear weights: none, or int8 (LLM.int8(): per-row int8 weights, per-token int8 activations, outlier features in 16/32 bits)", DefaultValueFactory = _ => "none" };

    public Option<double> Threshold { get; } = new("--int8-threshold") { Description = "LLM.int8() outlier threshold on |x|; 0 disables the decomposition", DefaultValueFactory = _ => 6.0 };

    public Option<string> Skip { get; } = new("--int8-skip") { Description = "Comma-separated linear layers kept in full precision", DefaultValueFactory = _ => "lm_head" };

    public IEnumerable<Option> All => [Quantize, Threshold, Skip];

    /// <summary>The plan's quantization from the parsed options.</summary>
    public Quantization Read(ParseResult result) => result.GetValue(Quantize) switch
    {
        "none" => Quantization.None,
        "int8" => new Quantization(QuantizationKind.Int8, OutlierThreshold: result.GetValue(Threshold))
        {
            SkipModules = result.GetValue(Skip)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
        },
        var other => throw new ArgumentException($"--quantize must be none or int8 (got '{other}')"),
    };
}
