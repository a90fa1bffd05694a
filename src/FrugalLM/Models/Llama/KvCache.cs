using FrugalLM.Planning;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>
/// Keys and values of past positions, one pre-allocated buffer per layer ([batch, kv heads, capacity,
/// head dim]) so decoding appends in place instead of re-concatenating the whole history every step.
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly Tensor[] keys;
    private readonly Tensor[] values;

    /// <summary>Allocates a cache for <paramref name="capacity"/> positions of <paramref name="batch"/> sequences.</summary>
    public KvCache(LlamaConfig config, int batch, int capacity, ScalarType dtype)
        : this(config.NumHiddenLayers, batch, config.NumKeyValueHeads, capacity, config.HeadDim, dtype)
    {
    }

    /// <summary>Allocates a cache of <paramref name="layers"/> layers of [batch, kvHeads, capacity, headDim].</summary>
    public KvCache(int layers, int batch, int kvHeads, int capacity, int headDim, ScalarType dtype)
    {
        Capacity = capacity;
        keys = new Tensor[layers];
        values = new Tensor[layers];
        for (int i = 0; i < keys.Length; i++)
        {
            keys[i] = zeros(batch, kvHeads, capacity, headDim, dtype);
            values[i] = zeros(batch, kvHeads, capacity, headDim, dtype);
        }
    }

    /// <summary>Positions the cache can hold.</summary>
    public int Capacity { get; }

    /// <summary>Positions already stored (the next token's position).</summary>
    public int Length { get; private set; }

    /// <summary>Bytes held by the cache.</summary>
    public long Bytes => keys.Sum(k => k.numel() * k.element_size()) * 2;

    /// <summary>
    /// Stores <paramref name="key"/>/<paramref name="value"/> ([batch, kv heads, T, head dim]) of
    /// <paramref name="layer"/> after the stored positions and returns views of everything up to them.
    /// </summary>
    public (Tensor Keys, Tensor Values) Append(int layer, Tensor key, Tensor value)
    {
        long t = key.shape[2];
        if (Length + t > Capacity)
        {
            throw new InvalidOperationException($"KV cache full: {Length} + {t} positions exceed its capacity of {Capacity}");
        }
        using (no_grad())
        {
            keys[layer].narrow(2, Length, t).copy_(key);
            values[layer].narrow(2, Length, t).copy_(value);
        }
        return (keys[layer].narrow(2, 0, Length + t), values[layer].narrow(2, 0, Length + t));
    }

    /// <summary>Marks <paramref name="tokens"/> more positions as stored; the model calls it after its last layer.</summary>
    public void Advance(int tokens) => Length += tokens;

    /// <summary>Forgets every stored position (buffers are kept for reuse).</summary>
    public void Reset() => Length = 0;

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var t in keys.Concat(values))
        {
            t.Dispose();
        }
    }
}
