using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Opt;

/// <summary>
/// One OPT decoder layer (HF <c>OPTDecoderLayer</c>): attention then fc1 → ReLU → fc2, each inside a residual
/// connection with LayerNorm before it (every OPT size but 350M) or after the residual sum (350M), and
/// residual dropout (<c>dropout</c>) after the attention output and after fc2 in training.
/// </summary>
public sealed class OptDecoderLayer : nn.Module<Tensor, DecoderContext, Tensor>
{
    private readonly bool normBefore;

    [ComponentName(Name = "self_attn")]
    private nn.Module<Tensor, DecoderContext, Tensor> selfAttn;

    [ComponentName(Name = "self_attn_layer_norm")]
    private nn.Module<Tensor, Tensor> selfAttnLayerNorm;

    [ComponentName(Name = "fc1")]
    private nn.Module<Tensor, Tensor> fc1;

    [ComponentName(Name = "fc2")]
    private nn.Module<Tensor, Tensor> fc2;

    [ComponentName(Name = "final_layer_norm")]
    private nn.Module<Tensor, Tensor> finalLayerNorm;

    // A child module, not a flag of this layer: checkpointing replaces this layer by a wrapper that registers
    // its children, so train()/eval() reach the dropout but not this object. It holds no parameters.
    [ComponentName(Name = "dropout")]
    private nn.Module<Tensor, Tensor> dropout;

    /// <summary>Creates layer <paramref name="index"/> (linear weights uninitialized, LayerNorms 1 and 0).</summary>
    public OptDecoderLayer(OptConfig config, int index, ScalarType dtype) : base(nameof(OptDecoderLayer))
    {
        normBefore = config.DoLayerNormBefore;
        selfAttn = new OptAttention(config, index, dtype);
        selfAttnLayerNorm = OptLayers.LayerNorm(config, dtype);
        fc1 = LinearFactory.Create(config.HiddenSize, config.FfnDim, config.EnableBias, dtype);
        fc2 = LinearFactory.Create(config.FfnDim, config.HiddenSize, config.EnableBias, dtype);
        finalLayerNorm = OptLayers.LayerNorm(config, dtype);
        dropout = nn.Dropout(config.Dropout);
        RegisterComponents();
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor x, DecoderContext context)
    {
        using var scope = NewDisposeScope();
        var attended = selfAttn.forward(normBefore ? selfAttnLayerNorm.forward(x) : x, context);
        var h = x + dropout.forward(attended);
        if (!normBefore)
        {
            h = selfAttnLayerNorm.forward(h);
        }
        var fed = fc2.forward(nn.functional.relu(fc1.forward(normBefore ? finalLayerNorm.forward(h) : h)));
        h = h + dropout.forward(fed);
        if (!normBefore)
        {
            h = finalLayerNorm.forward(h);
        }
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>Factories for OPT's LayerNorms.</summary>
internal static class OptLayers
{
    /// <summary>
    /// nn.LayerNorm(hidden) as OPT builds it: eps 1e-5 (OPTConfig has no eps field), weight 1 and bias 0, or
    /// neither when <c>layer_norm_elementwise_affine</c> is false.
    /// </summary>
    public static nn.Module<Tensor, Tensor> LayerNorm(OptConfig config, ScalarType dtype) =>
        nn.LayerNorm(config.HiddenSize, 1e-5, config.LayerNormElementwiseAffine, config.LayerNormElementwiseAffine, dtype: dtype);
}
