using System.Globalization;
using System.Text.Json;
using FrugalLM.IO;
using FrugalLM.Models.Llama;
using FrugalLM.Tests.Cli;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Sharding;

/// <summary>
/// <c>frugal launch -n 2 -- train --fsdp ...</c> against one process: 2 ranks x micro-batch 2 must see the samples of
/// 1 rank x micro-batch 4 and train to the same per-step losses and final weights, for FULL_SHARD and SHARD_GRAD_OP,
/// with and without LoRA. Needs <c>mpirun</c> (openmpi-bin): without it these tests fail, never skip.
/// </summary>
/// <remarks>
/// The tolerance is fp32 reduction order, nothing more: the two runs do the same arithmetic on the same samples but sum
/// in different orders (each rank's matmuls see 2 rows instead of 4; gradients are summed over ranks by the ring
/// reduce-scatter; the gradient norm is summed over flat shards in float64 then all-reduced). Measured here (10 steps,
/// tiny LLaMA): losses agree to 1.9e-6 absolute (2 fp32 ulps at 10.4); full training's tensors to a norm-wise relative
/// error of 3.6e-7; LoRA's adapters to 1.7e-5 (lr 1e-2: AdamW divides each gradient element by its own RMS, so an
/// element whose gradient is a nearly cancelling sum, where rounding is a large part of the result, still takes a
/// full-size step). The bounds, 2e-5 on losses and 1e-4 per tensor, leave a factor of about 6-10 for other BLAS builds,
/// while a real mistake (a rank training on the wrong slice, gradients averaged twice, a wrong shard offset, clipping by
/// a local norm) moves losses by 1e-3 or more and weights by percent.
/// </remarks>
public sealed class FsdpLaunchTests(FsdpLaunchTests.Setup setup) : IClassFixture<FsdpLaunchTests.Setup>
{
    private const double LossTolerance = 2e-5;
    private const double WeightTolerance = 1e-4;

    [Theory]
    [InlineData("full")]
    [InlineData("grad-op")]
    public void TwoRanksMatchOneRankWithTwiceTheBatch(string strategy)
    {
        var sharded = setup.Train($"full-{strategy}", ranks: 2, batch: 2, setup.FullTraining(), "--fsdp", strategy);
        AssertSame(setup.Plain.Value, sharded, "model.safetensors");
    }

    [Theory]
    [InlineData("full")]
    [InlineData("grad-op")]
    public void TwoRanksMatchOneRankWithLora(string strategy)
    {
        var sharded = setup.Train($"lora-{strategy}", ranks: 2, batch: 2, setup.LoraTraining(), "--fsdp", strategy);
        Assert.Contains("trainable parameters", sharded.Stderr + sharded.Stdout);
        AssertSame(setup.Lora.Value, sharded, "adapter_model.safetensors");
    }

    private static void AssertSame(Setup.Run expected, Setup.Run actual, string weights)
    {
        Assert.Equal(10, expected.Losses.Count);
        Assert.Equal(expected.Losses.Count, actual.Losses.Count);
        for (int i = 0; i < expected.Losses.Count; i++)
        {
            Assert.True(Math.Abs(expected.Losses[i] - actual.Losses[i]) <= LossTolerance,
                $"step {i + 1}: loss {actual.Losses[i]:R} against {expected.Losses[i]:R}");
        }
        using var a = SafeTensorsFile.Open(Path.Combine(expected.Folder, weights));
        using var b = SafeTensorsFile.Open(Path.Combine(actual.Folder, weights));
        Assert.Equal(a.Tensors.Keys.Order(), b.Tensors.Keys.Order());
        foreach (var name in a.Tensors.Keys)
        {
            using var scope = NewDisposeScope();
            double error = TensorAssert.RelativeError(b.Load(name), a.Load(name));
            Assert.True(error <= WeightTolerance, $"{name}: relative error {error:E2}");
        }
        // Only rank 0 prints progress: one line per step.
        Assert.Equal(10, actual.Stdout.Split('\n').Count(l => l.StartsWith("step ", StringComparison.Ordinal)));
        Assert.Contains("fsdp peak memory per rank: rank 0 ", actual.Stderr);
    }

    /// <summary>The data, a tiny base model and the single-process reference runs, shared by the tests.</summary>
    public sealed class Setup : IDisposable
    {
        private readonly TempDir dir = TestSupport.TempDir();

        public Setup()
        {
            TestSupport.Init();
            var config = TestSupport.TinyConfig() with { VocabSize = 50257 };
            ConfigFile = Path.Combine(dir.Path, "config.json");
            File.WriteAllText(ConfigFile, config.ToJson().ToJsonString());
            DataFile = Path.Combine(dir.Path, "data.jsonl");
            var random = new Random(3);
            var words = new[] { "light", "earth", "water", "day", "night", "God", "said", "and", "the", "was" };
            File.WriteAllLines(DataFile, Enumerable.Range(0, 60).Select(_ =>
                "{\"text\": \"" + string.Join(' ', Enumerable.Range(0, 40).Select(_ => words[random.Next(words.Length)])) + "\"}"));
            BaseFolder = Path.Combine(dir.Path, "base");
            using (var model = new LlamaForCausalLM(config))
            {
                model.InitializeWeights(seed: 5);
                HfCheckpoint.Save(model, BaseFolder);
            }
            Plain = new Lazy<Run>(() => Train("plain", ranks: 1, batch: 4, FullTraining()));
            Lora = new Lazy<Run>(() => Train("lora", ranks: 1, batch: 4, LoraTraining()));
        }

        public string ConfigFile { get; }

        public string DataFile { get; }

        public string BaseFolder { get; }

        public Lazy<Run> Plain { get; }

        public Lazy<Run> Lora { get; }

        public string[] FullTraining() => ["--config", ConfigFile, "--seed", "1"];

        public string[] LoraTraining() => ["--model", BaseFolder, "--tokenizer", "gpt2", "--lora-r", "4", "--lora-targets", "all-linear", "--lr", "1e-2", "--seed", "1"];

        /// <summary>Ten steps with a loss line per step, through <c>frugal launch</c> when <paramref name="ranks"/> &gt; 1.</summary>
        public Run Train(string name, int ranks, int batch, string[] model, params string[] extra)
        {
            var output = Path.Combine(dir.Path, name);
            string[] train =
            [
                "train", .. model, "--data", DataFile, "--out", output, "--steps", "10", "--batch", batch.ToString(CultureInfo.InvariantCulture),
                "--seq", "32", "--log-every", "1", .. extra,
            ];
            string[] args = ranks == 1 ? train : ["launch", "-n", ranks.ToString(CultureInfo.InvariantCulture), "--", .. train];
            var (exit, stdout, stderr) = FrugalProcess.Run(args);
            Assert.True(exit == 0, $"exit {exit}\n{stdout}\n{stderr}");
            var losses = File.ReadLines(Path.Combine(output, "train_log.jsonl"))
                .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("Loss").GetDouble()).ToList();
            return new Run(output, losses, stdout, stderr);
        }

        public void Dispose() => dir.Dispose();

        /// <summary>One finished run.</summary>
        public sealed record Run(string Folder, IReadOnlyList<double> Losses, string Stdout, string Stderr);
    }
}
