using System.Runtime.InteropServices;
using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// The memory boundary of one training or decoding step: disposes every tensor the step created, then runs
/// a gen-0 garbage collection. The collection matters because TorchSharp turns each numeric operand
/// (<c>x * 2</c>, <c>add_(eps)</c>, ...) into a native Scalar that only its finalizer frees; interleaved with
/// tensor buffers they fragment glibc's heap, which then grows without bound (measured: +600 MiB over
/// 400 steps of a loop that keeps only one tensor, flat with this collection). A gen-0 collection of a
/// step's garbage costs well under a millisecond.
/// A training step can also return the heap's free pages to the OS (<c>malloc_trim</c>): the many
/// sub-MiB tensors of a step (below the mmap threshold <see cref="TorchRuntime"/> sets) leave holes in
/// glibc's heap that stay resident after they are freed (measured: 106 MiB of a bf16 step of the bundled
/// model, 40% of its model states), and would count in the next step's peak.
/// </summary>
public readonly struct StepScope : IDisposable
{
    private readonly DisposeScope scope;
    private readonly bool trimHeap;

    private StepScope(DisposeScope scope, bool trimHeap)
    {
        this.scope = scope;
        this.trimHeap = trimHeap;
    }

    /// <summary>The dispose scope of this step, for tensors that must outlive it (MoveToOuter, Detach).</summary>
    public DisposeScope Scope => scope;

    /// <summary>Starts a step.</summary>
    /// <param name="trimHeap">Return free heap pages to the OS at the end (a few milliseconds: for training
    /// steps, not for decoding steps).</param>
    public static StepScope Begin(bool trimHeap = false) => new(torch.NewDisposeScope(), trimHeap);

    /// <inheritdoc />
    public void Dispose()
    {
        scope?.Dispose();
        GC.Collect(0, GCCollectionMode.Forced, blocking: true, compacting: false);
        if (trimHeap)
        {
            TrimHeap();
        }
    }

    /// <summary>Returns the C heap's free pages to the OS (after a step, or after loading a model).</summary>
    public static void TrimHeap()
    {
        if (OperatingSystem.IsLinux())
        {
            _ = malloc_trim(0);
        }
    }

    [DllImport("libc", EntryPoint = "malloc_trim")]
    private static extern int malloc_trim(nuint pad);
}
