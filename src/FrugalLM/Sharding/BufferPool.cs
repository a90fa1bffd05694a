using static TorchSharp.torch;

namespace FrugalLM.Sharding;

/// <summary>
/// Keeps one freed buffer per size and dtype for the next layer to reuse. Decoder layers are alike, so FULL_SHARD's
/// gather of layer i + 1 reuses layer i's buffer instead of allocating fresh pages: a fresh allocation of this size is
/// mmap'ed (the runtime lowers glibc's mmap threshold so freed memory goes back to the system) and every page then
/// faults on first touch, measured here at ~600 ms per 64 MiB on a loaded VM, far more than moving the data. At most
/// one buffer per key is held, so the pool adds at most one layer's gathered parameters and one layer's unsharded
/// gradients to the peak.
/// </summary>
internal sealed class BufferPool : IDisposable
{
    private readonly Dictionary<(long Count, ScalarType Dtype), Tensor> free = [];

    /// <summary>A buffer of <paramref name="count"/> elements (contents undefined), outside any dispose scope.</summary>
    public Tensor Rent(long count, ScalarType dtype) =>
        free.Remove((count, dtype), out var buffer) ? buffer : empty(count, dtype).DetachFromDisposeScope();

    /// <summary>Takes <paramref name="buffer"/> back (disposing it when one of its kind is already kept).</summary>
    public void Return(Tensor buffer)
    {
        if (!free.TryAdd((buffer.numel(), buffer.dtype), buffer))
        {
            buffer.Dispose();
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var buffer in free.Values)
        {
            buffer.Dispose();
        }
        free.Clear();
    }
}
