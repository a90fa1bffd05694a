using FrugalLM.Planning;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>
/// Grouped-query self-attention with rotary positions, through libtorch's scaled_dot_product_attention
/// (its CPU flash kernel needs O(T) memory, not O(T²)).
/// </summary>
public sealed class LlamaAttention : nn.Module<Tensor, DecoderContext, Tensor>
{
    private readonly int layerIndex;
    private readonly int heads;
    private readonly int kvHeads;
    private readonly int headDim;

    [ComponentName(Name = "q_proj")]
    private nn.Module<Tensor, Tensor> qProj;

    [ComponentName(Name = "k_proj")]
    private nn.Module<Tensor, Tensor> kProj;

    [ComponentName(Name = "v_proj")]
    private nn.Module<Tensor, Tensor> vProj;

    [ComponentName(Name = "o_proj")]
    private nn.Module<Tensor, Tensor> oProj;

    /// <summary>Creates the layer's projections (uninitialized) in <paramref name="dtype"/>.</summary>
    public LlamaAttention(LlamaConfig config, int layerIndex, ScalarType dtype) : base(nameof(LlamaAttention))
    {
        this.layerIndex = layerIndex;
        heads = config.NumAttentionHeads;
        kvHeads = config.NumKeyValueHeads;
        headDim = config.HeadDim;
        long h = config.HiddenSize;
        qProj = LinearFactory.Create(h, heads * headDim, config.AttentionBias, dtype);
        kProj = LinearFactory.Create(h, kvHeads * headDim, config.AttentionBias, dtype);
        vProj = LinearFactory.Create(h, kvHeads * headDim, config.AttentionBias, dtype);
        oProj = LinearFactory.Create(heads * headDim, h, config.AttentionBias, dtype);
        RegisterComponents();
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor x, DecoderContext context)
    {
        using var scope = NewDisposeScope();
        long batch = x.shape[0], t = x.shape[1];
        var q = qProj.forward(x).view(batch, t, heads, headDim).transpose(1, 2);
        var k = kProj.forward(x).view(batch, t, kvHeads, headDim).transpose(1, 2);
        var v = vProj.forward(x).view(batch, t, kvHeads, headDim).transpose(1, 2);
        var cos = context.Cos ?? throw new InvalidOperationException("LLaMA attention needs the rotary tables in its context");
        var sin = context.Sin ?? throw new InvalidOperationException("LLaMA attention needs the rotary tables in its context");
        q = Rotary.Apply(q, cos, sin);
        k = Rotary.Apply(k, cos, sin);
        if (context.Cache is KvCache cache)
        {
            (k, v) = cache.Append(layerIndex, k, v);
        }
        if (heads != kvHeads)
        {
            // Query head i reads kv head i / (heads / kvHeads), as transformers' repeat_kv lays them out.
            k = k.repeat_interleave(heads / kvHeads, dim: 1);
            v = v.repeat_interleave(heads / kvHeads, dim: 1);
        }
        Tensor attended;
        if (context.AttentionMask is Tensor mask)
        {
            attended = nn.functional.scaled_dot_product_attention(q, k, v, mask);
        }
        else
        {
            // Causal over a fresh sequence, or a single new token that sees its whole past. (libtorch's
            // causal mask is top-left aligned, so T > 1 with a past needs an explicit mask instead.)
            bool causal = context.PastLength == 0 && t > 1;
            if (context.PastLength > 0 && t > 1)
            {
                throw new InvalidOperationException("multi-token steps with a past need an explicit attention mask");
            }
            attended = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: causal);
        }
        var merged = attended.transpose(1, 2).reshape(batch, t, heads * headDim);
        return oProj.forward(merged).MoveToOuterDisposeScope();
    }
}
