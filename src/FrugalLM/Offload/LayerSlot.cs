using static TorchSharp.torch;

namespace FrugalLM.Offload;

/// <summary>
/// One reusable layer buffer: a tensor per streamed tensor name, allocated on first use and reused by every later layer
/// (decoder layers are alike), so streaming allocates nothing per layer. Fresh pages would fault on first touch on every
/// load; reused ones are already resident.
/// </summary>
internal sealed class LayerSlot : IDisposable
{
    private readonly Dictionary<string, Tensor> buffers = new(StringComparer.Ordinal);

    /// <summary>The streamed layer (its index among the streamed layers) the buffers hold or are being filled with; -1: none.</summary>
    public int Layer { get; set; } = -1;

    /// <summary>Whether the buffers hold <see cref="Layer"/> completely.</summary>
    public bool Ready { get; set; }

    /// <summary>Whether a running layer's tensors point at the buffers.</summary>
    public bool InUse { get; set; }

    /// <summary>Bytes of the buffers.</summary>
    public long Bytes => buffers.Values.Sum(b => b.numel() * b.element_size());

    /// <summary>The buffer for <paramref name="name"/>, (re)allocated when its shape or dtype differs.</summary>
    public Tensor Buffer(string name, long[] shape, ScalarType dtype)
    {
        if (buffers.TryGetValue(name, out var buffer) && buffer.dtype == dtype && buffer.shape.SequenceEqual(shape))
        {
            return buffer;
        }
        buffer?.Dispose();
        buffers[name] = buffer = empty(shape, dtype).DetachFromDisposeScope();
        return buffer;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var buffer in buffers.Values)
        {
            buffer.Dispose();
        }
        buffers.Clear();
    }
}
