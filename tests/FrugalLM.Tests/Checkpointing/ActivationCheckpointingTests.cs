using FrugalLM.Checkpointing;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Checkpointing;

[Collection(nameof(GlobalRandom))]
public sealed class ActivationCheckpointingTests
{
    public ActivationCheckpointingTests() => TestSupport.Init();

    /// <summary>A layer with dropout inside, to check that recomputation replays the same random mask.</summary>
    private sealed class DropoutLinear : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> inner;
        private readonly nn.Module<Tensor, Tensor> dropout = nn.Dropout(0.3);

        public DropoutLinear(nn.Module<Tensor, Tensor> inner) : base(nameof(DropoutLinear))
        {
            this.inner = inner;
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => inner.forward(dropout.forward(x));
    }

    private static Dictionary<string, Tensor> Gradients(int every, Func<LlamaForCausalLM, LlamaForCausalLM>? prepare = null)
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig() with { NumHiddenLayers = 4 });
        model.InitializeWeights(seed: 12, std: 0.2);
        prepare?.Invoke(model);
        if (every > 0)
        {
            ActivationCheckpointing.Apply(model, every);
        }
        model.train();
        manual_seed(99);
        using var ids = randint(0, 101, [2, 13], generator: new TorchSharp.torch.Generator(5), dtype: ScalarType.Int64);
        var loss = CausalLmLoss.Full(model.forward(ids[.., ..^1]), ids[.., 1..]);
        loss.backward();
        return model.named_parameters().Where(p => p.parameter.grad is not null)
            .ToDictionary(p => p.name, p => p.parameter.grad!.clone().DetachFromDisposeScope());
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void GradientsEqualThePlainRun(int every)
    {
        var plain = Gradients(0);
        var checkpointed = Gradients(every);
        Assert.Equal(plain.Keys.Order(), checkpointed.Keys.Order());
        foreach (var (name, g) in plain)
        {
            // Recomputation repeats the same fp32 operations: equal to rounding (the bound 1e-6).
            Assert.True(TensorAssert.RelativeError(checkpointed[name], g) <= 1e-6, $"{name}: {TensorAssert.RelativeError(checkpointed[name], g):E2}");
        }
    }

    [Fact]
    public void FrozenInputsWithTrainableParametersInsideStillGetGradients()
    {
        // Only two projections train (as LoRA adapters would): the embedding output does not require grad.
        static LlamaForCausalLM Freeze(LlamaForCausalLM model)
        {
            foreach (var (name, p) in model.named_parameters())
            {
                p.requires_grad_(name is "model.layers.1.self_attn.q_proj.weight" or "model.layers.2.mlp.up_proj.weight");
            }
            return model;
        }
        var plain = Gradients(0, Freeze);
        var checkpointed = Gradients(1, Freeze);
        Assert.Equal(2, plain.Count);
        Assert.Equal(plain.Keys.Order(), checkpointed.Keys.Order());
        foreach (var (name, g) in plain)
        {
            Assert.True(TensorAssert.RelativeError(checkpointed[name], g) <= 1e-6, name);
        }
    }

    [Fact]
    public void RecomputationReplaysTheDropoutMask()
    {
        static LlamaForCausalLM WithDropout(LlamaForCausalLM model)
        {
            foreach (int layer in new[] { 0, 3 })
            {
                var path = $"model.layers.{layer}.mlp.down_proj";
                ModuleTree.Replace(model, path, new DropoutLinear((nn.Module<Tensor, Tensor>)ModuleTree.Get(model, path)));
            }
            return model;
        }
        var plain = Gradients(0, WithDropout);
        var checkpointed = Gradients(2, WithDropout);
        foreach (var (name, g) in plain)
        {
            Assert.True(TensorAssert.RelativeError(checkpointed[name], g) <= 1e-6, name);
        }
    }

    [Fact]
    public void NamesAndOutputsAreUnchanged()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 3);
        var names = model.named_parameters().Select(p => p.name).ToList();
        using var ids = randint(0, 101, [1, 9], dtype: ScalarType.Int64);
        using var before = model.forward(ids);
        Assert.Equal(2, ActivationCheckpointing.Apply(model, 1));
        Assert.Equal(names, model.named_parameters().Select(p => p.name));
        using var after = model.forward(ids);
        Assert.True(after.Same(before));
        Assert.Throws<InvalidOperationException>(() => ActivationCheckpointing.Apply(model, 1));
    }
}
