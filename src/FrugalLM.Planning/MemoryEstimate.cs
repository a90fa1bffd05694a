namespace FrugalLM.Planning;

/// <summary>
/// Moments of a training step at which device memory can peak. Gradients are born in backward while
/// activations die, so they are not all alive at once; each component says when it is.
/// </summary>
[Flags]
public enum Phases
{
    /// <summary>Never.</summary>
    None = 0,

    /// <summary>End of the forward pass / start of backward: every stored activation, the loss, the first gradients.</summary>
    ForwardEnd = 1,

    /// <summary>End of backward: every gradient, the activations of the last layer being differentiated.</summary>
    BackwardEnd = 2,

    /// <summary>The optimizer step: gradients, states and the step's temporaries.</summary>
    OptimizerStep = 4,

    /// <summary>Throughout the step (weights, optimizer states, context).</summary>
    All = ForwardEnd | BackwardEnd | OptimizerStep,

    /// <summary>
    /// Loading the weights, before the first step: the weights and the loader's temporaries. Only generation
    /// counts it (its steps can need less than loading; a training step always needs more).
    /// </summary>
    Loading = 8,
}

/// <summary>One part of a run's memory.</summary>
/// <param name="Key">Stable identifier used in JSON (e.g. <c>optimizer_states</c>).</param>
/// <param name="Label">Human description.</param>
/// <param name="Bytes">Size in bytes.</param>
/// <param name="Tier">Where it lives.</param>
/// <param name="LiveIn">When it is alive (device peaks are per phase).</param>
/// <param name="Formula">How the bytes were computed, for tables and documentation.</param>
public sealed record MemoryComponent(string Key, string Label, long Bytes, MemoryTier Tier, Phases LiveIn, string Formula)
{
    /// <summary>
    /// The tier the offload policy names for it, before a CPU run lifts host into device memory (<see cref="OffloadPolicy.For"/>):
    /// how a CPU run still reports what it placed on the host. Null means <see cref="Tier"/>.
    /// </summary>
    public MemoryTier? Placed { get; init; }
}

/// <summary>The estimator's answer for one plan.</summary>
/// <param name="Plan">The plan estimated.</param>
/// <param name="Components">Every non-empty component.</param>
/// <param name="Warnings">Choices that run but deserve a look.</param>
/// <param name="TrainableParameterCount">Parameters that get gradients (0 when generating).</param>
public sealed record MemoryEstimate(
    RunPlan Plan,
    IReadOnlyList<MemoryComponent> Components,
    IReadOnlyList<string> Warnings,
    long TrainableParameterCount)
{
    private static readonly Phases[] Moments = [Phases.ForwardEnd, Phases.BackwardEnd, Phases.OptimizerStep, Phases.Loading];

    /// <summary>Device bytes alive at one phase.</summary>
    public long DeviceBytesAt(Phases phase) =>
        Components.Where(c => c.Tier == MemoryTier.Device && (c.LiveIn & phase) != 0).Sum(c => c.Bytes);

    /// <summary>The phase with the most device memory (the first one on ties).</summary>
    public Phases PeakPhase => Moments.MaxBy(DeviceBytesAt);

    /// <summary>Peak device memory: the largest of the phase totals.</summary>
    public long DeviceBytes => DeviceBytesAt(PeakPhase);

    /// <summary>Host memory: everything placed on the host (host components live for the whole step).</summary>
    public long HostBytes => TierBytes(MemoryTier.Host);

    /// <summary>Disk space used by offloaded tensors.</summary>
    public long DiskBytes => TierBytes(MemoryTier.Disk);

    /// <summary>Device peak plus host plus disk.</summary>
    public long TotalBytes => DeviceBytes + HostBytes + DiskBytes;

    /// <summary>Bytes the offload policy places on <paramref name="tier"/> (<see cref="MemoryComponent.Placed"/>), whether or not a CPU run lifted them into device memory.</summary>
    public long PlacedBytes(MemoryTier tier) => Components.Where(c => (c.Placed ?? c.Tier) == tier).Sum(c => c.Bytes);

    /// <summary>The bytes of the component with this key (0 when absent).</summary>
    public long Bytes(string key) => Components.Where(c => c.Key == key).Sum(c => c.Bytes);

    private long TierBytes(MemoryTier tier) => Components.Where(c => c.Tier == tier).Sum(c => c.Bytes);
}
