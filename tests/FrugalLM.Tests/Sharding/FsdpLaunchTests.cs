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
        // Under FULL_SHARD the frozen base of every decoder layer is sharded too (the embedding, final norm and head stay
        // whole); SHARD_GRAD_OP keeps it whole.
        using (var model = new LlamaForCausalLM(TestSupport.TinyConfig() with { VocabSize = 50257 }))
        {
            long layers = model.named_parameters().Where(p => p.name.Contains(".layers.", StringComparison.Ordinal)).Sum(p => p.parameter.numel());
            var line = string.Create(CultureInfo.InvariantCulture, $"{layers:N0} frozen parameters of the decoder layers sharded");
            if (strategy == "full")
            {
                Assert.Contains(line, sharded.Stderr + sharded.Stdout);
            }
            else
            {
                Assert.DoesNotContain("frozen parameters of the decoder layers sharded", sharded.Stderr + sharded.Stdout);
            }
        }
        AssertSame(setup.Lora.Value, sharded, "adapter_model.safetensors");
    }

    [Fact]
    public void Bf16ComputeWith8BitAdamWStaysCloseToOneRank()
    {
        // Not reduction order only: bf16 rounds differently ordered sums to 8 bits, and 8-bit AdamW quantizes blocks of
        // the flat shards where one rank quantizes blocks of each tensor. Measured here: losses within 1.4e-4 over 10
        // steps (bf16 alone; 8-bit alone 4e-5); the bound is 2e-3, still far below what a wrong shard or slice gives.
        // Five steps keep the test short (bf16 matmuls of this tiny model are slow on this CPU).
        string[] options = ["--precision", "bf16", "--optimizer", "adamw8bit"];
        var one = setup.Train("bf16-8bit-one", ranks: 1, batch: 4, steps: 5, setup.FullTraining(), options);
        var two = setup.Train("bf16-8bit-two", ranks: 2, batch: 2, steps: 5, setup.FullTraining(), [.. options, "--fsdp", "full"]);
        Assert.Equal(5, two.Losses.Count);
        for (int i = 0; i < one.Losses.Count; i++)
        {
            Assert.True(Math.Abs(one.Losses[i] - two.Losses[i]) <= 2e-3, $"step {i + 1}: loss {two.Losses[i]:R} against {one.Losses[i]:R}");
        }
    }

    [Fact]
    public async Task AKilledRankEndsTheJobWithAnErrorNamingIt()
    {
        var output = Path.Combine(setup.Folder, "killed");
        using var launch = FrugalProcess.Start(["launch", "-n", "2", "--", "train", .. setup.FullTraining(), "--data", setup.DataFile, "--out", output,
            "--steps", "1000", "--batch", "2", "--seq", "32", "--log-every", "1", "--save-every", "2", "--fsdp", "full"]);
        var stderr = launch.StandardError.ReadToEndAsync();
        string? line;
        while ((line = await launch.StandardOutput.ReadLineAsync()) is not null && !line.Contains("step 3/", StringComparison.Ordinal))
        {
        }
        Assert.NotNull(line);
        var rest = launch.StandardOutput.ReadToEndAsync();
        // Rank 1 is the process whose environment says so (mpirun starts each rank with OMPI_COMM_WORLD_RANK).
        var victim = System.Diagnostics.Process.GetProcesses().Single(p => CommandLine(p.Id).Contains(output, StringComparison.Ordinal)
            && File.ReadAllText($"/proc/{p.Id}/environ").Split('\0').Contains("OMPI_COMM_WORLD_RANK=1"));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        victim.Kill();
        Assert.True(launch.WaitForExit(TimeSpan.FromSeconds(60)), "the job outlived its killed rank by 60 s");
        Assert.NotEqual(0, launch.ExitCode);
        Assert.Matches("rank 1 .*exited on signal 9", await stderr + await rest);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60));
        // The last save (every 2 steps, written atomically by rank 0) still loads.
        using var model = HfCheckpoint.LoadModel(output);
        Assert.Equal(50257, model.VocabSize);
    }

    private static string CommandLine(int pid)
    {
        try
        {
            return File.ReadAllText($"/proc/{pid}/cmdline");
        }
        catch (IOException)
        {
            return "";
        }
        catch (UnauthorizedAccessException)
        {
            return "";
        }
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

        public string Folder => dir.Path;

        public string DataFile { get; }

        public string BaseFolder { get; }

        public Lazy<Run> Plain { get; }

        public Lazy<Run> Lora { get; }

        public string[] FullTraining() => ["--config", ConfigFile, "--seed", "1"];

        public string[] LoraTraining() => ["--model", BaseFolder, "--tokenizer", "gpt2", "--lora-r", "4", "--lora-targets", "all-linear", "--lr", "1e-2", "--seed", "1"];

        /// <summary>Ten steps with a loss line per step, through <c>frugal launch</c> when <paramref name="ranks"/> &gt; 1.</summary>
        public Run Train(string name, int ranks, int batch, string[] model, params string[] extra) => Train(name, ranks, batch, 10, model, extra);

        /// <summary><paramref name="steps"/> steps with a loss line per step.</summary>
        public Run Train(string name, int ranks, int batch, int steps, string[] model, params string[] extra)
        {
            var output = Path.Combine(dir.Path, name);
            string[] train =
            [
                "train", .. model, "--data", DataFile, "--out", output, "--steps", steps.ToString(CultureInfo.InvariantCulture), "--batch", batch.ToString(CultureInfo.InvariantCulture),
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
