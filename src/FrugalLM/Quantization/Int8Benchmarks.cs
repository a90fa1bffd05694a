using System.Diagnostics;
using System.Globalization;
using System.Text;
using FrugalLM.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Quantization;

/// <summary>What <see cref="Int8Benchmarks.Run(TextWriter, Int8BenchmarkOptions)"/> measures.</summary>
public sealed record Int8BenchmarkOptions
{
    /// <summary>Fewest timed rounds per cell (after one warm-up round); cells also run for at least <see cref="MinSecondsPerCell"/>.</summary>
    public int Rounds { get; init; } = 7;

    /// <summary>Layer shapes as (out, in); by default LLaMA-7B's projections.</summary>
    public IReadOnlyList<(int Out, int In)> Shapes { get; init; } = Int8Benchmarks.Llama7BShapes;

    /// <summary>Tokens per call; by default decoding, a small batch and a prompt.</summary>
    public IReadOnlyList<int> TokenCounts { get; init; } = Int8Benchmarks.TokenCounts;

    /// <summary>Least time per cell, so that the fast small-token cells take enough samples for a stable median.</summary>
    public double MinSecondsPerCell { get; init; } = 1.0;
}

/// <summary>One cell of the int8 speed table: medians in milliseconds per call.</summary>
/// <param name="Out">Output features.</param>
/// <param name="In">Input features.</param>
/// <param name="Tokens">Rows of the input.</param>
/// <param name="Fp32Ms">libtorch <c>linear</c> in float32.</param>
/// <param name="Bf16Ms">libtorch <c>linear</c> in bfloat16.</param>
/// <param name="Int8Ms">The <see cref="Int8Linear"/> forward (threshold 6).</param>
/// <param name="Rounds">Timed rounds behind the medians.</param>
public sealed record Int8BenchmarkRow(int Out, int In, int Tokens, double Fp32Ms, double Bf16Ms, double Int8Ms, int Rounds)
{
    /// <summary>How many times faster int8 is than float32.</summary>
    public double SpeedupVsFp32 => Fp32Ms / Int8Ms;

    /// <summary>How many times faster int8 is than bfloat16.</summary>
    public double SpeedupVsBf16 => Bf16Ms / Int8Ms;

    /// <summary>The row as a line of the Markdown table.</summary>
    public string ToMarkdown() => string.Create(CultureInfo.InvariantCulture,
        $"| {Out} x {In} | {Tokens} | {Fp32Ms:F3} | {Bf16Ms:F3} | {Int8Ms:F3} | {SpeedupVsFp32:F2}x | {SpeedupVsBf16:F2}x |");
}

/// <summary>The speed table: a line on the settings, then one row per shape and token count.</summary>
/// <param name="Settings">Kernel, threads, CPUs and the rounds rule.</param>
/// <param name="Rows">The cells, in shape then token order.</param>
public sealed record Int8BenchmarkReport(string Settings, IReadOnlyList<Int8BenchmarkRow> Rows)
{
    /// <summary>The header of the Markdown table (two lines).</summary>
    public const string TableHeader =
        "| out x in | tokens | fp32 ms | bf16 ms | int8 ms | int8 vs fp32 | int8 vs bf16 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |";

    /// <summary>The settings line, a blank line and the table.</summary>
    public string ToMarkdown()
    {
        var text = new StringBuilder();
        text.Append(Settings).Append("\n\n").Append(TableHeader).Append('\n');
        foreach (var row in Rows)
        {
            text.Append(row.ToMarkdown()).Append('\n');
        }
        return text.ToString();
    }
}

/// <summary>
/// Times the <see cref="Int8Linear"/> forward (activation quantization, outlier search, int8 product,
/// dequantization) against libtorch's float32 and bfloat16 <c>linear</c> on LLaMA-7B projection shapes. The
/// three run in turn within each round, so a slow spell of a shared machine hits all of them; each cell is
/// the median over rounds. <c>frugal bench int8-kernels</c> runs it.
/// </summary>
public static class Int8Benchmarks
{
    private const int MaxRounds = 200;

    /// <summary>LLaMA-7B projection shapes as (out, in): q/k/v/o, gate/up, down.</summary>
    public static IReadOnlyList<(int Out, int In)> Llama7BShapes { get; } = [(4096, 4096), (11008, 4096), (4096, 11008)];

    /// <summary>Tokens per call: decoding, a small batch, a prompt.</summary>
    public static IReadOnlyList<int> TokenCounts { get; } = [1, 16, 512];

    /// <summary>Runs the comparison on LLaMA-7B shapes and writes a Markdown table (milliseconds per call, speed-ups).</summary>
    /// <param name="output">Where the table goes, one line per shape and token count as it finishes.</param>
    /// <param name="rounds">Fewest timed rounds per cell (after one warm-up round); cells also run for at least a second.</param>
    public static Int8BenchmarkReport Run(TextWriter output, int rounds = 7) =>
        Run(output, new Int8BenchmarkOptions { Rounds = rounds });

    /// <summary>Runs the comparison as <paramref name="options"/> say and writes a Markdown table as it goes.</summary>
    /// <param name="output">Where the table goes, one line per shape and token count as it finishes.</param>
    /// <param name="options">Rounds, shapes and token counts.</param>
    /// <returns>The table, also written to <paramref name="output"/>.</returns>
    public static Int8BenchmarkReport Run(TextWriter output, Int8BenchmarkOptions options)
    {
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Rounds, 1);
        if (options.Shapes.Count == 0 || options.Shapes.Any(s => s.Out < 1 || s.In < 1))
        {
            throw new ArgumentException("shapes must be a non-empty list of positive out x in sizes", nameof(options));
        }
        if (options.TokenCounts.Count == 0 || options.TokenCounts.Any(t => t < 1))
        {
            throw new ArgumentException("token counts must be a non-empty list of positive numbers", nameof(options));
        }
        TorchRuntime.Initialize();
        var settings = string.Create(CultureInfo.InvariantCulture,
            $"int8 kernel {Int8Gemm.PreferredKernel}, {TorchRuntime.Threads} threads, {Environment.ProcessorCount} logical CPUs; medians of at least {options.Rounds} alternating rounds (and {options.MinSecondsPerCell:0.##} s) per row");
        output.WriteLine(settings);
        output.WriteLine();
        output.WriteLine(Int8BenchmarkReport.TableHeader);
        var rows = new List<Int8BenchmarkRow>();
        using var noGrad = no_grad();
        foreach (var (outFeatures, inFeatures) in options.Shapes)
        {
            using var scope = NewDisposeScope();
            var weight = randn(outFeatures, inFeatures) * 0.02;
            var weight16 = weight.to(ScalarType.BFloat16);
            using var int8 = Int8Linear.FromLinear(nn.Linear(new TorchSharp.Modules.Parameter(weight.clone(), requires_grad: false)));
            foreach (int tokens in options.TokenCounts)
            {
                using var inner = NewDisposeScope();
                var x = randn(tokens, inFeatures);
                var x16 = x.to(ScalarType.BFloat16);
                Action[] runs =
                [
                    () => nn.functional.linear(x, weight).Dispose(),
                    () => nn.functional.linear(x16, weight16).Dispose(),
                    () => int8.forward(x).Dispose(),
                ];
                var times = runs.Select(_ => new List<double>()).ToArray();
                // At least `rounds` rounds and the minimum time per cell, so that the fast small-token cells take
                // enough samples for a median that one slow spell cannot move.
                long started = Stopwatch.GetTimestamp();
                for (int round = 0; round <= options.Rounds || (round <= MaxRounds && Stopwatch.GetElapsedTime(started).TotalSeconds < options.MinSecondsPerCell); round++)
                {
                    for (int i = 0; i < runs.Length; i++)
                    {
                        long start = Stopwatch.GetTimestamp();
                        runs[i]();
                        if (round > 0)
                        {
                            times[i].Add(Stopwatch.GetElapsedTime(start).TotalMilliseconds);
                        }
                    }
                }
                var row = new Int8BenchmarkRow(outFeatures, inFeatures, tokens, Median(times[0]), Median(times[1]), Median(times[2]), times[0].Count);
                rows.Add(row);
                output.WriteLine(row.ToMarkdown());
                output.Flush();
            }
        }
        return new Int8BenchmarkReport(settings, rows);
    }

    private static double Median(List<double> values)
    {
        values.Sort();
        int n = values.Count;
        return n % 2 == 1 ? values[n / 2] : (values[(n / 2) - 1] + values[n / 2]) / 2;
    }
}
