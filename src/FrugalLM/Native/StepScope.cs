using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// The memory boundary of one training or decoding step: disposes every tensor the step created, then runs
/// a gen-0 garbage collection. The collection matters because TorchSharp turns each numeric operand
/// (<c>x * 2</c>, <c>add_(eps)</c>, ...) into a native Scalar that only its finalizer frees; interleaved with
/// tensor buffers they fragment glibc's heap, which then grows without bound (measured: +600 MiB over
/// 400 steps of a loop that keeps only one tensor, flat with this collection). A gen-0 collection of a
/// step's garbage costs well under a millisecond.
/// </summary>
public readonly struct StepScope : IDisposable
{
    private readonly DisposeScope scope;

    private StepScope(DisposeScope scope) => this.scope = scope;

    /// <summary>The dispose scope of this step, for tensors that must outlive it (MoveToOuter, Detach).</summary>
    public DisposeScope Scope => scope;

    /// <summary>Starts a step.</summary>
    public static StepScope Begin() => new(torch.NewDisposeScope());

    /// <inheritdoc />
    public void Dispose()
    {
        scope?.Dispose();
        GC.Collect(0, GCCollectionMode.Forced, blocking: true, compacting: false);
    }
}
