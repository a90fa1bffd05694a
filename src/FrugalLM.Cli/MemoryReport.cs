using System.Globalization;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Quantization;

namespace FrugalLM.Cli;

/// <summary>
/// Predicted versus measured memory of a run: the plan the command is about to execute goes through the
/// estimator (the same <see cref="RunPlan"/> the runtime reads), and the run's measured peak (VmHWM after a
/// reset) is compared with it at the end. The runtime baseline (libtorch, .NET, tokenizer and data, no
/// model) is measured first and counted on both sides.
/// </summary>
internal sealed class MemoryReport
{
    private MemoryReport(RunPlan plan, MemoryEstimate estimate)
    {
        Plan = plan;
        Estimate = estimate;
    }

    public RunPlan Plan { get; }

    public MemoryEstimate Estimate { get; }

    /// <summary>
    /// Estimates <paramref name="plan"/> as a CPU run, with the runtime baseline measured now, after the kernels'
    /// warm-up (<see cref="TorchRuntime.WarmUpKernels"/>: their code pages and thread pools are the runtime's).
    /// </summary>
    public static MemoryReport Predict(RunPlan plan)
    {
        TorchRuntime.WarmUpKernels();
        if (plan.Quantization.Kind == QuantizationKind.Int8)
        {
            Int8Linear.WarmUp();
        }
        var measured = plan with { Device = ComputeDevice.Cpu, Overhead = new FrameworkOverhead(0, MemoryProbe.CurrentBytes) };
        return new MemoryReport(measured, MemoryEstimator.Estimate(measured));
    }

    /// <summary>
    /// The report of the placement <paramref name="offload"/> chooses (none, disk, or by <paramref name="budgetBytes"/>),
    /// with this report's measured baseline; this report when nothing is to choose.
    /// </summary>
    /// <param name="offload">--offload: null (in memory, or chosen by the budget), none or disk.</param>
    /// <param name="budgetBytes">--memory-budget above the runtime baseline, or null.</param>
    /// <param name="disk">The disk policy with the folder's stored format.</param>
    public MemoryReport Place(string? offload, long? budgetBytes, OffloadPolicy disk)
    {
        if (offload is not (null or "none" or "disk"))
        {
            throw new ArgumentException($"--offload must be none or disk (got '{offload}'); optimizer, params and all are estimated by frugal estimate but need a GPU to mean anything");
        }
        bool memory = offload is null or "none", streamed = offload is "disk" || (offload is null && budgetBytes is not null);
        if (budgetBytes is not long budget)
        {
            return streamed ? Replan(Plan with { Offload = disk }) : this;
        }
        var (plan, estimate) = OffloadPlanner.Choose(Plan, budget, OffloadPlanner.Candidates(Plan, memory, streamed, disk));
        return new MemoryReport(plan, estimate);
    }

    private static MemoryReport Replan(RunPlan plan) => new(plan, MemoryEstimator.Estimate(plan));

    /// <summary>One line: the placement and its predicted bytes per tier.</summary>
    public string PlacementLine(long? budgetBytes) => string.Create(CultureInfo.InvariantCulture,
        $"placement: {OffloadPlanner.Describe(Plan)}{(budgetBytes is long b ? $" (budget {Mib(b)} above the baseline)" : "")}; predicted peak {Mib(Estimate.DeviceBytes - Plan.Overhead.RuntimeBaselineBytes)} in memory above the baseline{(Plan.StreamsWeights ? $" ({Mib(Estimate.Bytes("weights"))} resident weights, {Mib(Estimate.Bytes("weight_stream"))} layer buffers, {Mib(Estimate.Bytes("disk_staging"))} staging)" : "")}, {Mib(Estimate.DiskBytes)} on disk streamed per pass");

    /// <summary>One line: the plan and its predicted peak.</summary>
    public string PredictionLine() => string.Create(CultureInfo.InvariantCulture,
        $"memory: predicted peak {Mib(Estimate.DeviceBytes)} for {Plan.Describe()}, micro-batch {Plan.MicroBatchSize} x {Plan.SequenceLength} (runtime baseline {Mib(Plan.Overhead.RuntimeBaselineBytes)} included)");

    /// <summary>One line: predicted against a measured peak.</summary>
    public string ComparisonLine(long measuredPeak)
    {
        long baseline = Plan.Overhead.RuntimeBaselineBytes;
        long predicted = Estimate.DeviceBytes - baseline, measured = measuredPeak - baseline;
        return string.Create(CultureInfo.InvariantCulture,
            $"memory: predicted peak {Mib(Estimate.DeviceBytes)}, measured {Mib(measuredPeak)}; above the {Mib(baseline)} baseline: predicted {Mib(predicted)}, measured {Mib(measured)} ({(measured - predicted) * 100.0 / Math.Max(1, predicted):+0.0;-0.0}%)");
    }

    private static string Mib(long bytes) => MemoryProbe.Mib(bytes);
}
