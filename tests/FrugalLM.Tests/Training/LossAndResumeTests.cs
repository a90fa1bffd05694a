using FrugalLM.Models.Llama;
using FrugalLM.Precision;
using FrugalLM.Training;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Tests.Training;

public sealed class LossAndResumeTests
{
    public LossAndResumeTests() => TestSupport.Init();

    [Theory]
    [InlineData(false, 7)]
    [InlineData(true, 5)]
    [InlineData(false, 1000)]
    [InlineData(true, 5, true)]
    [InlineData(false, 7, true)]
    [InlineData(true, 5, false, 0.37)] // a scaled loss (1 / tokens, an fp16 loss scale): backward scales the fused gradients
    [InlineData(false, 7, true, 3.5)]
    public void ChunkedLossEqualsTheFullLossWithTheSameGradients(bool tied, int chunk, bool accumulate = false, double scale = 1)
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig(tied));
        model.InitializeWeights(seed: 14, std: 0.2);
        using var ids = randint(0, 101, [3, 12], dtype: ScalarType.Int64);
        var labels = ids[.., 1..].clone();
        labels[0, TensorIndex.Slice(0, 4)] = tensor(TrainingBatch.IgnoreLabel); // some positions take no loss
        // With accumulate, gradients of an earlier micro-batch are already there: the chunked loss adds the head's
        // gradient to them in place instead of returning it, and must add, not overwrite.
        var earlier = model.named_parameters().ToDictionary(p => p.name, p => randn_like(p.parameter));
        (double Loss, Dictionary<string, Tensor> Grads) Run(bool chunked)
        {
            foreach (var (name, p) in model.named_parameters())
            {
                p.grad = accumulate ? earlier[name].clone() : null;
            }
            var hidden = model.Hidden(ids[.., ..^1]);
            var loss = chunked ? CausalLmLoss.Chunked(hidden, model.HeadWeight!, labels, chunk) : CausalLmLoss.Full(model.Logits(hidden), labels);
            (loss * scale).backward();
            return (loss.item<float>(), model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.clone()));
        }
        var full = Run(false);
        var chunkedRun = Run(true);
        // Same sums in another order (per-chunk partial sums): fp32 rounding only.
        Assert.Equal(full.Loss, chunkedRun.Loss, 1e-5 * full.Loss);
        foreach (var (name, g) in full.Grads)
        {
            Assert.True(TensorAssert.RelativeError(chunkedRun.Grads[name], g) < 1e-5, $"{name}: {TensorAssert.RelativeError(chunkedRun.Grads[name], g):E2}");
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32, false)]
    [InlineData(ScalarType.BFloat16, false)]
    [InlineData(ScalarType.Float32, true)]
    [InlineData(ScalarType.BFloat16, true)]
    [InlineData(ScalarType.Float16, true)]
    public void ChunkedLossOfAStandaloneHeadMatchesTheFullLoss(ScalarType dtype, bool trainHead)
    {
        // A frozen head is LoRA's case: the fused pass computes no weight gradient. A trainable 16-bit head that this CPU
        // multiplies natively (bf16 with AVX-512 BF16) takes its gradient products in 16 bits; fp16 here takes them from
        // the head's fp32 copy. Reference: the full loss over the same head's logits widened to fp32 (what the chunked
        // path computes), with fresh inputs, and autograd's backward through the 16-bit product.
        using var weight = (randn([97, 24]) * 0.3).to(dtype).requires_grad_(trainHead);
        using var hidden = (randn([2, 9, 24]) * 0.5).to(dtype).requires_grad_(true);
        using var labels = randint(0, 97, [2, 9], dtype: ScalarType.Int64);
        labels[1, 3] = tensor(TrainingBatch.IgnoreLabel);
        using var chunked = CausalLmLoss.Chunked(hidden, weight, labels, 4);
        (chunked * 0.25).backward();
        var gradHidden = hidden.grad!.clone();
        var gradWeight = weight.grad?.clone();
        hidden.grad = null;
        weight.grad = null;
        using var logits = Matmul16.Linear(hidden, weight).to(ScalarType.Float32);
        using var full = CausalLmLoss.Full(logits, labels);
        (full * 0.25).backward();
        // fp32 and bf16: the same logits, summed in another order (fp32 rounding). fp16 with a trainable head: the chunked
        // path takes its logits from the head's fp32 copy, the reference rounds each to fp16 (2^-11 relative), so the loss
        // moves by about that (measured 1.2e-5 relative on one draw).
        double lossTolerance = dtype == ScalarType.Float16 && trainHead ? 1e-3 : 1e-5;
        Assert.Equal(full.item<float>(), chunked.item<float>(), lossTolerance * full.item<float>());
        // fp32: rounding of sums in another order. 16-bit: both gradients end in the 16-bit dtype, from products of
        // operands rounded to it (8 significant bits for bf16, 11 for fp16), summed in another order, so elements
        // differ by about one 16-bit step (2^-8 relative for bf16).
        double tolerance = dtype == ScalarType.Float32 ? 1e-5 : 1e-2;
        Assert.True(TensorAssert.RelativeError(gradHidden.to(ScalarType.Float32), hidden.grad!.to(ScalarType.Float32)) < tolerance);
        if (!trainHead)
        {
            Assert.Null(gradWeight);
            return;
        }
        Assert.Equal(dtype, gradWeight!.dtype);
        Assert.True(TensorAssert.RelativeError(gradWeight.to(ScalarType.Float32), weight.grad!.to(ScalarType.Float32)) < tolerance);
    }

    [Theory]
    [InlineData(PrecisionMode.Fp32)]
    [InlineData(PrecisionMode.Bf16)]
    [InlineData(PrecisionMode.Fp16)]
    public void KillAndResumeGivesBitIdenticalWeights(PrecisionMode mode)
    {
        var random = new Random(21);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 3000).Select(_ => random.Next(101)).ToArray(), 16);
        using var dir = TestSupport.TempDir();
        TrainOptions Options(string folder) => new()
        {
            Steps = 9, MicroBatch = 3, GradientAccumulation = 2, LearningRate = 3e-3, LogEvery = 100, EvalEvery = 0, EvalBatches = 1,
            CheckpointEvery = 4, CheckpointFolder = folder,
        };
        (LlamaForCausalLM, MixedPrecision) Fresh()
        {
            var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 30, std: 0.1);
            return (model, MixedPrecision.Apply(model, mode, 2));
        }
        // Uninterrupted.
        var (a, mixedA) = Fresh();
        new Trainer(a, corpus, Options(Path.Combine(dir.Path, "a")), mixedA).Run();
        // Interrupted after the checkpoint at step 8 (the process "dies"; only the checkpoint survives).
        var (b, mixedB) = Fresh();
        var interrupted = new Trainer(b, corpus, Options(Path.Combine(dir.Path, "b")), mixedB);
        interrupted.Run();
        var latest = TrainingCheckpoint.Latest(Path.Combine(dir.Path, "b"))!;
        Assert.EndsWith("step-000008", latest);
        var (c, mixedC) = Fresh();
        var resumed = new Trainer(c, corpus, Options(Path.Combine(dir.Path, "c")), mixedC);
        TrainingCheckpoint.Load(resumed, latest);
        Assert.Equal(8, resumed.StepsDone);
        resumed.Run();
        var expected = a.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in c.named_parameters())
        {
            Assert.True(p.Same(expected[name]), $"{name} differs after resume");
        }
        Assert.Equal(interrupted.Optimizer.StepCount, resumed.Optimizer.StepCount);
        foreach (var m in new[] { mixedA, mixedB, mixedC })
        {
            m.Dispose();
        }
        a.Dispose();
        b.Dispose();
        c.Dispose();
    }

    [Fact]
    public void PromptCompletionTakesLossOnCompletionsOnly()
    {
        using var dir = TestSupport.TempDir();
        var file = Path.Combine(dir.Path, "pairs.jsonl");
        File.WriteAllLines(file, Enumerable.Range(0, 40).Select(i => $"{{\"prompt\": \"{i} plus 1 is\", \"completion\": \" {i + 1}\"}}"));
        // A toy tokenizer: one token per character.
        IReadOnlyList<int> Encode(string s) => s.Select(ch => (int)ch % 100 + 1).ToArray();
        var data = TrainingData.Load(file, Encode, eosTokenId: 0, padTokenId: 0, sequence: 16);
        Assert.IsType<PromptCompletionData>(data);
        Assert.Equal(38, data.TrainSequences);
        Assert.Equal(2, data.EvalSequences);
        var batch = data.EvalBatches(8).Single();
        // "19 plus 1 is" (12 tokens) + " 20" (3 tokens) + EOS: positions 11..14 predict " 20" and EOS.
        var labels = batch.Labels.Take(16).ToArray();
        var counted = Enumerable.Range(0, 16).Where(i => labels[i] != TrainingBatch.IgnoreLabel).ToArray();
        Assert.Equal([11, 12, 13, 14], counted);
        Assert.Equal(Encode(" 20").Select(t => (long)t).Append(0L), counted.Select(i => labels[i]));
        Assert.Equal(batch.Inputs.Take(16).Skip(1).Take(14), Encode("19 plus 1 is 20").Skip(1).Select(t => (long)t));
    }
}
