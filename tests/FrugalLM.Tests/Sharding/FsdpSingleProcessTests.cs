using FrugalLM.Checkpointing;
using FrugalLM.Distributed;
using FrugalLM.Lora;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Sharding;
using FrugalLM.Training;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

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
    [InlineData(ShardingStrategy.FullShard, PrecisionMode.Fp32)]
    [InlineData(ShardingStrategy.ShardGradOp, PrecisionMode.Fp32)]
    [InlineData(ShardingStrategy.FullShard, PrecisionMode.Bf16)]
    [InlineData(ShardingStrategy.ShardGradOp, PrecisionMode.Bf16)]
    [InlineData(ShardingStrategy.FullShard, PrecisionMode.Fp16)]
    public void TrainsLikeThePlainTrainer(ShardingStrategy strategy, PrecisionMode precision) => TrainsLikeThePlainTrainerWith(strategy, precision, checkpointEvery: 0);

    [Theory]
    [InlineData(ShardingStrategy.ShardGradOp, 1)]
    [InlineData(ShardingStrategy.ShardGradOp, 2)]
    [InlineData(ShardingStrategy.FullShard, 1)]
    public void ActivationCheckpointingBecomesFsdpsRecomputation(ShardingStrategy strategy, int every)
    {
        // The same numbers as without checkpointing: recomputation replays the same arithmetic.
        TrainsLikeThePlainTrainerWith(strategy, PrecisionMode.Fp32, every);
    }

    private static void TrainsLikeThePlainTrainerWith(ShardingStrategy strategy, PrecisionMode precision, int checkpointEvery)
    {
        var random = new Random(5);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 40 * 17).Select(_ => random.Next(101)).ToArray(), 16);
        var options = new TrainOptions { Steps = 4, MicroBatch = 2, LearningRate = 3e-3, GradClip = 0.5, LogEvery = 1, WeightDecay = 0.1 };

        using var plain = new LlamaForCausalLM(TestSupport.TinyConfig());
        plain.InitializeWeights(seed: 3);
        var plainLosses = new List<double>();
        using var plainPrecision = MixedPrecision.Apply(plain, precision);
        new Trainer(plain, corpus, options, plainPrecision).Run(p => plainLosses.Add(p.Loss));
        var expected = plainPrecision.Masters.Any() ? plainPrecision.Masters.ToDictionary(m => m.Name, m => m.Master)
            : plain.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);

        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 3);
        using var collectives = new SingleProcessCollectives();
        if (checkpointEvery > 0)
        {
            ActivationCheckpointing.Apply(model, checkpointEvery);
        }
        using var mixed = MixedPrecision.Apply(model, precision);
        using var sharded = Fsdp.Wrap(model, collectives, strategy, mixed);
        Assert.Empty(mixed.Masters); // handed over: FSDP keeps only its shard
        Assert.All(model.named_parameters().Where(p => p.name.Contains("layers", StringComparison.Ordinal)), p => Assert.Equal(0, p.parameter.numel()));
        var losses = new List<double>();
        new Trainer(model, corpus, options, mixed, sharded).Run(p => losses.Add(p.Loss));

        // Same arithmetic (bf16: the same 16-bit compute copies of the same fp32 masters); only the gradient norm is
        // summed in another order (in double, over flat shards rather than tensors), which can move the clipping factor in
        // its last bits (it moved it by ~1e-7 while the shards' total was all-reduced in fp32: fp16 then reached 1.02e-4).
        Assert.Equal(plainLosses.Count, losses.Count);
        for (int i = 0; i < losses.Count; i++)
        {
            Assert.Equal(plainLosses[i], losses[i], 1e-5);
        }
        var full = sharded.CollectFullState().ToDictionary(p => p.Name, p => p.Value);
        // fp32: 1e-5. 16-bit: a clipping factor off in its last bits reaches the embedding rows of tokens seen once, whose
        // 16-bit gradients AdamW normalizes to full steps: bounded at 1e-4 (measured 1.8e-5 in bf16 and 1.02e-4 in fp16
        // while the total was all-reduced in fp32; 0 in every case since it is gathered and added in double).
        double tolerance = precision == PrecisionMode.Fp32 ? 1e-5 : 1e-4;
        Assert.Equal(expected.Keys.Order(), full.Keys.Order());
        foreach (var (name, p) in expected)
        {
            double error = TensorAssert.RelativeError(full[name], p);
            Assert.True(error < tolerance, $"{name}: {error:E2}");
        }
    }

    /// <summary>
    /// Under LoRA and FULL_SHARD the decoder layers' frozen base is sharded too (its own flat vectors, no masters or
    /// gradients) and gathered with its layer; SHARD_GRAD_OP keeps it whole. Training must still match the plain LoRA
    /// trainer, also when a layer has no adapter, above an adapted one (its input's gradient is wanted: gathered again in
    /// backward) or below all of them (no graph).
    /// </summary>
    [Theory]
    [InlineData(ShardingStrategy.FullShard, -1)]
    [InlineData(ShardingStrategy.ShardGradOp, -1)]
    [InlineData(ShardingStrategy.FullShard, 0)]
    [InlineData(ShardingStrategy.FullShard, 1)]
    [InlineData(ShardingStrategy.ShardGradOp, 0)]
    [InlineData(ShardingStrategy.ShardGradOp, 1)]
    public void LoraWithTheFrozenBaseShardedTrainsLikeThePlainTrainer(ShardingStrategy strategy, int onlyLayer)
    {
        var random = new Random(9);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 40 * 17).Select(_ => random.Next(101)).ToArray(), 16);
        var options = new TrainOptions { Steps = 4, MicroBatch = 2, LearningRate = 1e-2, GradClip = 0.5, LogEvery = 1 };
        var config = new LoraConfig { Rank = 4, Alpha = 8, Targets = LoraTargets.AllLinear, LayersToTransform = onlyLayer < 0 ? null : [onlyLayer] };

        using var plain = new LlamaForCausalLM(TestSupport.TinyConfig());
        plain.InitializeWeights(seed: 3);
        LoraModel.Apply(plain, config, seed: 4);
        var plainLosses = new List<double>();
        using var plainPrecision = MixedPrecision.Apply(plain, PrecisionMode.Fp32);
        new Trainer(plain, corpus, options, plainPrecision).Run(p => plainLosses.Add(p.Loss));
        var expected = plain.named_parameters().Where(p => p.parameter.requires_grad).ToDictionary(p => p.name, p => (Tensor)p.parameter);

        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 3);
        LoraModel.Apply(model, config, seed: 4);
        bool shardsFrozen = strategy == ShardingStrategy.FullShard;
        long frozenInLayers = model.named_parameters().Where(p => p.name.Contains(".layers.", StringComparison.Ordinal) && !p.parameter.requires_grad).Sum(p => p.parameter.numel());
        // What stays whole: the root's frozen parameters, and under SHARD_GRAD_OP the layers' frozen ones too.
        var whole = model.named_parameters().Where(p => !p.parameter.requires_grad && (!shardsFrozen || !p.name.Contains(".layers.", StringComparison.Ordinal)))
            .ToDictionary(p => p.name, p => p.parameter.numel());
        using var collectives = new SingleProcessCollectives();
        using var mixed = MixedPrecision.Apply(model, PrecisionMode.Fp32);
        using var sharded = Fsdp.Wrap(model, collectives, strategy, mixed);
        Assert.Equal(shardsFrozen ? frozenInLayers : 0, sharded.FrozenCount);
        Assert.Equal(expected.Values.Sum(p => p.numel()), sharded.TrainableCount);
        // Every sharded decoder-layer parameter is released until its layer runs; the rest stays whole.
        Assert.All(model.named_parameters().Where(p => p.name.Contains(".layers.", StringComparison.Ordinal) && !whole.ContainsKey(p.name)), p => Assert.Equal(0, p.parameter.numel()));
        Assert.All(model.named_parameters().Where(p => whole.ContainsKey(p.name)), p => Assert.Equal(whole[p.name], p.parameter.numel()));
        Assert.DoesNotContain(sharded.OptimizerGroups(0.0).SelectMany(g => g.Parameters), p => p.Name.Contains("/frozen", StringComparison.Ordinal));
        var losses = new List<double>();
        new Trainer(model, corpus, options, mixed, sharded).Run(p => losses.Add(p.Loss));
        // ... and is released again after training (nothing left gathered).
        Assert.All(model.named_parameters().Where(p => p.name.Contains(".layers.", StringComparison.Ordinal) && !whole.ContainsKey(p.name)), p => Assert.Equal(0, p.parameter.numel()));

        Assert.Equal(plainLosses.Count, losses.Count);
        for (int i = 0; i < losses.Count; i++)
        {
            Assert.Equal(plainLosses[i], losses[i], 1e-5);
        }
        var full = sharded.CollectFullState().ToDictionary(p => p.Name, p => p.Value);
        Assert.Equal(expected.Keys.Order(), full.Keys.Order());
        foreach (var (name, p) in expected)
        {
            double error = TensorAssert.RelativeError(full[name], p);
            Assert.True(error < 1e-5, $"{name}: {error:E2}");
        }
    }
}
