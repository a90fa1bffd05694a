using FrugalLM.Planning;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>One pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h)).</summary>
public sealed class LlamaDecoderLayer : nn.Module<Tensor, DecoderContext, Tensor>
{
    [ComponentName(Name = "self_attn")]
    private nn.Module<Tensor, DecoderContext, Tensor> selfAttn;

    [ComponentName(Name = "mlp")]
    private nn.Module<Tensor, Tensor> mlp;

    [ComponentName(Name = "input_layernorm")]
    private nn.Module<Tensor, Tensor> inputLayernorm;

    [ComponentName(Name = "post_attention_layernorm")]
    private nn.Module<Tensor, Tensor> postAttentionLayernorm;

    /// <summary>Creates layer <paramref name="index"/> (weights uninitialized, norms ones).</summary>
    public LlamaDecoderLayer(LlamaConfig config, int index, ScalarType dtype) : base(nameof(LlamaDecoderLayer))
    {
        selfAttn = new LlamaAttention(config, index, dtype);
        mlp = new LlamaMlp(config, dtype);
        inputLayernorm = new RmsNorm(config.HiddenSize, config.RmsNormEps, dtype);
        postAttentionLayernorm = new RmsNorm(config.HiddenSize, config.RmsNormEps, dtype);
        RegisterComponents();
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor x, DecoderContext context)
    {
        using var scope = NewDisposeScope();
        var h = x + selfAttn.forward(inputLayernorm.forward(x), context);
        return (h + mlp.forward(postAttentionLayernorm.forward(h))).MoveToOuterDisposeScope();
    }
}
