using System.Diagnostics;
using FrugalLM.Distributed;
using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using FrugalLM.Sharding;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Cli.Bench;

/// <summary>
/// Runs one <see cref="BenchCase"/> in this process, the way <c>frugal train</c> and <c>frugal generate</c> run
/// a plan: the data first, then the runtime baseline, then the weights (read from a folder, quantized while
/// loading), the plan's techniques, warm-up steps and timed steps. Memory is measured as the peer measures it:
/// VmHWM reset at the baseline and read after the last step; and also the peak of the timed steps alone over
/// the resident set they start from (model states in place), which isolates activations and temporaries.
/// </summary>
internal static class BenchChild
{
    public static (BenchMeasurement Measurement, MemoryEstimate Estimate) Run(BenchCase c)
    {
        TorchRuntime.Initialize(c.Threads);
        using var checkpoint = HfCheckpoint.Open(c.Weights);
        var plan = c.Plan(checkpoint.Spec(c.Model), Offload.DiskOffload.Policy(checkpoint));
        plan.Validate();
        return c.Mode == "train" ? Train(c, checkpoint, plan) : Generate(c, checkpoint, plan);
    }

    private static (BenchMeasurement, MemoryEstimate) Train(BenchCase c, HfCheckpoint checkpoint, RunPlan plan)
    {
        int steps = c.Warmup + c.Steps;
        var random = new Random(c.Seed);
        int vocab = plan.Model.VocabSize;
        // Enough blocks for every step even after the corpus holds out one block in fifty.
        int blocks = steps * c.Batch * 51 / 50 + 2;
        var tokens = new int[blocks * (c.Seq + 1)];
        for (int i = 0; i < tokens.Length; i++)
        {
            tokens[i] = random.Next(vocab);
        }
        var corpus = TokenCorpus.FromTokens(tokens, c.Seq);
        var batches = corpus.TrainBatches(c.Batch, c.Seed, 0).Take(steps).ToList();

        var report = MemoryReport.Predict(plan);
        long baseline = report.Plan.Overhead.RuntimeBaselineBytes;
        MemoryProbe.ResetPeak();
        // A streamed base is created in its compute dtype with the streamed layers never loaded, as frugal train does.
        using var model = checkpoint.CreateModel(InferenceModel.TrainingLoadDtype(plan), Int8(plan), Streamed(plan));
        using var applied = Techniques.Apply(model, plan, c.Seed, weights: checkpoint);
        // FSDP last, as frugal train wraps it; every rank runs the same batches (the measure is one rank's memory and speed).
        using var collectives = plan.Sharding.Strategy == ShardingStrategy.None ? null : Collectives.Create();
        if (collectives is not null && collectives.WorldSize != c.Ranks)
        {
            throw new InvalidOperationException($"the case asks for {c.Ranks} ranks but runs on {collectives.WorldSize}");
        }
        using var sharded = collectives is null ? null : Fsdp.Wrap(model, collectives, plan.Sharding.Strategy, applied.Precision);
        var trainer = new Trainer(model, corpus, new TrainOptions
        {
            Steps = steps,
            MicroBatch = c.Batch,
            LossChunk = c.LossChunk,
            Optimizer = plan.Optimizer,
            LearningRate = 1e-4,
            WeightDecay = 0.1,
            GradClip = 1.0,
            Seed = c.Seed,
            OptimizerOnHost = plan.Offload.StepsOnHost,
        }, applied.Precision, sharded);
        model.train();
        var seconds = new List<double>();
        var losses = new List<double>();
        var phase = new PeakPhases();
        for (int i = 0; i < steps; i++)
        {
            if (i == c.Warmup)
            {
                phase.StartTimedSteps();
            }
            var clock = Stopwatch.StartNew();
            var result = trainer.Step([batches[i]]);
            clock.Stop();
            losses.Add(result.Loss);
            if (i >= c.Warmup)
            {
                seconds.Add(clock.Elapsed.TotalSeconds);
            }
        }
        phase.End();
        var measurement = phase.Measurement(baseline) with
        {
            TokensPerSecond = c.Batch * (double)c.Seq / Median(seconds),
            StepSeconds = seconds,
            LossFirst = losses[0],
            LossLast = losses[^1],
            Parameters = model.parameters().Sum(p => p.numel()) + Int8Weights(model),
            TrainableParameters = trainer.Optimizer.Groups.Sum(g => g.Parameters.Sum(p => p.Parameter.numel())),
            OptimizerStateBytes = trainer.Optimizer.StateBytes,
        };
        return (measurement, report.Estimate);
    }

    private static (BenchMeasurement, MemoryEstimate) Generate(BenchCase c, HfCheckpoint checkpoint, RunPlan plan)
    {
        var random = new Random(c.Seed);
        var prompt = Enumerable.Range(0, c.PromptTokens).Select(_ => random.Next(plan.Model.VocabSize)).ToArray();
        var report = MemoryReport.Predict(plan);
        long baseline = report.Plan.Overhead.RuntimeBaselineBytes;
        MemoryProbe.ResetPeak();
        MemoryTrace.Mark("baseline", resetPeak: false);
        using var model = checkpoint.CreateModel(InferenceModel.WeightDtype(plan.Precision), Int8(plan), Streamed(plan));
        MemoryTrace.Mark("loaded", resetPeak: false);
        using var applied = Techniques.Apply(model, plan, weights: checkpoint);
        MemoryTrace.Mark("applied", resetPeak: false);
        model.eval();
        // Greedy, never stopping early: every generation has exactly NewTokens tokens, as the peer's.
        var options = new SamplingOptions { MaxNewTokens = c.NewTokens, Temperature = 0, StopTokenIds = [] };
        var prefill = new List<double>();
        var decode = new List<double>();
        var phase = new PeakPhases();
        for (int i = 0; i < c.Warmup + c.Steps; i++)
        {
            if (i == c.Warmup)
            {
                phase.StartTimedSteps();
            }
            var clock = Stopwatch.StartNew();
            double first = 0;
            int produced = 0;
            foreach (var _ in new TokenGenerator(model).Generate(prompt, options))
            {
                if (produced++ == 0)
                {
                    first = clock.Elapsed.TotalSeconds;
                }
            }
            double total = clock.Elapsed.TotalSeconds;
            MemoryTrace.Mark("generated", resetPeak: false);
            if (produced != c.NewTokens)
            {
                throw new InvalidOperationException($"generated {produced} tokens, expected {c.NewTokens}");
            }
            if (i >= c.Warmup)
            {
                prefill.Add(first);
                decode.Add(total - first);
            }
        }
        phase.End();
        var measurement = phase.Measurement(baseline) with
        {
            PrefillTokensPerSecond = c.PromptTokens / Median(prefill),
            DecodeTokensPerSecond = (c.NewTokens - 1) / Median(decode),
            StepSeconds = prefill.Zip(decode, (p, d) => p + d).ToList(),
            Parameters = model.parameters().Sum(p => p.numel()) + Int8Weights(model),
        };
        return (measurement, report.Estimate);
    }

    private static Func<string, bool>? Streamed(RunPlan plan) => plan.StreamsWeights ? Offload.DiskOffload.Streamed(plan.Offload.ResidentLayers) : null;

    private static Int8Options? Int8(RunPlan plan) => plan.Quantization.Kind == QuantizationKind.Int8
        ? new Int8Options { Threshold = plan.Quantization.OutlierThreshold, Skip = plan.Quantization.SkipModules }
        : null;

    // int8 weights are buffers, not parameters: count them so both runtimes report the model's size.
    private static long Int8Weights(Models.CausalLM model) =>
        model.modules().OfType<Int8Linear>().Sum(l => l.InFeatures * (long)l.OutFeatures);

    /// <summary>
    /// The run's peak since the baseline reset, split at the first timed step: the peak so far is kept, VmHWM
    /// is reset to the steady resident set (every persistent state allocated by the warm-up), and the timed
    /// steps' own peak is read at the end. The run's peak is the larger of the two.
    /// </summary>
    private sealed class PeakPhases
    {
        private long warmupPeak;

        public long Steady { get; private set; }

        public long StepPeak { get; private set; }

        public long Peak => Math.Max(warmupPeak, StepPeak);

        public void StartTimedSteps()
        {
            warmupPeak = MemoryProbe.PeakBytes;
            Steady = MemoryProbe.CurrentBytes;
            MemoryProbe.ResetPeak();
        }

        public void End() => StepPeak = MemoryProbe.PeakBytes;

        public BenchMeasurement Measurement(long baseline) => new()
        {
            Runtime = "frugal",
            BaselineBytes = baseline,
            PeakBytes = Peak,
            SteadyBytes = Steady,
            StepPeakBytes = StepPeak,
        };
    }

    internal static double Median(IReadOnlyList<double> values)
    {
        var sorted = values.Order().ToArray();
        return sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2;
    }
}
