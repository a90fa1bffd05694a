using FrugalLM.IO;

namespace FrugalLM.Tests.Cli;

public sealed class TrainCommandTests
{
    [Fact]
    public void TrainsFromAConfigAndWritesAReloadableSelfContainedFolder()
    {
        using var dir = TestSupport.TempDir();
        var config = Path.Combine(dir.Path, "config.json");
        File.WriteAllText(config, (TestSupport.TinyConfig() with { VocabSize = 50257 }).ToJson().ToJsonString());
        var data = Path.Combine(dir.Path, "data.jsonl");
        var random = new Random(3);
        var words = new[] { "light", "earth", "water", "day", "night", "God", "said", "and", "the", "was" };
        File.WriteAllLines(data, Enumerable.Range(0, 60).Select(_ =>
            "{\"text\": \"" + string.Join(' ', Enumerable.Range(0, 40).Select(_ => words[random.Next(words.Length)])) + "\"}"));
        var output = Path.Combine(dir.Path, "out");
        var (exit, stdout, stderr) = FrugalProcess.Run("train", "--config", config, "--data", data, "--out", output,
            "--steps", "6", "--batch", "2", "--seq", "32", "--lr", "1e-3", "--log-every", "3", "--sample-prompt", "God said");
        Assert.True(exit == 0, stderr);
        Assert.Contains("sample before: God said", stdout);
        Assert.Contains("sample after: God said", stdout);
        Assert.Contains("held-out loss", stdout);
        foreach (var file in new[] { "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_log.jsonl" })
        {
            Assert.True(File.Exists(Path.Combine(output, file)), file);
        }
        using var model = HfCheckpoint.LoadModel(output);
        Assert.Equal(50257, model.VocabSize);
        var generated = FrugalProcess.Run("generate", "--model", output, "--prompt", "God", "--max-new-tokens", "5", "--temperature", "0");
        Assert.Equal(0, generated.Exit);
    }

    [Fact]
    public void BadArgumentsExitTwoWithAMessage()
    {
        using var dir = TestSupport.TempDir();
        var both = FrugalProcess.Run("train", "--data", "x", "--out", dir.Path, "--steps", "1");
        Assert.Equal(2, both.Exit);
        Assert.Contains("--model", both.Err);
        var missingData = FrugalProcess.Run("train", "--model", FrugalProcess.BundledModel, "--data", Path.Combine(dir.Path, "none.txt"), "--out", dir.Path, "--steps", "1");
        Assert.Equal(2, missingData.Exit);
        Assert.Contains("none.txt", missingData.Err);
    }
}

public sealed class TrainResumeCommandTests
{
    [Fact]
    public void KilledRunResumesToTheSameWeightsAsAnUninterruptedOne()
    {
        using var dir = TestSupport.TempDir();
        var config = Path.Combine(dir.Path, "config.json");
        File.WriteAllText(config, (TestSupport.TinyConfig() with { VocabSize = 50257 }).ToJson().ToJsonString());
        var data = Path.Combine(dir.Path, "data.txt");
        var random = new Random(9);
        File.WriteAllText(data, string.Join(' ', Enumerable.Range(0, 3000).Select(_ => random.Next(1000).ToString(System.Globalization.CultureInfo.InvariantCulture))));
        string[] Args(string output) =>
            ["train", "--config", config, "--data", data, "--out", output, "--steps", "6", "--batch", "2", "--seq", "32",
             "--precision", "bf16", "--grad-checkpointing", "--loss-chunk", "16", "--state-every", "3", "--log-every", "1"];
        var whole = Path.Combine(dir.Path, "whole");
        var first = FrugalProcess.Run(Args(whole));
        Assert.True(first.Exit == 0, first.Err);

        // Kill the second run as soon as its step-3 checkpoint exists (or let it end: either way only the
        // checkpoint is used), then resume.
        var killed = Path.Combine(dir.Path, "killed");
        FrugalProcess.RunUntilFileExists(Path.Combine(killed, "checkpoints", "step-000003", "state.json"), Args(killed));
        File.Delete(Path.Combine(killed, "model.safetensors"));
        var resumed = FrugalProcess.Run([.. Args(killed), "--resume"]);
        Assert.True(resumed.Exit == 0, resumed.Err);
        Assert.Contains("resumed from", resumed.Err);
        Assert.Equal(File.ReadAllBytes(Path.Combine(whole, "model.safetensors")), File.ReadAllBytes(Path.Combine(killed, "model.safetensors")));
        Assert.True(File.Exists(Path.Combine(whole, "loss.png")));
    }
}

public sealed class CollectiveTimeoutOptionTests
{
    [Theory]
    [InlineData("90s", 90.0)]
    [InlineData("5m", 300.0)]
    [InlineData("500ms", 0.5)]
    [InlineData("2h", 7200.0)]
    [InlineData("45", 45.0)]
    public void DurationsParse(string text, double seconds) =>
        Assert.Equal(TimeSpan.FromSeconds(seconds), FrugalLM.Cli.Commands.TrainCommand.ParseDuration(text, "--collective-timeout"));

    [Fact]
    public void ZeroMeansNoLimitAndNonsenseIsRefused()
    {
        Assert.Equal(Timeout.InfiniteTimeSpan, FrugalLM.Cli.Commands.TrainCommand.ParseDuration("0", "--collective-timeout"));
        var error = Assert.Throws<ArgumentException>(() => FrugalLM.Cli.Commands.TrainCommand.ParseDuration("soon", "--collective-timeout"));
        Assert.Contains("--collective-timeout", error.Message);
        Assert.Throws<ArgumentException>(() => FrugalLM.Cli.Commands.TrainCommand.ParseDuration("-3s", "--collective-timeout"));
    }
}
