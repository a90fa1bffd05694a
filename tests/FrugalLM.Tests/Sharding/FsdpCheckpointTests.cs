using System.Diagnostics;
using System.Text.Json;
using FrugalLM.Distributed;
using FrugalLM.IO;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Sharding;
using FrugalLM.Tests.Cli;
using FrugalLM.Training;

namespace FrugalLM.Tests.Sharding;

/// <summary>
/// Sharded resumable checkpoints, <c>frugal checkpoint consolidate</c> and the collective timeout, through
/// <c>frugal launch -n 2</c> (needs <c>mpirun</c>; without it these fail, never skip). A run is stopped
/// deterministically after its step-3 save and checkpoint by the hidden hook that makes rank 1 hang before step 4
/// (FRUGAL_TEST_HANG_RANK/STEP), with a 5 s collective timeout.
/// </summary>
public sealed class FsdpCheckpointTests(FsdpLaunchTests.Setup setup) : IClassFixture<FsdpLaunchTests.Setup>
{
    private static readonly Dictionary<string, string> HangBeforeStep4 = new()
    {
        ["FRUGAL_TEST_HANG_RANK"] = "1",
        ["FRUGAL_TEST_HANG_STEP"] = "4",
    };

    private string[] Launch(string output, string[] model, params string[] extra) =>
    [
        "launch", "-n", "2", "--", "train", .. model, "--data", setup.DataFile, "--out", output, "--steps", "6", "--batch", "2", "--seq", "32",
        "--log-every", "1", "--state-every", "3", .. extra,
    ];

    [Fact]
    public void AKilledTwoRankRunResumesToTheSameWeightsAndLossesAsAnUninterruptedOne()
    {
        // 8-bit AdamW: its block-wise codes and absmax scales are part of each rank's file.
        string[] Args(string output) => Launch(output, setup.FullTraining(), "--optimizer", "adamw8bit", "--fsdp", "full");
        var whole = Path.Combine(setup.Folder, "resume-whole");
        var first = FrugalProcess.Run(Args(whole));
        Assert.True(first.Exit == 0, first.Out + first.Err);
        var checkpoint = Path.Combine(whole, "checkpoints", "step-000003");
        Assert.True(File.Exists(Path.Combine(checkpoint, ShardedCheckpoint.IndexFile)));
        Assert.True(File.Exists(Path.Combine(checkpoint, "rank-00000-of-00002.safetensors")));
        Assert.True(File.Exists(Path.Combine(checkpoint, "rank-00001-of-00002.safetensors")));

        // Kill the whole job (launch, mpirun, both ranks) once the step-3 checkpoint is complete, or let it end: either
        // way only the checkpoint is used.
        var killed = Path.Combine(setup.Folder, "resume-killed");
        FrugalProcess.RunUntilFileExists(Path.Combine(killed, "checkpoints", "step-000003", ShardedCheckpoint.IndexFile), Args(killed));
        File.Delete(Path.Combine(killed, "model.safetensors"));
        var resumed = FrugalProcess.Run([.. Args(killed), "--resume"]);
        Assert.True(resumed.Exit == 0, resumed.Out + resumed.Err);
        Assert.Contains("resumed from", resumed.Err);
        Assert.Equal(File.ReadAllBytes(Path.Combine(whole, "model.safetensors")), File.ReadAllBytes(Path.Combine(killed, "model.safetensors")));
        // The resumed run's steps 4-6 (the last three lines it appended) have exactly the uninterrupted run's losses.
        var expected = Losses(whole);
        var got = Losses(killed);
        Assert.Equal(6, expected.Count);
        Assert.Equal(expected.TakeLast(3), got.TakeLast(3));

        // One rank cannot take over two ranks' shards: the error says how to go on.
        var one = FrugalProcess.Run([.. Args(whole)[4..], "--resume"]);
        Assert.Equal(2, one.Exit);
        Assert.Contains("written by 2 rank(s) and cannot be resumed by 1", one.Err);
        Assert.Contains("frugal checkpoint consolidate", one.Err);
    }

    [Fact]
    public void AHungRankEndsTheJobNamingTheCollectiveAndItsLastCheckpointConsolidatesToRankZerosSave()
    {
        var output = Path.Combine(setup.Folder, "hung");
        var clock = Stopwatch.StartNew();
        var run = FrugalProcess.RunWith(HangBeforeStep4,
            Launch(output, setup.FullTraining(), "--save-every", "3", "--collective-timeout", "5s", "--fsdp", "full"));
        clock.Stop();
        Assert.NotEqual(0, run.Exit);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"the job outlived its hung rank: {clock.Elapsed}");
        // Rank 0's first collective of step 4 is the all-reduce of the step's token count.
        Assert.Matches("collective timeout: all-reduce .*did not complete within 5 s on rank 0 of 2: rank 1 did not arrive", run.Err + run.Out);

        var consolidated = Path.Combine(setup.Folder, "hung-consolidated");
        var result = FrugalProcess.Run("checkpoint", "consolidate", Path.Combine(output, "checkpoints", "step-000003"), "--out", consolidated);
        Assert.True(result.Exit == 0, result.Out + result.Err);
        // Bitwise: the same fp32 masters as rank 0 gathered for its step-3 save, written by the same writer.
        Assert.Equal(File.ReadAllBytes(Path.Combine(output, "model.safetensors")), File.ReadAllBytes(Path.Combine(consolidated, "model.safetensors")));
        Assert.Equal(File.ReadAllText(Path.Combine(output, "config.json")), File.ReadAllText(Path.Combine(consolidated, "config.json")));
        Assert.True(File.Exists(Path.Combine(consolidated, "tokenizer.json")));
        using var model = HfCheckpoint.LoadModel(consolidated);
        Assert.Equal(50257, model.VocabSize);
    }

    [Fact]
    public void ALoraRunsCheckpointConsolidatesToTheAdapterRankZeroSaves()
    {
        var output = Path.Combine(setup.Folder, "lora-hung");
        var run = FrugalProcess.RunWith(HangBeforeStep4,
            Launch(output, setup.LoraTraining(), "--save-every", "3", "--collective-timeout", "5s", "--fsdp", "grad-op"));
        Assert.NotEqual(0, run.Exit);
        var consolidated = Path.Combine(setup.Folder, "lora-consolidated");
        // The run folder works too: its newest complete checkpoint is taken.
        var result = FrugalProcess.Run("checkpoint", "consolidate", output, "--out", consolidated);
        Assert.True(result.Exit == 0, result.Out + result.Err);
        Assert.Contains("step-000003", result.Out);
        Assert.Equal(File.ReadAllBytes(Path.Combine(output, "adapter_model.safetensors")), File.ReadAllBytes(Path.Combine(consolidated, "adapter_model.safetensors")));
        Assert.Equal(File.ReadAllText(Path.Combine(output, "adapter_config.json")), File.ReadAllText(Path.Combine(consolidated, "adapter_config.json")));
    }

    private static List<double> Losses(string folder) =>
        File.ReadLines(Path.Combine(folder, "train_log.jsonl")).Select(l => JsonDocument.Parse(l).RootElement.GetProperty("Loss").GetDouble()).ToList();
}

/// <summary>Sharded checkpoints in one process (world size 1): completeness and the round trip.</summary>
public sealed class ShardedCheckpointTests
{
    public ShardedCheckpointTests() => TestSupport.Init();

    // With LoRA, FULL_SHARD also shards the layers' frozen base: its vectors are left out of the checkpoint (the base
    // comes from the model again on resume), and resuming must still continue exactly.
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ACheckpointWithoutItsIndexIsIgnoredAndResumingContinuesExactly(bool lora)
    {
        using var dir = TestSupport.TempDir();
        var random = new Random(5);
        var corpus = TokenCorpus.FromTokens(Enumerable.Range(0, 40 * 17).Select(_ => random.Next(101)).ToArray(), 16);
        var folder = Path.Combine(dir.Path, "checkpoints");
        var options = new TrainOptions { Steps = 4, MicroBatch = 2, LearningRate = 3e-3, LogEvery = 1, CheckpointEvery = 1, CheckpointFolder = folder };

        List<double> Train(bool resume, out string? resumedFrom)
        {
            using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
            model.InitializeWeights(seed: 3);
            if (lora)
            {
                FrugalLM.Lora.LoraModel.Apply(model, new FrugalLM.Lora.LoraConfig { Rank = 4, Alpha = 8, Targets = FrugalLM.Lora.LoraTargets.AllLinear }, seed: 4);
            }
            using var collectives = new SingleProcessCollectives();
            using var sharded = Fsdp.Wrap(model, collectives, ShardingStrategy.FullShard);
            Assert.Equal(lora, sharded.FrozenCount > 0);
            var trainer = new Trainer(model, corpus, options, sharding: sharded);
            resumedFrom = resume ? trainer.Resume() : null;
            var losses = new List<double>();
            trainer.Run(p => losses.Add(p.Loss));
            return losses;
        }

        var whole = Train(resume: false, out _);
        Assert.Equal(["step-000002", "step-000003"], Directory.GetDirectories(folder).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        // A newer folder whose index is missing (rank 0 died before writing it) is incomplete: never resumed from.
        var incomplete = Path.Combine(folder, "step-000009");
        Directory.CreateDirectory(incomplete);
        File.Copy(Path.Combine(folder, "step-000003", ShardedCheckpoint.RankFile(0, 1)), Path.Combine(incomplete, ShardedCheckpoint.RankFile(0, 1)));
        Assert.Equal(Path.Combine(folder, "step-000003"), ShardedCheckpoint.Latest(folder));
        var error = Assert.Throws<CheckpointFormatException>(() => ShardedCheckpoint.ReadIndex(incomplete));
        Assert.Contains("incomplete", error.Message);
        var vectors = ShardedCheckpoint.ReadIndex(Path.Combine(folder, "step-000003"))["vectors"]!.AsArray().Select(v => v!["name"]!.GetValue<string>()).ToList();
        Assert.NotEmpty(vectors);
        Assert.DoesNotContain(vectors, v => v.Contains("/frozen", StringComparison.Ordinal));

        var resumed = Train(resume: true, out var from);
        Assert.Equal(Path.Combine(folder, "step-000003"), from);
        Assert.Equal(whole[^1], Assert.Single(resumed));
    }
}
