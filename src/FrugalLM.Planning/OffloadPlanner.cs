using System.Globalization;

namespace FrugalLM.Planning;

/// <summary>Thrown when no placement of a run fits its memory budget (the CLI exits with 3).</summary>
public sealed class BudgetException(string message) : Exception(message);

/// <summary>
/// Chooses where a run's weights live so that its estimated peak fits a memory budget: in memory if that fits, else
/// streamed from disk with as many decoder layers resident as fit (generation), or every layer streamed (LoRA training).
/// The budget is memory above the runtime baseline (<see cref="FrameworkOverhead.RuntimeBaselineBytes"/>), which the
/// run pays whatever it places where.
/// </summary>
public static class OffloadPlanner
{
    /// <summary>
    /// Share of the budget kept free for the estimator's error: a placement fits when its estimate is within
    /// (1 − headroom) x budget. The measured peaks of generation and training run within a few percent of the estimate
    /// (docs/benchmarks.md: −2.9..+10.3%); the first 512 MiB run of docs/offload.md, chosen with no headroom, measured
    /// 512.1 MiB against a 499.3 MiB estimate.
    /// </summary>
    public const double Headroom = 0.05;

    /// <summary>The placements to try, in order of preference (fastest first).</summary>
    /// <param name="plan">The run.</param>
    /// <param name="allowMemory">Whether keeping every weight in memory is a choice.</param>
    /// <param name="allowDisk">Whether disk offload is a choice.</param>
    /// <param name="disk">The disk policy with the folder's stored format (<see cref="OffloadPolicy.StoredFloatBytes"/>, <see cref="OffloadPolicy.StoredInt8"/>).</param>
    public static IEnumerable<OffloadPolicy> Candidates(RunPlan plan, bool allowMemory, bool allowDisk, OffloadPolicy disk)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(disk);
        if (allowMemory)
        {
            yield return OffloadPolicy.None;
        }
        if (!allowDisk)
        {
            yield break;
        }
        // Training streams every layer; generation keeps as many of the first layers as fit.
        int most = plan.Trains ? 0 : plan.Model.NumHiddenLayers - 1;
        for (int resident = most; resident >= 0; resident--)
        {
            yield return disk with { ResidentLayers = resident };
        }
    }

    /// <summary>The first of <paramref name="candidates"/> whose estimated peak above the baseline fits <paramref name="budgetBytes"/> less the <see cref="Headroom"/>.</summary>
    /// <exception cref="BudgetException">None fits; the message names the smallest estimate.</exception>
    public static (RunPlan Plan, MemoryEstimate Estimate) Choose(RunPlan plan, long budgetBytes, IEnumerable<OffloadPolicy> candidates)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(candidates);
        (RunPlan Plan, MemoryEstimate Estimate)? smallest = null;
        foreach (var policy in candidates)
        {
            var candidate = plan with { Offload = policy };
            var estimate = MemoryEstimator.Estimate(candidate);
            long above = estimate.DeviceBytes - plan.Overhead.RuntimeBaselineBytes;
            if (above <= (long)(budgetBytes * (1 - Headroom)))
            {
                return (candidate, estimate);
            }
            if (smallest is null || estimate.DeviceBytes < smallest.Value.Estimate.DeviceBytes)
            {
                smallest = (candidate, estimate);
            }
        }
        if (smallest is not { } best)
        {
            throw new BudgetException("no placement to choose from");
        }
        throw new BudgetException(string.Create(CultureInfo.InvariantCulture,
            $"nothing fits the memory budget of {Mib(budgetBytes)}: the smallest placement ({Describe(best.Plan)}) needs {Mib(best.Estimate.DeviceBytes - plan.Overhead.RuntimeBaselineBytes)} above the runtime baseline, {Headroom:P0} of the budget kept free for the estimate's error (reduce the batch or sequence, quantize the base, or raise the budget)"));
    }

    /// <summary>e.g. "in memory" or "disk offload, 3 of 26 decoder layers resident".</summary>
    public static string Describe(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        return plan.StreamsWeights
            ? string.Create(CultureInfo.InvariantCulture, $"disk offload, {plan.Offload.ResidentLayers} of {plan.Model.NumHiddenLayers} decoder layers resident")
            : plan.Offload == OffloadPolicy.None ? "in memory" : $"offload {plan.Offload.Name}";
    }

    private static string Mib(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1048576.0:F1} MiB");
}
