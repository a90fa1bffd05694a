using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Models;

public sealed class ModuleTreeTests
{
    public ModuleTreeTests() => TestSupport.Init();

    /// <summary>A stand-in technique: scales its inner module's output, so its effect on logits is visible.</summary>
    private sealed class Scaled : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> inner;

        public Scaled(nn.Module<Tensor, Tensor> inner) : base(nameof(Scaled))
        {
            this.inner = inner;
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => inner.forward(x) * 0.0;
    }

    [Fact]
    public void ReplacesALinearKeepingNamesAndUsingItInForward()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 3, std: 0.2);
        using var ids = randint(0, 101, [1, 6], dtype: ScalarType.Int64);
        using var before = model.forward(ids);
        var old = ModuleTree.Get(model, "model.layers.1.mlp.down_proj");
        var previous = ModuleTree.Replace(model, "model.layers.1.mlp.down_proj", new Scaled((nn.Module<Tensor, Tensor>)old));
        Assert.Same(old, previous);
        Assert.Contains(model.named_parameters(), p => p.name == "model.layers.1.mlp.down_proj.inner.weight");
        Assert.DoesNotContain(model.named_parameters(), p => p.name == "model.layers.1.mlp.down_proj.weight");
        using var after = model.forward(ids);
        Assert.True(TensorAssert.RelativeError(after, before) > 1e-3);
        Assert.IsType<Scaled>(ModuleTree.Get(model, "model.layers.1.mlp.down_proj"));
    }

    [Fact]
    public void ReplacesADecoderLayerInTheModuleList()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        var fresh = new LlamaDecoderLayer(model.Config, 0, ScalarType.Float32);
        ModuleTree.Replace(model, "model.layers.0", fresh);
        Assert.Same(fresh, model.Model.Layers[0]);
        Assert.Same(fresh, ModuleTree.Get(model, "model.layers.0"));
    }

    [Fact]
    public void RejectsAWrongKindOfModuleAndUnknownPaths()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        Assert.Throws<ArgumentException>(() => ModuleTree.Replace(model, "model.layers.0.self_attn", nn.Linear(4, 4)));
        Assert.Throws<ArgumentException>(() => ModuleTree.Replace(model, "model.layers.0.nothing", nn.Linear(4, 4)));
    }

    [Fact]
    public void ReplacesAParameterThatAModuleKeepsInItsRegistryOnly()
    {
        // Int8Linear keeps its optional bias in the registry and reads it with get_parameter (no field): mixed
        // precision converts it like any other parameter.
        using var linear = nn.Linear(24, 16, hasBias: true);
        using var layer = Int8Linear.FromLinear(linear);
        using var x = randn(3, 24);
        var bias = layer.Bias!;
        var converted = new Parameter(bias.detach().to(ScalarType.BFloat16) + 1.0f, requires_grad: false);
        ModuleTree.ReplaceParameter(layer, "bias", converted);
        Assert.Same(converted, layer.Bias);
        Assert.Same(converted, layer.named_parameters().Single(p => p.name == "bias").parameter);
        using var expected = linear.forward(x) + 1.0f;
        using var actual = layer.forward(x);
        // Int8 rounding of weights and activations (~1 %) plus the bf16 bias (≤ 2^-8 relative).
        Assert.True(TensorAssert.RelativeError(actual, expected) < 3e-2, $"{TensorAssert.RelativeError(actual, expected):E2}");
        Assert.Throws<ArgumentException>(() => { ModuleTree.ReplaceParameter(layer, "nothing", converted); });
    }
}
