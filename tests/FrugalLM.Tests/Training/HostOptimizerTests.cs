using FrugalLM.Checkpointing;
using FrugalLM.Lora;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Training;
using TorchSharp;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Tests.Training;

/// <summary>
/// The host kernel (--offload optimizer, and AdamW's fused CPU step) against AdamW's libtorch ops. The kernel performs the
/// ops' fp32 operations in the same order (lerp fused, addcmul and addcdiv not, scalars rounded to fp32, libtorch's own
/// square root), and forward and backward are the same libtorch calls, so the tolerance is zero: every weight, master
/// and moment must be bit-identical. Every reference below runs the libtorch ops (<see cref="AdamW.FusedCpuStep"/> off).
/// </summary>
public sealed class HostOptimizerTests
{
    public HostOptimizerTests() => TestSupport.Init();

    // Odd sizes: a vector tail in every piece, a partial last 8-bit block; the matrix is above the 8-bit minimum.
    private sealed class Weights : nn.Module
    {
        public Weights(long seed) : base(nameof(Weights))
        {
            using var generator = new Generator((ulong)seed);
            matrix = nn.Parameter(randn(301, 157, generator: generator) * 0.1);
            vector = nn.Parameter(randn(1003, generator: generator));
            RegisterComponents();
        }

#pragma warning disable IDE0052 // registered by reflection
        private readonly TorchSharp.Modules.Parameter matrix;
        private readonly TorchSharp.Modules.Parameter vector;
#pragma warning restore IDE0052
    }

    [Theory]
    [InlineData(MomentFormat.Float32, PrecisionMode.Fp32, 1.0)]
    [InlineData(MomentFormat.Float32, PrecisionMode.Fp32, 0.37)]
    [InlineData(MomentFormat.Blockwise8Bit, PrecisionMode.Fp32, 0.37)]
    [InlineData(MomentFormat.Float32, PrecisionMode.Bf16, 1.0)]
    [InlineData(MomentFormat.Blockwise8Bit, PrecisionMode.Bf16, 1.0)]
    [InlineData(MomentFormat.Float32, PrecisionMode.Fp16, 0.5)]
    public void StepsAreBitIdenticalToLibtorchAdamW(MomentFormat format, PrecisionMode mode, double multiplier)
    {
        var (reference, referencePrecision, referenceModel) = Make(format, mode);
        reference.FusedCpuStep = false;
        var (offloaded, offloadedPrecision, offloadedModel) = Make(format, mode);
        var host = new HostOptimizer(offloaded, offloadedPrecision);
        for (int step = 0; step < 5; step++)
        {
            using var scope = NewDisposeScope();
            foreach (var model in new[] { referenceModel, offloadedModel })
            {
                using var again = new Generator((ulong)(100 + step));
                foreach (var p in model.parameters())
                {
                    p.grad = (randn(p.shape, generator: again) * 0.01).to(p.dtype);
                }
            }
            reference.LearningRate = offloaded.LearningRate = 3e-3 * (step + 1) / 5;
            reference.Step(multiplier);
            referencePrecision.SyncWeights();
            host.Step(multiplier);
        }
        AssertSame(Named(referenceModel), Named(offloadedModel));
        if (mode != PrecisionMode.Fp32)
        {
            AssertSame(referencePrecision.Masters, offloadedPrecision.Masters);
        }
        AssertSame(reference.StateTensors(), offloaded.StateTensors());
        Assert.Equal(reference.StepCount, offloaded.StepCount);
        Assert.Equal(5, host.Stats.Steps);
    }

    [Theory]
    [InlineData(MomentFormat.Float32, PrecisionMode.Fp32, 1.0, false)]
    [InlineData(MomentFormat.Float32, PrecisionMode.Fp32, 0.37, true)]
    [InlineData(MomentFormat.Blockwise8Bit, PrecisionMode.Fp32, 0.37, false)]
    [InlineData(MomentFormat.Float32, PrecisionMode.Bf16, 0.8, false)]
    [InlineData(MomentFormat.Blockwise8Bit, PrecisionMode.Bf16, 1.0, true)]
    [InlineData(MomentFormat.Float32, PrecisionMode.Fp16, 0.5, false)]
    [InlineData(MomentFormat.BFloat16, PrecisionMode.Bf16Pure, 1.0, false)]
    [InlineData(MomentFormat.BFloat16, PrecisionMode.Bf16Pure, 0.37, true)]
    public void FusedCpuStepIsBitIdenticalToTheLibtorchOps(MomentFormat format, PrecisionMode mode, double multiplier, bool transposedGradient)
    {
        // transposedGradient: the vector keeps a contiguous gradient, the matrix gets a non-contiguous one, which the
        // fused step hands to the libtorch ops; both kinds then live in one step.
        var (reference, referencePrecision, referenceModel) = Make(format, mode);
        reference.FusedCpuStep = false;
        var (fused, fusedPrecision, fusedModel) = Make(format, mode);
        Assert.True(fused.FusedCpuStep);
        for (int step = 0; step < 5; step++)
        {
            using var scope = NewDisposeScope();
            foreach (var model in new[] { referenceModel, fusedModel })
            {
                using var again = new Generator((ulong)(200 + step));
                foreach (var p in model.parameters())
                {
                    var g = (randn(p.shape, generator: again) * 0.01).to(p.dtype);
                    p.grad = transposedGradient && p.dim() == 2 ? g.t().contiguous().t() : g;
                }
            }
            reference.LearningRate = fused.LearningRate = 3e-3 * (step + 1) / 5;
            reference.Step(multiplier);
            referencePrecision.SyncWeights();
            fused.Step(multiplier);
            fusedPrecision.SyncWeights();
            const long matrix = 301 * 157, vector = 1003;
            Assert.Equal((0L, matrix + vector), reference.LastStepValues);
            Assert.Equal(transposedGradient ? (vector, matrix) : (matrix + vector, 0L), fused.LastStepValues);
        }
        AssertSame(Named(referenceModel), Named(fusedModel));
        if (mode is PrecisionMode.Bf16 or PrecisionMode.Fp16)
        {
            AssertSame(referencePrecision.Masters, fusedPrecision.Masters);
        }
        AssertSame(reference.StateTensors(), fused.StateTensors());
        var before = Named(new Weights(5)).First().Item2;
        var after = Named(fusedModel).First().Item2;
        Assert.False(after.eq(before.to(after.dtype)).all().item<bool>(), "the steps moved nothing");
    }

    private static (AdamW Optimizer, MixedPrecision Precision, Weights Model) Make(MomentFormat format, PrecisionMode mode)
    {
        var model = new Weights(5);
        var precision = MixedPrecision.Apply(model, mode);
        var optimizer = new AdamW(AdamW.DecayGroups(precision.OptimizerParameters, 0.1), 3e-3, 0.9, 0.95, 1e-8, precision.GradientOf, format);
        return (optimizer, precision, model);
    }

    [Theory]
    [InlineData(OptimizerKind.AdamW, PrecisionMode.Fp32, false, 1, false)]
    [InlineData(OptimizerKind.AdamW8bit, PrecisionMode.Fp32, false, 1, false)]
    [InlineData(OptimizerKind.AdamW, PrecisionMode.Bf16, false, 1, false)]
    [InlineData(OptimizerKind.AdamW8bit, PrecisionMode.Bf16, false, 1, false)]
    [InlineData(OptimizerKind.AdamW, PrecisionMode.Fp32, true, 1, false)]
    [InlineData(OptimizerKind.AdamW8bit, PrecisionMode.Fp32, true, 1, false)]
    [InlineData(OptimizerKind.AdamW, PrecisionMode.Bf16, true, 1, false)]
    [InlineData(OptimizerKind.AdamW, PrecisionMode.Bf16, false, 2, false)]
    [InlineData(OptimizerKind.AdamW, PrecisionMode.Fp32, false, 2, true)]
    public void TwentyOverlappedStepsMatchTheInMemoryRunBitForBit(OptimizerKind optimizer, PrecisionMode mode, bool lora, int accumulation, bool checkpointing)
    {
        var random = new Random(3);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 4000).Select(_ => random.Next(101)).ToArray(), 16);
        var options = new TrainOptions
        {
            Steps = 20, MicroBatch = 2, GradientAccumulation = accumulation, LearningRate = 3e-3, Optimizer = optimizer, LogEvery = 20,
            GradClip = 0, WeightDecay = 0.1,
        };
        var (reference, _) = Train(corpus, options, mode, lora, checkpointing, libtorchOps: true);
        var (offloaded, trainer) = Train(corpus, options with { OptimizerOnHost = true }, mode, lora, checkpointing);
        AssertSame(reference, offloaded);
        var stats = trainer.HostOptimizer!.Stats;
        Assert.True(trainer.OverlapsOptimizer);
        Assert.Equal(20, stats.OverlappedSteps);
        // Both decoder layers are stepped during backward, except the first one on a frozen embedding (LoRA: no node).
        Assert.Equal(20 * (lora ? 1 : 2), stats.LayersDuringBackward);
    }

    [Theory]
    [InlineData(PrecisionMode.Fp32)]
    [InlineData(PrecisionMode.Fp16)]
    public void ClippingOrLossScalingStepsAfterBackwardAndStillMatches(PrecisionMode mode)
    {
        var random = new Random(4);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 4000).Select(_ => random.Next(101)).ToArray(), 16);
        var options = new TrainOptions { Steps = 20, MicroBatch = 2, LearningRate = 3e-3, LogEvery = 20, GradClip = mode == PrecisionMode.Fp32 ? 0.5 : 0 };
        var (reference, _) = Train(corpus, options, mode, lora: false, checkpointing: false, libtorchOps: true);
        var (offloaded, trainer) = Train(corpus, options with { OptimizerOnHost = true }, mode, lora: false, checkpointing: false);
        AssertSame(reference, offloaded);
        Assert.False(trainer.OverlapsOptimizer);
        Assert.Equal(0, trainer.HostOptimizer!.Stats.OverlappedSteps);
        Assert.Equal(0, trainer.HostOptimizer.Stats.LayersDuringBackward);
        Assert.Equal(1.0, trainer.HostOptimizer.Stats.StepTime / trainer.HostOptimizer.Stats.AfterBackwardTime, 6);
    }

    [Fact]
    public void HostBytesAreTheMomentsAndMasters()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        var random = new Random(5);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 2000).Select(_ => random.Next(101)).ToArray(), 16);
        using var mixed = MixedPrecision.Apply(model, PrecisionMode.Bf16);
        var trainer = new Trainer(model, corpus, new TrainOptions { Steps = 1, MicroBatch = 2, OptimizerOnHost = true }, mixed);
        long parameters = model.parameters().Sum(p => p.numel());
        Assert.Equal(parameters * (8 + 4), trainer.HostOptimizer!.HostBytes);
        Assert.Equal(parameters * 8, trainer.Optimizer.StateBytes);
    }

    private static (List<(string, Tensor)> State, Trainer Trainer) Train(TokenCorpus corpus, TrainOptions options, PrecisionMode mode, bool lora, bool checkpointing,
        bool libtorchOps = false)
    {
        var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 9, std: 0.05);
        if (lora)
        {
            LoraModel.Apply(model, new LoraConfig { Rank = 4, Alpha = 8, Targets = LoraTargets.AllLinear }, seed: 7);
        }
        if (checkpointing)
        {
            ActivationCheckpointing.Apply(model, every: 2);
        }
        var mixed = MixedPrecision.Apply(model, mode, options.GradientAccumulation);
        var trainer = new Trainer(model, corpus, options, mixed);
        trainer.Optimizer.FusedCpuStep = !libtorchOps;
        trainer.Run();
        var state = model.named_parameters().Select(p => (p.name, (Tensor)p.parameter))
            .Concat(mixed.Masters.Select(m => ("master." + m.Name, m.Master)))
            .Concat(trainer.Optimizer.StateTensors()).ToList();
        return (state, trainer);
    }

    private static IEnumerable<(string, Tensor)> Named(nn.Module model) => model.named_parameters().Select(p => (p.name, (Tensor)p.parameter));

    private static void AssertSame(IEnumerable<(string Name, Tensor Tensor)> expected, IEnumerable<(string Name, Tensor Tensor)> actual)
    {
        var a = expected.ToList();
        var b = actual.ToList();
        Assert.Equal(a.Select(t => t.Name), b.Select(t => t.Name));
        Assert.NotEmpty(a);
        for (int i = 0; i < a.Count; i++)
        {
            using var difference = (a[i].Tensor.to(ScalarType.Float32) - b[i].Tensor.to(ScalarType.Float32)).abs().max();
            Assert.True(a[i].Tensor.Same(b[i].Tensor), $"{a[i].Name}: largest difference {difference.item<float>():E3}");
        }
    }
}
