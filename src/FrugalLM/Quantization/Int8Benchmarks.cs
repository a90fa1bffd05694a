using System.Diagnostics;
using System.Globalization;
using FrugalLM.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Quantization;

/// <summary>
/// Times the <see cref="Int8Linear"/> forward (activation quantization, outlier search, int8 product,
/// dequantization) against libtorch's float32 and bfloat16 <c>linear</c> on LLaMA-7B projection shapes. The
/// three run in turn within each round, so a slow spell of a shared machine hits all of them; each cell is
/// the median over rounds.
/// </summary>
public static class Int8Benchmarks
{
    private const int MaxRounds = 200;

    /// <summary>LLaMA-7B projection shapes as (out, in): q/k/v/o, gate/up, down.</summary>
    public static IReadOnlyList<(int Out, int In)> Llama7BShapes { get; } = [(4096, 4096), (11008, 4096), (4096, 11008)];

    /// <summary>Tokens per call: decoding, a small batch, a prompt.</summary>
    public static IReadOnlyList<int> TokenCounts { get; } = [1, 16, 512];

    /// <summary>Runs the comparison and writes a Markdown table (milliseconds per call, speed-ups vs float32).</summary>
    /// <param name="output">Where the table goes, one line per shape and token count as it finishes.</param>
    /// <param name="rounds">Fewest timed rounds per cell (after one warm-up round); cells also run for at least a second.</param>
    public static void Run(TextWriter output, int rounds = 7)
    {
        ArgumentNullException.ThrowIfNull(output);
        ArgumentOutOfRangeException.ThrowIfLessThan(rounds, 1);
        TorchRuntime.Initialize();
        output.WriteLine(FormattableString.Invariant(
            $"int8 kernel {Int8Gemm.PreferredKernel}, {TorchRuntime.Threads} threads, {Environment.ProcessorCount} logical CPUs; medians of at least {rounds} alternating rounds (and 1 s) per row"));
        output.WriteLine();
        output.WriteLine("| out x in | tokens | fp32 ms | bf16 ms | int8 ms | int8 vs fp32 | int8 vs bf16 |");
        output.WriteLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        using var noGrad = no_grad();
        foreach (var (outFeatures, inFeatures) in Llama7BShapes)
        {
            using var scope = NewDisposeScope();
            var weight = randn(outFeatures, inFeatures) * 0.02;
            var weight16 = weight.to(ScalarType.BFloat16);
            using var int8 = Int8Linear.FromLinear(nn.Linear(new TorchSharp.Modules.Parameter(weight.clone(), requires_grad: false)));
            foreach (int tokens in TokenCounts)
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
                // At least `rounds` rounds and a second per cell, so that the fast small-token cells take
                // enough samples for a median that one slow spell cannot move.
                long started = Stopwatch.GetTimestamp();
                for (int round = 0; round <= rounds || (round <= MaxRounds && Stopwatch.GetElapsedTime(started).TotalSeconds < 1); round++)
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
                double fp32 = Median(times[0]), bf16 = Median(times[1]), q8 = Median(times[2]);
                output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"| {outFeatures} x {inFeatures} | {tokens} | {fp32:F3} | {bf16:F3} | {q8:F3} | {fp32 / q8:F2}x | {bf16 / q8:F2}x |"));
            }
        }
    }

    private static double Median(List<double> values)
    {
        values.Sort();
        int n = values.Count;
        return n % 2 == 1 ? values[n / 2] : (values[(n / 2) - 1] + values[n / 2]) / 2;
    }
}
