using FrugalLM.Distributed;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Sharding;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Sharding;

/// <summary>
/// FSDP in one process (world size 1): the wrapping, the per-layer autograd function (recompute under FULL_SHARD, kept
/// graph under SHARD_GRAD_OP), flat shards and the optimizer over them must train exactly as the plain trainer does.
/// The multi-rank equivalence is checked through <c>frugal launch</c> in FsdpLaunchTests.
/// </summary>
public sealed class FsdpSingleProcessTests
{
    public FsdpSingleProcessTests() => TestSupport.Init();

    [Theory]
    [InlineData(ShardingStrategy.FullShard)]
    [InlineData(ShardingStrategy.ShardGradOp)]
    public void TrainsLikeThePlainTrainer(ShardingStrategy strategy)
    {
        var random = new Random(5);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 40 * 17).Select(_ => random.Next(101)).ToArray(), 16);
        var options = new TrainOptions { Steps = 4, MicroBatch = 2, LearningRate = 3e-3, GradClip = 0.5, LogEvery = 1, WeightDecay = 0.1 };

        using var plain = new LlamaForCausalLM(TestSupport.TinyConfig());
        plain.InitializeWeights(seed: 3);
        var plainLosses = new List<double>();
        new Trainer(plain, corpus, options).Run(p => plainLosses.Add(p.Loss));

        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 3);
        using var collectives = new SingleProcessCollectives();
        using var sharded = Fsdp.Wrap(model, collectives, strategy);
        Assert.All(model.named_parameters().Where(p => p.name.Contains("layers", StringComparison.Ordinal)), p => Assert.Equal(0, p.parameter.numel()));
        var losses = new List<double>();
        new Trainer(model, corpus, options, sharding: sharded).Run(p => losses.Add(p.Loss));

        // Same arithmetic; only the gradient norm is summed in another order (float64 over flat shards), which moves
        // the clipping factor by ~1e-7 relative.
        Assert.Equal(plainLosses.Count, losses.Count);
        for (int i = 0; i < losses.Count; i++)
        {
            Assert.Equal(plainLosses[i], losses[i], 1e-5);
        }
        var full = sharded.CollectFullState().ToDictionary(p => p.Name, p => p.Value);
        foreach (var (name, p) in plain.named_parameters())
        {
            Assert.True(TensorAssert.RelativeError(full[name], p) < 1e-5, name);
        }
    }
}
