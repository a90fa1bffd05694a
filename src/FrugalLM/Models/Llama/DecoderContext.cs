using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>What every decoder layer of one forward pass shares: rotary tables, the cache, the mask.</summary>
public sealed class DecoderContext
{
    /// <summary>Rotary cos table [T, head_dim] in the compute dtype (null for architectures without RoPE).</summary>
    public Tensor? Cos { get; init; }

    /// <summary>Rotary sin table [T, head_dim] in the compute dtype (null for architectures without RoPE).</summary>
    public Tensor? Sin { get; init; }

    /// <summary>The KV cache, when decoding incrementally.</summary>
    public KvCache? Cache { get; init; }

    /// <summary>
    /// Boolean mask [T, past + T] (true = may attend), or null when plain causal attention over
    /// <see cref="PastLength"/> + T positions is meant.
    /// </summary>
    public Tensor? AttentionMask { get; init; }

    /// <summary>Positions before this pass's tokens (the cache's length).</summary>
    public long PastLength { get; init; }

    /// <summary>
    /// The tensors a custom autograd function passes for a training pass (no cache): absent ones as empty tensors,
    /// because a function's inputs are a fixed list.
    /// </summary>
    internal (Tensor Cos, Tensor Sin, Tensor Mask) AsInputs() => (Cos ?? empty(0), Sin ?? empty(0), AttentionMask ?? empty(0));

    /// <summary>The context of a training pass rebuilt from <see cref="AsInputs"/>.</summary>
    internal static DecoderContext FromInputs(Tensor cos, Tensor sin, Tensor mask) => new()
    {
        Cos = cos.numel() == 0 ? null : cos,
        Sin = sin.numel() == 0 ? null : sin,
        AttentionMask = mask.numel() == 0 ? null : mask,
    };
}
