using System.Diagnostics;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Sharding;
using TorchSharp;
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

    /// <summary>AdamW (fp32 or bf16 moments, as the precision says) or 8-bit AdamW.</summary>
    public OptimizerKind Optimizer { get; init; } = OptimizerKind.AdamW;

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

    /// <summary>Tokens per chunk of the LM head and loss (0: full fp32 logits at once, as transformers).</summary>
    public int LossChunk { get; init; }

    /// <summary>Write a resumable training checkpoint every this many steps into <see cref="CheckpointFolder"/> (0: never).</summary>
    public int CheckpointEvery { get; init; }

    /// <summary>Where resumable checkpoints go (<c>step-N</c> folders; the last two are kept).</summary>
    public string? CheckpointFolder { get; init; }

    /// <summary>
    /// ZeRO-Offload (<c>--offload optimizer</c>): fp32 masters and moments on the host tier, the step run by
    /// <see cref="Training.HostOptimizer"/> in vectorized C# instead of libtorch ops.
    /// </summary>
    public bool OptimizerOnHost { get; init; }

    /// <summary>
    /// With <see cref="OptimizerOnHost"/>: step each decoder layer while backward continues, on the last micro-batch of a
    /// step. Only when the update needs nothing global: without clipping (<see cref="GradClip"/> 0: the global norm is
    /// known only after backward) and without fp16 loss scaling (an overflow anywhere must skip the whole step);
    /// otherwise the host step runs after backward.
    /// </summary>
    public bool OverlapOptimizer { get; init; } = true;

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
        Require(LossChunk >= 0, $"loss chunk must be >= 0 (got {LossChunk})");
        Require(Optimizer is OptimizerKind.AdamW or OptimizerKind.AdamW8bit, $"the trainer runs AdamW or 8-bit AdamW (got {Optimizer})");
        Require(CheckpointEvery == 0 || CheckpointFolder is not null, "checkpoints need a checkpoint folder");
    }
}

/// <summary>A progress report, sent every <see cref="TrainOptions.LogEvery"/> steps and after evaluations.</summary>
/// <param name="Step">Steps done.</param>
/// <param name="TotalSteps">Steps in the run.</param>
/// <param name="Loss">Mean training loss (per token) over the steps since the last report.</param>
/// <param name="LearningRate">Learning rate of the last step.</param>
/// <param name="GradNorm">Gradient norm (before clipping) of the last step.</param>
/// <param name="TokensPerSecond">Training throughput since the last report.</param>
/// <param name="ResidentBytes">Resident set now.</param>
/// <param name="PeakBytes">Peak resident set since the run began.</param>
/// <param name="EvalLoss">Held-out loss, when this report follows an evaluation.</param>
/// <param name="Elapsed">Time since the run began.</param>
/// <param name="LossScale">The fp16 loss scale (null in other modes).</param>
/// <param name="SkippedSteps">Steps skipped so far because gradients overflowed.</param>
public sealed record TrainProgress(int Step, int TotalSteps, double Loss, double LearningRate, double GradNorm, double TokensPerSecond,
    long ResidentBytes, long PeakBytes, double? EvalLoss, TimeSpan Elapsed, double? LossScale = null, long SkippedSteps = 0);

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

/// <summary>One optimizer step's outcome.</summary>
/// <param name="Loss">Mean loss per counted token.</param>
/// <param name="GradNorm">Global gradient norm before clipping (infinite or NaN on overflow).</param>
/// <param name="Skipped">True when the update was skipped because the gradients overflowed.</param>
public readonly record struct StepResult(double Loss, double GradNorm, bool Skipped);

/// <summary>
/// The training loop: next-token cross-entropy normalized over the step's counted tokens, AdamW with decay
/// groups, warm-up + cosine schedule, gradient accumulation and clipping, mixed precision through
/// <see cref="MixedPrecision"/>, held-out evaluation, a save callback every
/// <see cref="TrainOptions.SaveEvery"/> steps and at the end, and resumable checkpoints
/// (<see cref="TrainingCheckpoint"/>; one file per rank plus an index under FSDP, <see cref="ShardedCheckpoint"/>). Each step runs in a <see cref="StepScope"/> so native memory stays flat.
/// </summary>
public sealed class Trainer
{
    private readonly CausalLM model;
    private readonly ITrainingData data;
    private readonly TrainOptions options;
    private readonly MixedPrecision precision;
    private readonly CosineSchedule schedule;
    private readonly ShardedModel? sharding;
    private TimeSpan optimizerTime;

    /// <summary>Prepares training; <paramref name="precision"/> defaults to fp32 (no conversion).</summary>
    /// <param name="model">The model.</param>
    /// <param name="data">Training and held-out data.</param>
    /// <param name="options">The settings.</param>
    /// <param name="precision">The precision policy.</param>
    /// <param name="sharding">The model's FSDP sharding (<see cref="Fsdp.Wrap"/>): the optimizer then steps this rank's shards,
    /// each rank takes its slice of every global batch of <see cref="TrainOptions.MicroBatch"/> x world size sequences, and
    /// losses, token counts and the gradient norm are global.</param>
    public Trainer(CausalLM model, ITrainingData data, TrainOptions options, MixedPrecision? precision = null, ShardedModel? sharding = null)
    {
        options.Validate();
        this.model = model;
        this.data = data;
        this.options = options;
        this.sharding = sharding;
        this.precision = precision ?? MixedPrecision.Apply(model, Planning.Precision.Fp32);
        var format = options.Optimizer == OptimizerKind.AdamW8bit ? MomentFormat.Blockwise8Bit
            : this.precision.Bf16Moments ? MomentFormat.BFloat16 : MomentFormat.Float32;
        if (options.OptimizerOnHost && sharding is not null)
        {
            throw new ArgumentException("the host optimizer (--offload optimizer) does not compose with FSDP sharding");
        }
        Optimizer = sharding is null
            ? new AdamW(
                AdamW.DecayGroups(this.precision.OptimizerParameters, options.WeightDecay),
                options.LearningRate, options.Beta1, options.Beta2, options.Eps,
                this.precision.GradientOf, format, EmbeddingParameterNames(model))
            : new AdamW(sharding.OptimizerGroups(options.WeightDecay), options.LearningRate, options.Beta1, options.Beta2, options.Eps,
                null, format, sharding.EmbeddingFlats);
        HostOptimizer = options.OptimizerOnHost ? new HostOptimizer(Optimizer, this.precision) : null;
        schedule = new CosineSchedule(
            options.LearningRate,
            options.MinLearningRate ?? options.LearningRate / 10,
            options.WarmupSteps ?? Math.Max(1, options.Steps / 20),
            options.Steps);
    }

    /// <summary>Names of the embedding tables' weights (8-bit AdamW keeps their moments in fp32).</summary>
    public static IReadOnlySet<string> EmbeddingParameterNames(nn.Module model) =>
        model.named_modules().Where(m => m.module is TokenEmbedding).Select(m => m.name + ".weight").ToHashSet(StringComparer.Ordinal);

    /// <summary>The optimizer (its moments are part of checkpoints).</summary>
    public AdamW Optimizer { get; }

    /// <summary>The host optimizer that runs the step under <see cref="TrainOptions.OptimizerOnHost"/> (null otherwise).</summary>
    public HostOptimizer? HostOptimizer { get; }

    /// <summary>Whether this run's host steps overlap backward (<see cref="TrainOptions.OverlapOptimizer"/> and its conditions).</summary>
    public bool OverlapsOptimizer => HostOptimizer is not null && options.OverlapOptimizer && options.GradClip == 0 && precision.Scaler is null;

    /// <summary>
    /// Without the host optimizer: time in the in-memory optimizer step and the copy of masters into 16-bit weights (what
    /// the host kernel does in one pass), for comparison with <see cref="HostOptimizerStats.StepTime"/>; null with it.
    /// </summary>
    public TimeSpan? OptimizerStepTime => HostOptimizer is null ? optimizerTime : null;

    /// <summary>In-memory optimizer steps taken (counted with <see cref="OptimizerStepTime"/>).</summary>
    public long OptimizerSteps { get; private set; }

    /// <summary>The precision policy.</summary>
    public MixedPrecision Precision => precision;

    /// <summary>Steps done so far (restored by <see cref="Resume"/>).</summary>
    public int StepsDone { get; internal set; }

    /// <summary>Where the data stream is: epoch and batches consumed within it.</summary>
    public (int Epoch, int Batch) DataPosition { get; internal set; }

    /// <summary>The model.</summary>
    internal CausalLM Model => model;

    /// <summary>Under FSDP: what the sharded checkpoints' index records for consolidation (see <see cref="ShardedCheckpoint"/>).</summary>
    public ConsolidationTarget? CheckpointTarget { get; set; }

    /// <summary>Called after each resumable checkpoint with its folder and the time writing it took (on every rank).</summary>
    public Action<string, TimeSpan>? CheckpointWritten { get; set; }

    /// <summary>Writes a resumable checkpoint of the current step into <see cref="TrainOptions.CheckpointFolder"/>: one file per
    /// rank plus an index under FSDP (every rank must call it), <see cref="TrainingCheckpoint"/> otherwise.</summary>
    public string SaveCheckpoint()
    {
        var clock = Stopwatch.StartNew();
        var folder = options.CheckpointFolder ?? throw new InvalidOperationException("no checkpoint folder set");
        var path = sharding is null ? TrainingCheckpoint.Save(this, folder) : ShardedCheckpoint.Save(this, sharding, folder, CheckpointTarget);
        CheckpointWritten?.Invoke(path, clock.Elapsed);
        return path;
    }

    /// <summary>Restores the newest complete checkpoint in <see cref="TrainOptions.CheckpointFolder"/> (sharded under FSDP); returns its
    /// path. Throws when there is none, or when the folder holds checkpoints of the other kind.</summary>
    public string Resume()
    {
        var folder = options.CheckpointFolder ?? throw new InvalidOperationException("no checkpoint folder set");
        var latest = sharding is null ? TrainingCheckpoint.Latest(folder) : ShardedCheckpoint.Latest(folder);
        if (latest is null)
        {
            var other = sharding is null ? ShardedCheckpoint.Latest(folder) : TrainingCheckpoint.Latest(folder);
            throw new ArgumentException(other is null
                ? $"--resume: no complete checkpoint in {folder}"
                : sharding is null
                    ? $"--resume: {other} is a sharded (FSDP) checkpoint: resume it with the same 'frugal launch -n N -- train ... --fsdp', or consolidate it ('frugal checkpoint consolidate {other} --out FOLDER')"
                    : $"--resume: {other} is a single-process checkpoint; an FSDP run resumes only from sharded ones");
        }
        if (sharding is null)
        {
            TrainingCheckpoint.Load(this, latest);
        }
        else
        {
            ShardedCheckpoint.Load(this, sharding, latest);
        }
        return latest;
    }

    /// <summary>Runs the remaining steps; <paramref name="save"/> receives the number of steps done.</summary>
    public TrainResult Run(Action<TrainProgress>? report = null, Action<int>? save = null, CancellationToken cancel = default)
    {
        model.train();
        MemoryProbe.ResetPeak();
        var clock = Stopwatch.StartNew();
        var trainClock = new Stopwatch();
        var intervalClock = Stopwatch.StartNew();
        double intervalLoss = 0, lastLoss = double.NaN, evalLoss = double.NaN;
        int intervalSteps = 0;
        long intervalTokens = 0, totalTokens = 0;
        StepResult last = default;
        using var batches = Batches().GetEnumerator();
        while (StepsDone < options.Steps)
        {
            cancel.ThrowIfCancellationRequested();
            TestHooks.BeforeStep(StepsDone + 1, sharding?.Collectives.Rank ?? 0);
            trainClock.Start();
            Optimizer.LearningRate = schedule.At(StepsDone);
            var micro = Take(batches, options.GradientAccumulation);
            // Dropout draws from the process-wide generator (TorchSharp's dropout takes none), whose position nothing
            // else fixes (measured: the demo's fine-tune, LoRA dropout 0.05, differed from run to run by its 5th step).
            // Each step starts it from the run's seed and the step's index: the masks repeat run to run, and a resumed
            // run draws the ones the uninterrupted run would have.
            manual_seed(DropoutSeed(options.Seed, StepsDone));
            last = Step(micro);
            trainClock.Stop();
            long tokens = micro.Sum(b => (long)b.Rows * b.Columns);
            intervalTokens += tokens;
            totalTokens += tokens;
            intervalLoss += last.Loss;
            intervalSteps++;
            int done = ++StepsDone;
            bool evaluate = done == options.Steps || (options.EvalEvery > 0 && done % options.EvalEvery == 0);
            if (evaluate)
            {
                evalLoss = Evaluate(options.EvalBatches);
                model.train();
            }
            if (evaluate || done % options.LogEvery == 0)
            {
                lastLoss = intervalLoss / intervalSteps;
                report?.Invoke(new TrainProgress(done, options.Steps, lastLoss, Optimizer.LearningRate, last.GradNorm,
                    intervalTokens / Math.Max(1e-9, intervalClock.Elapsed.TotalSeconds),
                    MemoryProbe.CurrentBytes, MemoryProbe.PeakBytes, evaluate ? evalLoss : null, clock.Elapsed,
                    precision.Scaler?.Scale, precision.Scaler?.SkippedSteps ?? 0));
                intervalLoss = 0;
                intervalSteps = 0;
                intervalTokens = 0;
                intervalClock.Restart();
            }
            if (save is not null && (done == options.Steps || (options.SaveEvery > 0 && done % options.SaveEvery == 0)))
            {
                save(done);
            }
            if (options.CheckpointEvery > 0 && done % options.CheckpointEvery == 0 && done < options.Steps)
            {
                SaveCheckpoint();
            }
        }
        return new TrainResult(StepsDone, lastLoss, evalLoss, totalTokens / Math.Max(1e-9, trainClock.Elapsed.TotalSeconds), MemoryProbe.PeakBytes, clock.Elapsed);
    }

    /// <summary>The seed of the process-wide generator at the start of step <paramref name="step"/> (0-based) of a run seeded <paramref name="seed"/>.</summary>
    public static long DropoutSeed(int seed, int step) => unchecked(((long)seed << 32) ^ (step * 0x9E3779B1L) ^ 0x5DEECE66DL);

    /// <summary>
    /// One optimizer step over <paramref name="microBatches"/>: the loss of each is its token losses' sum
    /// divided by the counted tokens of the whole step (so accumulation equals one large batch), scaled for
    /// fp16; then the global gradient norm (which also detects overflow), clipping, the update and the copy
    /// of fp32 masters into the compute weights. An overflowing step is skipped.
    /// </summary>
    public StepResult Step(IReadOnlyList<TrainingBatch> microBatches)
    {
        if (HostOptimizer is { } host)
        {
            return HostStep(microBatches, host);
        }
        using var step = StepScope.Begin(trimHeap: true);
        precision.ZeroGradients();
        sharding?.ZeroGradients();
        MemoryTrace.Mark("start");
        // Under FSDP every rank divides by the tokens of the whole global step and gradients are summed over ranks, so a
        // step equals one rank's step over the concatenated batches even when ranks count different numbers of labels.
        long labels = microBatches.Sum(b => b.LabelCount);
        double counted = Math.Max(1, sharding?.SumOverRanks(labels) ?? labels);
        double loss = 0;
        foreach (var batch in microBatches)
        {
            var micro = LossSum(batch) / counted;
            MemoryTrace.Mark("forward");
            precision.ScaleLoss(micro).backward();
            MemoryTrace.Mark("backward");
            precision.AccumulateGradients();
            // Per micro-batch, so the root's gradients accumulate in the fp32 shard, not in 16-bit parameter gradients.
            sharding?.FinishBackward();
            loss += micro.item<float>();
        }
        if (sharding is not null)
        {
            loss = sharding.SumOverRanks(loss);
        }
        double norm = sharding?.GradientNorm(precision.Unscale) ?? precision.GradientNorm();
        MemoryTrace.Mark("norm");
        bool overflow = double.IsNaN(norm) || double.IsInfinity(norm);
        if (!overflow)
        {
            // clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when that is below 1.
            double clip = options.GradClip > 0 ? Math.Min(1.0, options.GradClip / (norm + 1e-6)) : 1.0;
            long started = Stopwatch.GetTimestamp();
            Optimizer.Step(precision.Unscale * clip);
            MemoryTrace.Mark("optimizer");
            precision.SyncWeights();
            optimizerTime += Stopwatch.GetElapsedTime(started);
            OptimizerSteps++;
            sharding?.SyncWeights();
        }
        precision.Scaler?.Update(overflow);
        precision.ZeroGradients(); // no gradient memory through evaluation, samples and checkpoints between steps
        sharding?.ZeroGradients();
        return new StepResult(loss, norm, overflow);
    }

    // Step() with the host optimizer. Overlapped, the last micro-batch's forward and backward run inside the host step
    // (marks are placed in forward, fire in backward), and its 16-bit gradients are not moved into the fp32 accumulators:
    // the host kernel adds the two as it reads them. The reported norm is then the kernel's own sum (no clipping reads
    // it). Not overlapped, the step is the in-memory one with the host kernel in place of libtorch's ops.
    private StepResult HostStep(IReadOnlyList<TrainingBatch> microBatches, HostOptimizer host)
    {
        using var step = StepScope.Begin(trimHeap: true);
        precision.ZeroGradients();
        MemoryTrace.Mark("start");
        double counted = Math.Max(1, microBatches.Sum(b => b.LabelCount));
        bool overlap = OverlapsOptimizer;
        double loss = 0;
        for (int i = 0; i < microBatches.Count; i++)
        {
            bool last = i == microBatches.Count - 1;
            using (last && overlap ? host.BeginOverlapped(precision.Unscale) : null)
            {
                var micro = LossSum(microBatches[i]) / counted;
                MemoryTrace.Mark("forward");
                precision.ScaleLoss(micro).backward();
                MemoryTrace.Mark("backward");
                loss += micro.item<float>();
            }
            if (!(last && overlap))
            {
                precision.AccumulateGradients();
            }
        }
        double norm;
        bool overflow = false;
        if (overlap)
        {
            norm = host.Finish() * precision.Unscale;
            MemoryTrace.Mark("optimizer");
        }
        else
        {
            norm = precision.GradientNorm();
            MemoryTrace.Mark("norm");
            overflow = double.IsNaN(norm) || double.IsInfinity(norm);
            if (!overflow)
            {
                double clip = options.GradClip > 0 ? Math.Min(1.0, options.GradClip / (norm + 1e-6)) : 1.0;
                host.Step(precision.Unscale * clip);
                MemoryTrace.Mark("optimizer");
            }
        }
        precision.Scaler?.Update(overflow);
        precision.ZeroGradients();
        return new StepResult(loss, norm, overflow);
    }

    /// <summary>Mean next-token loss per counted token over held-out batches (at most <paramref name="maxBatches"/>; 0 = all).</summary>
    public double Evaluate(int maxBatches = 0)
    {
        var (loss, _) = Evaluation.MeanLoss(model, data.EvalBatches(options.MicroBatch), options.LossChunk, maxBatches);
        return loss;
    }

    /// <summary>Sum of next-token losses over the counted positions of <paramref name="batch"/>.</summary>
    public Tensor LossSum(TrainingBatch batch) => Evaluation.LossSum(model, batch, options.LossChunk);

    private static TrainingBatch RowsOf(TrainingBatch batch, int first, int rows)
    {
        int start = first * batch.Columns, length = rows * batch.Columns;
        return new TrainingBatch(batch.Inputs.AsSpan(start, length).ToArray(), batch.Labels.AsSpan(start, length).ToArray(), rows, batch.Columns);
    }

    private static List<TrainingBatch> Take(IEnumerator<TrainingBatch> batches, int count)
    {
        var result = new List<TrainingBatch>(count);
        for (int i = 0; i < count; i++)
        {
            batches.MoveNext();
            result.Add(batches.Current);
        }
        return result;
    }

    // An endless stream from the current data position; the position advances as batches are taken. Under FSDP the
    // stream is of global batches (micro-batch x world size, the same order on every rank) and rank r takes rows
    // [r x micro-batch, (r + 1) x micro-batch) of each, so N ranks see exactly the samples one rank sees with N times the batch.
    private IEnumerable<TrainingBatch> Batches()
    {
        var (epoch, skip) = DataPosition;
        int world = sharding?.Collectives.WorldSize ?? 1;
        int rank = sharding?.Collectives.Rank ?? 0;
        for (; ; epoch++, skip = 0)
        {
            int index = 0;
            foreach (var batch in data.TrainBatches(options.MicroBatch * world, options.Seed, epoch))
            {
                if (index++ < skip)
                {
                    continue;
                }
                DataPosition = (epoch, index);
                yield return world == 1 ? batch : RowsOf(batch, rank * options.MicroBatch, options.MicroBatch);
            }
            if (index == 0)
            {
                throw new DataException($"the data has {data.TrainSequences} training sequences: fewer than one batch of {options.MicroBatch * world}");
            }
        }
    }
}
