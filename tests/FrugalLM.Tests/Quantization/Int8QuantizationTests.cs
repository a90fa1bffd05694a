using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Quantization;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Quantization;

public sealed class Int8QuantizationTests
{
    public Int8QuantizationTests() => TestSupport.Init();

    [Fact]
    public void QuantizesEveryProjectionButTheOutputLayer()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: Random.Shared.Next(), std: 0.1);
        using var ids = randint(0, 101, [2, 9], dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        using var before = model.forward(ids);
        var replaced = Int8Quantization.Apply(model);
        Assert.Equal(2 * 7, replaced.Count);
        Assert.Contains("model.layers.1.mlp.down_proj", replaced);
        Assert.IsType<Linear>(ModuleTree.Get(model, "lm_head"));
        Assert.IsType<Int8Linear>(ModuleTree.Get(model, "model.layers.0.self_attn.q_proj"));
        var state = model.state_dict();
        Assert.Equal(ScalarType.Int8, state["model.layers.0.self_attn.q_proj.weight"].dtype);
        Assert.Equal([(long)TestSupport.TinyConfig().HiddenSize], state["model.layers.0.self_attn.q_proj.SCB"].shape);
        using var after = model.forward(ids);
        // 14 layers of ~1 % int8 noise each, partly averaging out through two residual blocks.
        double error = TensorAssert.RelativeError(after, before);
        Assert.InRange(error, 1e-4, 5e-2);
    }

    [Fact]
    public void SkipsTheNamedLayersAndTrainsThroughTheRest()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: Random.Shared.Next(), std: 0.1);
        var replaced = Int8Quantization.Apply(model, new Int8Options { Skip = ["lm_head", "down_proj"], Threshold = 3.0 });
        Assert.Equal(2 * 6, replaced.Count);
        Assert.IsType<Linear>(ModuleTree.Get(model, "model.layers.0.mlp.down_proj"));
        Assert.Equal(3.0, ((Int8Linear)ModuleTree.Get(model, "model.layers.1.mlp.up_proj")).Threshold);
        using var ids = randint(0, 101, [2, 7], dtype: ScalarType.Int64);
        using var logits = model.forward(ids);
        using var loss = logits.logsumexp(-1).mean();
        loss.backward();
        // The embedding sits below every int8 layer: its gradient exists only if they pass one down.
        var grad = model.Model.EmbedTokens.Weight.grad;
        Assert.NotNull(grad);
        Assert.True(grad.abs().sum().item<float>() > 0 && grad.isfinite().all().item<bool>());
    }
}
