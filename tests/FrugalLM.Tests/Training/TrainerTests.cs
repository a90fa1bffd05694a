using FrugalLM.Lora;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Training;

public sealed class TrainerTests
{
    public TrainerTests() => TestSupport.Init();

    [Fact]
    public void LearnsARepeatingSequenceAndReportsProgress()
    {
        // A corpus that repeats one 17-token phrase: a working loop drives the loss far below log(vocab).
        var phrase = Enumerable.Range(0, 17).Select(i => (i * 7 + 3) % 101).ToArray();
        var tokens = Enumerable.Range(0, 4000).Select(i => phrase[i % phrase.Length]).ToArray();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 2);
        var corpus = TokenCorpus.FromTokens(tokens, 32);
        var reports = new List<TrainProgress>();
        var saves = new List<int>();
        var options = new TrainOptions { Steps = 60, MicroBatch = 4, LearningRate = 3e-3, LogEvery = 20, EvalEvery = 30, SaveEvery = 25 };
        var result = new Trainer(model, corpus, options).Run(reports.Add, saves.Add);
        Assert.Equal([20, 30, 40, 60], reports.Select(r => r.Step));
        Assert.Equal([25, 50, 60], saves);
        Assert.NotNull(reports[1].EvalLoss);
        Assert.True(result.EvalLoss < 0.5, $"held-out loss {result.EvalLoss}");
        Assert.True(reports[0].Loss > result.FinalLoss);
        Assert.True(result.TokensPerSecond > 0 && result.PeakBytes > 0);
    }

    [Fact]
    public void AccumulatingFourMicroBatchesEqualsOneBatchOfFour()
    {
        var random = new Random(8);
        var tokens = Enumerable.Range(0, 4 * 21).Select(_ => random.Next(101)).ToArray();
        var corpus = TokenCorpus.FromTokens(tokens, 20);
        var rows = corpus.TrainBatches(1, seed: 0, epoch: 0).Take(4).ToList();
        var all = new TrainingBatch(rows.SelectMany(r => r.Inputs).ToArray(), rows.SelectMany(r => r.Labels).ToArray(), 4, 20);
        (double, Dictionary<string, Tensor>) Run(int microBatch, IReadOnlyList<TrainingBatch> batches)
        {
            var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 4, std: 0.1);
            var trainer = new Trainer(model, corpus, new TrainOptions { MicroBatch = microBatch, GradClip = 0.5, LearningRate = 1e-3, Eps = 1e-6 });
            var result = trainer.Step(batches);
            return (result.Loss, model.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter));
        }
        var (lossA, a) = Run(1, rows);
        var (lossB, b) = Run(4, [all]);
        // Same arithmetic but summed in a different order: fp32 rounding, ~1e-7 relative.
        Assert.Equal(lossB, lossA, 1e-5);
        foreach (var (name, p) in a)
        {
            Assert.True(TensorAssert.RelativeError(p, b[name]) < 1e-5, name);
        }
    }

    [Fact]
    public void CosineScheduleWarmsUpThenDecaysToTheFloor()
    {
        var schedule = new CosineSchedule(1.0, 0.1, 10, 111);
        Assert.Equal(0.1, schedule.At(0), 12);
        Assert.Equal(1.0, schedule.At(9), 12);
        Assert.Equal(1.0, schedule.At(10), 12);
        Assert.Equal(0.55, schedule.At(60), 12);
        Assert.Equal(0.1, schedule.At(110), 12);
    }

    [Fact]
    public void DropoutMasksRepeatRunToRun()
    {
        // LoRA dropout draws from the process-wide generator; the trainer seeds it per step, so moving it between two
        // runs (as anything else in the process may) changes nothing. Without the seeding the losses differ.
        var random = new Random(3);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 2000).Select(_ => random.Next(101)).ToArray(), 16);
        var options = new TrainOptions { Steps = 3, MicroBatch = 2, LearningRate = 3e-3, LogEvery = 1 };
        List<double> Losses()
        {
            using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 9, std: 0.05);
            LoraModel.Apply(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.3, Targets = LoraTargets.AllLinear }, seed: 7);
            using var mixed = MixedPrecision.Apply(model, Planning.Precision.Fp32);
            var losses = new List<double>();
            new Trainer(model, corpus, options, mixed).Run(p => losses.Add(p.Loss));
            return losses;
        }
        var first = Losses();
        using (rand(1000))
        {
        }
        Assert.Equal(3, first.Count);
        Assert.Equal(first, Losses());
    }

    [Theory]
    [InlineData(5, 4, 1.0, true)]
    [InlineData(5, 4, 1.0, false)]
    [InlineData(3, (int)(OptimizerStepLayout.ChunkElements / 2) + 13, 0.5, true)] // three chunks, the last ragged; clipped
    [InlineData(3, (int)(OptimizerStepLayout.ChunkElements / 2) + 13, 0.5, false)]
    public void AdamWMatchesAFloat64Recomputation(int rows, int columns, double multiplier, bool fused)
    {
        // Three steps on one parameter with fresh random gradients, against the update rule in float64.
        var generator = new TorchSharp.torch.Generator(31);
        using var start = randn([rows, columns], generator: generator);
        var p = start.clone().requires_grad_(true);
        var grads = Enumerable.Range(0, 3).Select(_ => randn([rows, columns], generator: generator)).ToList();
        using var optimizer = new AdamW([new ParameterGroup([("p", p)], 0.05)], 0.01, 0.9, 0.99, 1e-3) { FusedCpuStep = fused };
        var reference = start.to(ScalarType.Float64);
        var m = zeros_like(reference);
        var v = zeros_like(reference);
        for (int t = 1; t <= 3; t++)
        {
            p.grad = grads[t - 1].clone();
            optimizer.Step(multiplier);
            var g = grads[t - 1].to(ScalarType.Float64) * multiplier;
            reference = reference * (1 - 0.01 * 0.05);
            m = 0.9 * m + 0.1 * g;
            v = 0.99 * v + 0.01 * g * g;
            var denom = v.sqrt() / Math.Sqrt(1 - Math.Pow(0.99, t)) + 1e-3;
            reference = reference - 0.01 / (1 - Math.Pow(0.9, t)) * m / denom;
        }
        // fp32 arithmetic over three steps: ~1e-7 relative.
        Assert.True(TensorAssert.RelativeError(p.detach(), reference) < 1e-6);
        Assert.Equal(2L * rows * columns * 4, optimizer.StateBytes);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void EightBitAdamWStepsALargeTensorChunkByChunkAsIfEachChunkWereItsOwnTensor(bool fused)
    {
        // The step cuts tensors into chunks on 8-bit block edges, so a tensor of 2.5 chunks must move exactly as its
        // three pieces do when each is a parameter of its own with its own quantized moments.
        long chunk = OptimizerStepLayout.ChunkElements, n = 2 * chunk + chunk / 2 + 5;
        var generator = new TorchSharp.torch.Generator(8);
        using var start = randn([n], generator: generator);
        var grads = Enumerable.Range(0, 3).Select(_ => randn([n], generator: generator) * 1e-2).ToList();
        var whole = start.clone().requires_grad_(true);
        var pieces = Enumerable.Range(0, 3).Select(i => start.narrow(0, i * chunk, Math.Min(chunk, n - i * chunk)).clone().requires_grad_(true)).ToArray();
        using var one = new AdamW([new ParameterGroup([("w", whole)], 0.1)], 1e-3, format: MomentFormat.Blockwise8Bit) { FusedCpuStep = fused };
        using var three = new AdamW([new ParameterGroup(pieces.Select((q, i) => ($"w{i}", q)).ToList(), 0.1)], 1e-3, format: MomentFormat.Blockwise8Bit)
        {
            FusedCpuStep = fused,
        };
        foreach (var g in grads)
        {
            whole.grad = g.clone();
            for (int i = 0; i < 3; i++)
            {
                pieces[i].grad = g.narrow(0, i * chunk, pieces[i].shape[0]).clone();
            }
            one.Step(0.7);
            three.Step(0.7);
        }
        using var joined = cat(pieces.Select(q => q.detach()).ToArray());
        Assert.True(whole.detach().eq(joined).all().item<bool>(), "the chunked step differs from separate tensors");
        Assert.False(whole.detach().eq(start).all().item<bool>(), "the step moved nothing");
    }
}
