using FrugalLM.Planning;
using TorchSharp;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).</summary>
public sealed class LlamaMlp : nn.Module<Tensor, Tensor>
{
    [ComponentName(Name = "gate_proj")]
    private nn.Module<Tensor, Tensor> gateProj;

    [ComponentName(Name = "up_proj")]
    private nn.Module<Tensor, Tensor> upProj;

    [ComponentName(Name = "down_proj")]
    private nn.Module<Tensor, Tensor> downProj;

    /// <summary>Creates the block's projections (uninitialized) in <paramref name="dtype"/>.</summary>
    public LlamaMlp(LlamaConfig config, ScalarType dtype) : base(nameof(LlamaMlp))
    {
        gateProj = LinearFactory.Create(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype);
        upProj = LinearFactory.Create(config.HiddenSize, config.IntermediateSize, config.MlpBias, dtype);
        downProj = LinearFactory.Create(config.IntermediateSize, config.HiddenSize, config.MlpBias, dtype);
        RegisterComponents();
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var gated = nn.functional.silu(gateProj.forward(x)) * upProj.forward(x);
        return downProj.forward(gated).MoveToOuterDisposeScope();
    }
}
