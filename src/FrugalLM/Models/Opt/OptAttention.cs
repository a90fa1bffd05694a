using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Opt;

/// <summary>
/// OPT's multi-head self-attention (HF <c>OPTAttention</c>): biased q/k/v/out projections, no rotary
/// positions, causal, through libtorch's scaled_dot_product_attention. transformers multiplies the queries by
/// head_dim^-0.5 before the product; the kernel applies the same factor to the product, which is the same
/// up to rounding. Dropout on the attention probabilities (<c>attention_dropout</c>) acts in training only.
/// </summary>
public sealed class OptAttention : nn.Module<Tensor, DecoderContext, Tensor>
{
    private readonly int layerIndex;
    private readonly int heads;
    private readonly int headDim;
    private readonly double attentionDropout;

    // Declared in transformers' order (k, v, q, out) so that parameters are listed as HF lists them.
    [ComponentName(Name = "k_proj")]
    private nn.Module<Tensor, Tensor> kProj;

    [ComponentName(Name = "v_proj")]
    private nn.Module<Tensor, Tensor> vProj;

    [ComponentName(Name = "q_proj")]
    private nn.Module<Tensor, Tensor> qProj;

    [ComponentName(Name = "out_proj")]
    private nn.Module<Tensor, Tensor> outProj;

    /// <summary>Creates the layer's projections (uninitialized) in <paramref name="dtype"/>.</summary>
    public OptAttention(OptConfig config, int layerIndex, ScalarType dtype) : base(nameof(OptAttention))
    {
        this.layerIndex = layerIndex;
        heads = config.NumAttentionHeads;
        headDim = config.HiddenSize / config.NumAttentionHeads;
        attentionDropout = config.AttentionDropout;
        long h = config.HiddenSize;
        kProj = LinearFactory.Create(h, h, config.EnableBias, dtype);
        vProj = LinearFactory.Create(h, h, config.EnableBias, dtype);
        qProj = LinearFactory.Create(h, h, config.EnableBias, dtype);
        outProj = LinearFactory.Create(h, h, config.EnableBias, dtype);
        RegisterComponents();
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor x, DecoderContext context)
    {
        using var scope = NewDisposeScope();
        long batch = x.shape[0], t = x.shape[1];
        var q = qProj.forward(x).view(batch, t, heads, headDim).transpose(1, 2);
        var k = kProj.forward(x).view(batch, t, heads, headDim).transpose(1, 2);
        var v = vProj.forward(x).view(batch, t, heads, headDim).transpose(1, 2);
        if (context.Cache is KvCache cache)
        {
            (k, v) = cache.Append(layerIndex, k, v);
        }
        double p = training ? attentionDropout : 0.0;
        Tensor attended;
        if (context.AttentionMask is Tensor mask)
        {
            attended = nn.functional.scaled_dot_product_attention(q, k, v, mask, p);
        }
        else
        {
            // Causal over a fresh sequence, or one new token that sees its whole past (libtorch's causal mask
            // is top-left aligned, so T > 1 with a past needs the explicit mask the decoder builds).
            if (context.PastLength > 0 && t > 1)
            {
                throw new InvalidOperationException("multi-token steps with a past need an explicit attention mask");
            }
            attended = nn.functional.scaled_dot_product_attention(q, k, v, p: p, is_casual: context.PastLength == 0 && t > 1);
        }
        var merged = attended.transpose(1, 2).reshape(batch, t, heads * headDim);
        return outProj.forward(merged).MoveToOuterDisposeScope();
    }
}
