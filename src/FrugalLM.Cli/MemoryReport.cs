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
        MemoryTrace.Mark("baseline");
        var measured = plan with { Device = ComputeDevice.Cpu, Overhead = new FrameworkOverhead(0, MemoryProbe.CurrentBytes) };
        return new MemoryReport(measured, MemoryEstimator.Estimate(measured));
    }

    /// <summary>
    /// The report of the placement <paramref name="offload"/> chooses (none, disk, or by <paramref name="budgetBytes"/>),
    /// with this report's measured baseline; this report when nothing is to choose.
    /// </summary>
    /// <param name="offload">--offload: null (in memory, or chosen by the budget), none, disk, or (training) optimizer.</param>
    /// <param name="budgetBytes">--memory-budget above the runtime baseline, or null.</param>
    /// <param name="disk">The disk policy with the folder's stored format.</param>
    /// <param name="training">Whether the run trains (only training has an optimizer to offload).</param>
    public MemoryReport Place(string? offload, long? budgetBytes, OffloadPolicy disk, bool training = false)
    {
        if (offload == "optimizer" && training)
        {
            if (budgetBytes is not null)
            {
                throw new ArgumentException("--memory-budget chooses between in-memory and disk placements; with --offload optimizer leave it out (the host tier is this machine's memory on a CPU run)");
            }
            return Replan(Plan with { Offload = OffloadPolicy.Optimizer });
        }
        if (offload is "params" or "all")
        {
            if (budgetBytes is not null)
            {
                throw new ArgumentException($"--memory-budget chooses between in-memory and disk placements; with --offload {offload} leave it out");
            }
            // Generating, nothing steps: all is params.
            return Replan(Plan with { Offload = training && offload == "all" ? OffloadPolicy.All : OffloadPolicy.Params });
        }
        if (offload is not (null or "none" or "disk"))
        {
            throw new ArgumentException(training
                ? $"--offload must be none, optimizer, params, all or disk (got '{offload}')"
                : $"--offload must be none, params or disk (got '{offload}'); optimizer offload applies to training only");
        }
        bool memory = offload is null or "none", streamed = offload is "disk" || (offload is null && budgetBytes is not null);
        if (budgetBytes is not long budget)
        {
            return streamed ? Replan(Plan with { Offload = disk }) : this;
        }
        var (plan, estimate) = OffloadPlanner.Choose(Plan, budget, OffloadPlanner.Candidates(Plan, memory, streamed, disk));
        return new MemoryReport(plan, estimate);
    }

    // Optimizer offload: what the policy puts on the host tier, which on this CPU run is the same memory as the device's.
    private string HostPlacementLine() => string.Create(CultureInfo.InvariantCulture,
        $"placement: offload {Plan.Offload.Name} (ZeRO-Offload: the step runs on the host in vectorized C#{(Plan.StreamsFromHost ? "; decoder layers' frozen weights streamed from the host tier through two layer buffers" : "")}); host tier {Mib(Estimate.PlacedBytes(MemoryTier.Host))} predicted: {(Plan.StreamsFromHost ? $"weights {Mib(Estimate.Bytes("weights"))}, " : "")}fp32 masters {Mib(Estimate.Bytes("master_weights"))}, optimizer states {Mib(Estimate.Bytes("optimizer_states"))}, gradients {Mib(Estimate.Bytes("gradients") + Estimate.Bytes("gradients_head"))}; device tier peak {Mib(Estimate.DeviceBytes - Plan.Overhead.RuntimeBaselineBytes - (Plan.Device == ComputeDevice.Cpu ? Estimate.PlacedBytes(MemoryTier.Host) : 0))} above the baseline without them (on a CPU run host and device are one memory: the peak below counts both)");

    /// <summary>The host tier's predicted bytes for the host optimizer's own tensors: fp32 masters and optimizer states.</summary>
    public long PredictedHostOptimizerBytes => Estimate.Bytes("master_weights") + Estimate.Bytes("optimizer_states");

    private static MemoryReport Replan(RunPlan plan) => new(plan, MemoryEstimator.Estimate(plan));

    /// <summary>One line: the placement and its predicted bytes per tier.</summary>
    public string PlacementLine(long? budgetBytes) => Plan.Offload.StepsOnHost ? HostPlacementLine() : string.Create(CultureInfo.InvariantCulture,
        $"placement: {OffloadPlanner.Describe(Plan)}{(budgetBytes is long b ? $" (budget {Mib(b)} above the baseline)" : "")}; predicted peak {Mib(Estimate.DeviceBytes - Plan.Overhead.RuntimeBaselineBytes)} in memory above the baseline{(Plan.StreamsWeights ? $" ({Mib(Estimate.Bytes("weights"))} resident weights, {Mib(Estimate.Bytes("weight_stream"))} layer buffers, {Mib(Estimate.Bytes("disk_staging"))} staging)" : "")}{(Plan.StreamsFromHost ? $" ({Mib(Estimate.PlacedBytes(MemoryTier.Host))} on the host tier, {Mib(Estimate.Bytes("weight_stream"))} device layer buffers: on a CPU run one memory)" : "")}, {Mib(Estimate.DiskBytes)} on disk streamed per pass");

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
