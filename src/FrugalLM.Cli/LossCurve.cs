using System.Text.Json;
using FrugalLM.Training;

namespace FrugalLM.Cli;

/// <summary>Draws a run's training and held-out loss from its <c>train_log.jsonl</c> as a PNG (ScottPlot).</summary>
internal static class LossCurve
{
    public static void Write(string log, string png)
    {
        var reports = File.ReadLines(log)
            .Where(l => l.Length > 0)
            .Select(l => JsonSerializer.Deserialize<TrainProgress>(l)!)
            .ToList();
        if (reports.Count == 0)
        {
            return;
        }
        var plot = new ScottPlot.Plot();
        var train = plot.Add.Scatter(reports.Select(r => (double)r.Step).ToArray(), reports.Select(r => r.Loss).ToArray());
        train.LegendText = "training loss";
        var evals = reports.Where(r => r.EvalLoss is not null).ToList();
        if (evals.Count > 0)
        {
            var held = plot.Add.Scatter(evals.Select(r => (double)r.Step).ToArray(), evals.Select(r => r.EvalLoss!.Value).ToArray());
            held.LegendText = "held-out loss";
        }
        plot.XLabel("step");
        plot.YLabel("loss (nats per token)");
        plot.ShowLegend(ScottPlot.Alignment.UpperRight);
        var temp = png + ".tmp.png";
        plot.SavePng(temp, 800, 500);
        File.Move(temp, png, overwrite: true);
    }
}
