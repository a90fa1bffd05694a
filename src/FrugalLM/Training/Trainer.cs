using System.Diagnostics;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>Settings of a training run.</summary>
public sealed record TrainOptions
{
    /// <summary>Optimizer steps.</summary>
    public int Steps { get; init; } = 100;

    /// <summary>Sequences per micro-batch.</summary>
    public int MicroBatch { get; init; } = 8;

    /// <summary>Micro-batches per optimizer step (the loss of each is divided by this).</summary>
    public int GradientAccumulation { get; init; } = 1;

    /// <summary>Peak learning rate.</summary>
    public double LearningRate { get; init; } = 3e-4;

    /// <summary>Learning rate at the last step; null means a tenth of the peak.</summary>
    public double? MinLearningRate { get; init; }

    /// <summary>Warm-up steps; null means 5% of the steps.</summary>
    public int? WarmupSteps { get; init; }

    /// <summary>AdamW weight decay for matrices and embeddings.</summary>
    public double WeightDecay { get; init; } = 0.1;

    /// <summary>AdamW beta1.</summary>
    public double Beta1 { get; init; } = 0.9;

    /// <summary>AdamW beta2.</summary>
    public double Beta2 { get; init; } = 0.95;

    /// <summary>AdamW epsilon.</summary>
    public double Eps { get; init; } = 1e-8;

    /// <summary>Clip the global gradient norm to this; 0 disables clipping.</summary>
    public double GradClip { get; init; } = 1.0;

    /// <summary>Evaluate on held-out data every this many steps (and at the end); 0 only at the end.</summary>
    public int EvalEvery { get; init; }

    /// <summary>Held-out batches per evaluation; 0 means all.</summary>
    public int EvalBatches { get; init; }

    /// <summary>Report progress every this many steps.</summary>
    public int LogEvery { get; init; } = 10;

    /// <summary>Call the save callback every this many steps (and at the end); 0 only at the end.</summary>
    public int SaveEvery { get; init; }

    /// <summary>Seed of the data order.</summary>
    public int Seed { get; init; }

    /// <summary>Checks the values; throws <see cref="ArgumentException"/> naming the bad one.</summary>
    public void Validate()
    {
        static void Require(bool ok, string message)
        {
            if (!ok)
            {
                throw new ArgumentException(message);
            }
        }
        Require(Steps > 0, $"steps must be positive (got {Steps})");
        Require(MicroBatch > 0, $"batch must be positive (got {MicroBatch})");
        Require(GradientAccumulation > 0, $"gradient accumulation must be positive (got {GradientAccumulation})");
        Require(LearningRate > 0, $"learning rate must be positive (got {LearningRate})");
        Require(GradClip >= 0, $"gradient clipping must be >= 0 (got {GradClip})");
        Require(LogEvery > 0, $"log interval must be positive (got {LogEvery})");
    }
}

/// <summary>A progress report, sent every <see cref="TrainOptions.LogEvery"/> steps and after evaluations.</summary>
/// <param name="Step">Steps done.</param>
/// <param name="TotalSteps">Steps in the run.</param>
/// <param name="Loss">Mean training loss over the steps since the last report.</param>
/// <param name="LearningRate">Learning rate of the last step.</param>
/// <param name="GradNorm">Gradient norm (before clipping) of the last step.</param>
/// <param name="TokensPerSecond">Training throughput since the last report.</param>
/// <param name="ResidentBytes">Resident set now.</param>
/// <param name="PeakBytes">Peak resident set since the run began.</param>
/// <param name="EvalLoss">Held-out loss, when this report follows an evaluation.</param>
/// <param name="Elapsed">Time since the run began.</param>
public sealed record TrainProgress(int Step, int TotalSteps, double Loss, double LearningRate, double GradNorm, double TokensPerSecond, long ResidentBytes, long PeakBytes, double? EvalLoss, TimeSpan Elapsed);

/// <summary>What a finished run measured.</summary>
/// <param name="Steps">Steps done.</param>
/// <param name="FinalLoss">Training loss of the last report interval.</param>
/// <param name="EvalLoss">Held-out loss at the end.</param>
/// <param name="TokensPerSecond">Training throughput over the whole run (evaluation and saving excluded).</param>
/// <param name="PeakBytes">Peak resident set during the run.</param>
/// <param name="Elapsed">Wall time.</param>
public sealed record TrainResult(int Steps, double FinalLoss, double EvalLoss, double TokensPerSecond, long PeakBytes, TimeSpan Elapsed)
{
    /// <summary>Held-out perplexity, exp(eval loss).</summary>
    public double EvalPerplexity => Math.Exp(EvalLoss);
}

/// <summary>
/// The training loop: next-token cross-entropy on packed blocks, AdamW with decay groups, warm-up + cosine
/// schedule, gradient accumulation and clipping, held-out evaluation, and a save callback every
/// <see cref="TrainOptions.SaveEvery"/> steps and at the end. Each step runs in its own dispose scope so
/// native memory stays flat.
/// </summary>
public sealed class Trainer(LlamaForCausalLM model, TokenCorpus corpus, TrainOptions options)
{
    /// <summary>Runs the configured steps; <paramref name="save"/> receives the number of steps done.</summary>
    public TrainResult Run(Action<TrainProgress>? report = null, Action<int>? save = null, CancellationToken cancel = default)
    {
        options.Validate();
        var parameters = model.named_parameters().Select(p => (p.name, (Tensor)p.parameter)).ToList();
        using var optimizer = new AdamW(AdamW.DecayGroups(parameters, options.WeightDecay), options.LearningRate, options.Beta1, options.Beta2, options.Eps);
        var schedule = new CosineSchedule(
            options.LearningRate,
            options.MinLearningRate ?? options.LearningRate / 10,
            options.WarmupSteps ?? Math.Max(1, options.Steps / 20),
            options.Steps);
        var trainable = model.parameters().Where(p => p.requires_grad).ToList();
        model.train();
        MemoryProbe.ResetPeak();
        var clock = Stopwatch.StartNew();
        var trainClock = new Stopwatch();
        var intervalClock = Stopwatch.StartNew();
        double intervalLoss = 0, lastLoss = double.NaN, gradNorm = 0, lr = 0;
        int intervalSteps = 0;
        long intervalTokens = 0, totalTokens = 0;
        double evalLoss = double.NaN;
        using var batches = Batches().GetEnumerator();
        for (int step = 0; step < options.Steps; step++)
        {
            cancel.ThrowIfCancellationRequested();
            trainClock.Start();
            lr = schedule.At(step);
            optimizer.LearningRate = lr;
            (double stepLoss, gradNorm) = Step(optimizer, trainable, MicroBatches(batches));
            trainClock.Stop();
            long tokens = (long)options.MicroBatch * corpus.Sequence * options.GradientAccumulation;
            intervalTokens += tokens;
            totalTokens += tokens;
            intervalLoss += stepLoss;
            intervalSteps++;
            int done = step + 1;
            bool evaluate = done == options.Steps || (options.EvalEvery > 0 && done % options.EvalEvery == 0);
            if (evaluate)
            {
                evalLoss = Evaluate(options.EvalBatches);
                model.train();
            }
            if (evaluate || done % options.LogEvery == 0)
            {
                lastLoss = intervalLoss / intervalSteps;
                var progress = new TrainProgress(done, options.Steps, lastLoss, lr, gradNorm,
                    intervalTokens / Math.Max(1e-9, intervalClock.Elapsed.TotalSeconds),
                    MemoryProbe.CurrentBytes, MemoryProbe.PeakBytes, evaluate ? evalLoss : null, clock.Elapsed);
                report?.Invoke(progress);
                intervalLoss = 0;
                intervalSteps = 0;
                intervalTokens = 0;
                intervalClock.Restart();
            }
            if (save is not null && (done == options.Steps || (options.SaveEvery > 0 && done % options.SaveEvery == 0)))
            {
                save(done);
            }
        }
        return new TrainResult(options.Steps, lastLoss, evalLoss, totalTokens / Math.Max(1e-9, trainClock.Elapsed.TotalSeconds), MemoryProbe.PeakBytes, clock.Elapsed);
    }

    /// <summary>
    /// One optimizer step: zero the gradients, backward through each micro-batch with its loss divided by
    /// their count, clip the global gradient norm, update. Returns the mean loss and the norm before clipping.
    /// </summary>
    public (double Loss, double GradNorm) Step(AdamW optimizer, IReadOnlyList<Parameter> trainable, IEnumerable<long[]> microBatches)
    {
        using var step = StepScope.Begin();
        var batches = microBatches.ToList();
        optimizer.ZeroGrad();
        double loss = 0;
        foreach (var batch in batches)
        {
            var micro = Loss(batch, options.MicroBatch);
            (micro / batches.Count).backward();
            loss += micro.item<float>() / batches.Count;
        }
        double norm = options.GradClip > 0 ? nn.utils.clip_grad_norm_(trainable, options.GradClip) : TotalNorm(trainable);
        optimizer.Step();
        return (loss, norm);
    }

    private IEnumerable<long[]> MicroBatches(IEnumerator<long[]> batches)
    {
        for (int i = 0; i < options.GradientAccumulation; i++)
        {
            batches.MoveNext();
            yield return batches.Current;
        }
    }

    /// <summary>Mean next-token loss over held-out blocks (at most <paramref name="maxBatches"/> batches; 0 = all).</summary>
    public double Evaluate(int maxBatches = 0)
    {
        model.eval();
        double sum = 0;
        long count = 0;
        using var noGrad = no_grad();
        foreach (var batch in corpus.EvalBatches(options.MicroBatch).Take(maxBatches > 0 ? maxBatches : int.MaxValue))
        {
            using var step = StepScope.Begin();
            int rows = batch.Length / (corpus.Sequence + 1);
            sum += Loss(batch, rows).item<float>() * rows;
            count += rows;
        }
        return sum / Math.Max(1, count);
    }

    /// <summary>Mean next-token cross-entropy of <paramref name="rows"/> packed blocks.</summary>
    public Tensor Loss(long[] batch, int rows)
    {
        var ids = tensor(batch, [rows, corpus.Sequence + 1]);
        var inputs = ids[.., ..^1];
        var labels = ids[.., 1..];
        var logits = model.forward(inputs);
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]).to(ScalarType.Float32), labels.reshape(-1));
    }

    private IEnumerable<long[]> Batches()
    {
        for (int epoch = 0; ; epoch++)
        {
            bool any = false;
            foreach (var batch in corpus.TrainBatches(options.MicroBatch, options.Seed, epoch))
            {
                any = true;
                yield return batch;
            }
            if (!any)
            {
                throw new DataException($"the corpus has {corpus.TrainBlocks} training blocks: fewer than one batch of {options.MicroBatch}");
            }
        }
    }

    private static double TotalNorm(IEnumerable<Tensor> parameters)
    {
        using var scope = NewDisposeScope();
        double sum = 0;
        foreach (var p in parameters)
        {
            if (p.grad is Tensor g)
            {
                sum += g.to(ScalarType.Float32).pow(2).sum().item<float>();
            }
        }
        return Math.Sqrt(sum);
    }
}
