using System.Globalization;
using System.Text;
using FrugalLM.IO;

namespace FrugalLM.Cli.Bench;

/// <summary>
/// The bench's products: markdown tables (training and generation) and three PNGs (ScottPlot): the
/// estimator's components per configuration with the measured peak beside them, predicted against measured,
/// and throughput against the peer. Every memory figure is above the runtime's own baseline (libraries and
/// data, measured before the model), which is how two runtimes with different libraries compare.
/// </summary>
internal static class BenchReport
{
    public static string Markdown(IReadOnlyList<BenchResult> results)
    {
        var s = new StringBuilder();
        var train = results.Where(r => r.Case.Mode == "train").ToList();
        if (train.Count > 0)
        {
            s.AppendLine("Training: memory above each runtime's baseline (MiB); \"steps\" is the timed steps' peak over the resident set they start from (activations and temporaries); tokens/s is the median step's.");
            s.AppendLine();
            s.AppendLine("| model | configuration | predicted | measured | error | steps | tokens/s | peer tokens/s | speed ours/peer | peer measured | memory ours/peer |");
            s.AppendLine("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            foreach (var r in train)
            {
                var ours = Best(r.Ours);
                var peer = Best(r.Peer);
                s.AppendLine(Inv($"| {r.Case.Model} | {r.Case.Technique} | {Mib(r.PredictedBytes)} | {(ours is null ? Failed(r) : Mib(ours.PeakAboveBaseline))} | {Error(r, ours)} | {(ours is null ? "" : Mib(ours.StepPeakBytes - ours.SteadyBytes))} | {F0(ours?.TokensPerSecond)} | {PeerCell(r, peer, p => F0(p.TokensPerSecond))} | {Ratio(ours?.TokensPerSecond, peer?.TokensPerSecond)} | {PeerCell(r, peer, p => Mib(p.PeakAboveBaseline))} | {Ratio(ours?.PeakAboveBaseline, peer?.PeakAboveBaseline)} |"));
            }
            s.AppendLine();
        }
        var generate = results.Where(r => r.Case.Mode == "generate").ToList();
        if (generate.Count > 0)
        {
            s.AppendLine("Generation (batch 1, greedy, KV cache): memory above each runtime's baseline (MiB); prefill and decode tokens/s are medians.");
            s.AppendLine();
            s.AppendLine("| model | configuration | predicted | measured | error | prefill tok/s | decode tok/s | peer decode tok/s | decode ours/peer | peer measured | memory ours/peer |");
            s.AppendLine("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            foreach (var r in generate)
            {
                var ours = Best(r.Ours);
                var peer = Best(r.Peer);
                s.AppendLine(Inv($"| {r.Case.Model} | {r.Case.Technique} | {Mib(r.PredictedBytes)} | {(ours is null ? Failed(r) : Mib(ours.PeakAboveBaseline))} | {Error(r, ours)} | {F0(ours?.PrefillTokensPerSecond)} | {F1(ours?.DecodeTokensPerSecond)} | {PeerCell(r, peer, p => F1(p.DecodeTokensPerSecond))} | {Ratio(ours?.DecodeTokensPerSecond, peer?.DecodeTokensPerSecond)} | {PeerCell(r, peer, p => Mib(p.PeakAboveBaseline))} | {Ratio(ours?.PeakAboveBaseline, peer?.PeakAboveBaseline)} |"));
            }
            s.AppendLine();
        }
        return s.ToString();
    }

    /// <summary>The run to report among repeats: the median by throughput (memory is near-identical between repeats).</summary>
    public static BenchMeasurement? Best(IReadOnlyList<BenchMeasurement> runs)
    {
        if (runs.Count == 0)
        {
            return null;
        }
        var ordered = runs.OrderBy(m => m.TokensPerSecond ?? m.DecodeTokensPerSecond ?? 0).ToList();
        return ordered[(ordered.Count - 1) / 2];
    }

    /// <summary>Writes the three pictures into <paramref name="folder"/>, one set per model.</summary>
    public static IReadOnlyList<string> Pictures(IReadOnlyList<BenchResult> results, string folder)
    {
        var written = new List<string>();
        foreach (var group in results.GroupBy(r => r.Case.Model))
        {
            var train = group.Where(r => r.Case.Mode == "train" && r.Ours.Count > 0).ToList();
            if (train.Count > 0)
            {
                written.Add(Components(train, Path.Combine(folder, $"{group.Key}-memory-components.png"), group.Key));
                written.Add(PredictedVsMeasured(train, Path.Combine(folder, $"{group.Key}-predicted-vs-measured.png"), group.Key));
                written.Add(Throughput(train, Path.Combine(folder, $"{group.Key}-tokens-per-second.png"), group.Key));
            }
        }
        return written;
    }

    private static string Components(IReadOnlyList<BenchResult> results, string path, string model)
    {
        var plot = new ScottPlot.Plot();
        var keys = results.SelectMany(r => r.PredictedComponents.Where(c => c.Value > 0).Select(c => c.Key)).Distinct().ToList();
        var palette = new ScottPlot.Palettes.Category10();
        for (int k = 0; k < keys.Count; k++)
        {
            var color = palette.GetColor(k);
            var bars = new List<ScottPlot.Bar>();
            for (int i = 0; i < results.Count; i++)
            {
                double below = keys.Take(k).Sum(key => (double)results[i].PredictedComponents.GetValueOrDefault(key)) / (1 << 20);
                double value = results[i].PredictedComponents.GetValueOrDefault(keys[k]) / (double)(1 << 20);
                bars.Add(new ScottPlot.Bar { Position = i, ValueBase = below, Value = below + value, FillColor = color, Size = 0.6 });
            }
            var added = plot.Add.Bars(bars);
            added.LegendText = keys[k];
        }
        var measured = plot.Add.Scatter(
            Enumerable.Range(0, results.Count).Select(i => (double)i).ToArray(),
            results.Select(r => Best(r.Ours)!.PeakAboveBaseline / (double)(1 << 20)).ToArray());
        measured.LineWidth = 0;
        measured.MarkerSize = 12;
        measured.MarkerShape = ScottPlot.MarkerShape.FilledDiamond;
        measured.Color = ScottPlot.Colors.Black;
        measured.LegendText = "measured peak";
        Finish(plot, results, $"{model}: estimated components (stacked, the sum of every component; the peak is over phases) and measured peak", "MiB above the runtime baseline");
        return Save(plot, path);
    }

    private static string PredictedVsMeasured(IReadOnlyList<BenchResult> results, string path, string model)
    {
        var plot = new ScottPlot.Plot();
        Pair(plot, results, r => r.PredictedBytes / (double)(1 << 20), "predicted peak", r => Best(r.Ours)!.PeakAboveBaseline / (double)(1 << 20), "measured peak");
        Finish(plot, results, $"{model}: predicted vs measured peak", "MiB above the runtime baseline");
        return Save(plot, path);
    }

    private static string Throughput(IReadOnlyList<BenchResult> results, string path, string model)
    {
        var plot = new ScottPlot.Plot();
        Pair(plot, results, r => Best(r.Ours)!.TokensPerSecond ?? 0, "FrugalLM", r => Best(r.Peer)?.TokensPerSecond ?? 0, "PyTorch (where it has the configuration)");
        Finish(plot, results, $"{model}: training tokens/s", "tokens/s (median step)");
        return Save(plot, path);
    }

    private static void Pair(ScottPlot.Plot plot, IReadOnlyList<BenchResult> results, Func<BenchResult, double> left, string leftLabel, Func<BenchResult, double> right, string rightLabel)
    {
        var palette = new ScottPlot.Palettes.Category10();
        foreach (var (value, label, offset, color) in new[] { (left, leftLabel, -0.2, palette.GetColor(0)), (right, rightLabel, 0.2, palette.GetColor(1)) })
        {
            var bars = results.Select((r, i) => new ScottPlot.Bar { Position = i + offset, Value = value(r), FillColor = color, Size = 0.4 }).ToList();
            plot.Add.Bars(bars).LegendText = label;
        }
    }

    private static void Finish(ScottPlot.Plot plot, IReadOnlyList<BenchResult> results, string title, string yLabel)
    {
        plot.Axes.Bottom.SetTicks(Enumerable.Range(0, results.Count).Select(i => (double)i).ToArray(), results.Select(r => r.Case.Technique).ToArray());
        plot.Axes.Bottom.TickLabelStyle.Rotation = 40;
        plot.Axes.Bottom.TickLabelStyle.Alignment = ScottPlot.Alignment.MiddleLeft;
        plot.Axes.Bottom.MinimumSize = 190;
        plot.Axes.Margins(bottom: 0);
        plot.Title(title, size: 13);
        plot.YLabel(yLabel);
        plot.ShowLegend(ScottPlot.Alignment.UpperRight);
    }

    private static string Save(ScottPlot.Plot plot, string path)
    {
        AtomicFile.Write(path, stream =>
        {
            var bytes = plot.GetImageBytes(1200, 700, ScottPlot.ImageFormat.Png);
            stream.Write(bytes);
        });
        return path;
    }

    private static string Failed(BenchResult r) => r.Error is null ? "" : "failed";

    private static string PeerCell(BenchResult r, BenchMeasurement? peer, Func<BenchMeasurement, string> cell) =>
        peer is not null ? cell(peer) : r.Case.PeerHas ? (r.PeerNote is null ? "" : "n/a") : "—";

    private static string Error(BenchResult r, BenchMeasurement? ours) =>
        ours is null ? "" : Inv($"{(ours.PeakAboveBaseline - r.PredictedBytes) * 100.0 / Math.Max(1, r.PredictedBytes):+0.0;-0.0}%");

    private static string Ratio(double? ours, double? peer) => ours is double o && peer is double p && p > 0 ? Inv($"{o / p:F2}x") : "";

    private static string Mib(long bytes) => Inv($"{bytes / (1024.0 * 1024.0):F0}");

    private static string F0(double? v) => v is double d ? Inv($"{d:F0}") : "";

    private static string F1(double? v) => v is double d ? Inv($"{d:F1}") : "";

    private static string Inv(FormattableString s) => s.ToString(CultureInfo.InvariantCulture);
}
