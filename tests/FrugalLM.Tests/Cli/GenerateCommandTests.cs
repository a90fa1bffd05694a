namespace FrugalLM.Tests.Cli;

public sealed class GenerateCommandTests
{
    [Fact]
    public void SameSeedPrintsTheSameTextAndTemperatureZeroIsGreedy()
    {
        string[] args = ["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "30", "--seed", "7"];
        var first = FrugalProcess.Run(args);
        var second = FrugalProcess.Run(args);
        Assert.Equal(0, first.Exit);
        Assert.StartsWith("And God said", first.Out);
        Assert.True(first.Out.Length > "And God said".Length + 20, first.Out);
        Assert.Equal(first.Out, second.Out);
        var otherSeed = FrugalProcess.Run(["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "30", "--seed", "8"]);
        Assert.NotEqual(first.Out, otherSeed.Out);

        var zero = FrugalProcess.Run(["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "30", "--temperature", "0", "--seed", "1"]);
        var greedy = FrugalProcess.Run(["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "30", "--top-k", "1", "--seed", "2"]);
        Assert.Equal(0, zero.Exit);
        Assert.Equal(zero.Out, greedy.Out);
        Assert.Contains("decode", zero.Err);
    }

    [Fact]
    public void StopStringEndsTheOutputBeforeIt()
    {
        var free = FrugalProcess.Run(["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "40", "--temperature", "0"]);
        var continuation = free.Out["And God said".Length..].TrimEnd('\n');
        var stop = continuation.Trim().Split(' ')[2];
        var stopped = FrugalProcess.Run(["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "40", "--temperature", "0", "--stop", stop]);
        Assert.Equal(0, stopped.Exit);
        Assert.Equal("And God said" + continuation[..continuation.IndexOf(stop, StringComparison.Ordinal)], stopped.Out.TrimEnd('\n'));
        Assert.Contains("stop: stop-string", stopped.Err);
    }

    [Fact]
    public void DeviceCudaSaysWhatIsMissingInsteadOfRunningOnTheCpu()
    {
        var (exit, stdout, stderr) = FrugalProcess.Run("generate", "--model", FrugalProcess.BundledModel, "--prompt", "x", "--device", "cuda");
        Assert.Equal(2, exit);
        Assert.Equal("", stdout);
        // Here: libtorch's CPU package. On a CUDA build: the runtime does not place models on CUDA yet. Either way, named.
        Assert.Contains("--device cuda: CUDA is", stderr, StringComparison.Ordinal);
        Assert.Contains("expected cpu or cuda", FrugalProcess.Run("generate", "--model", FrugalProcess.BundledModel, "--device", "tpu").Err, StringComparison.Ordinal);
    }

    [Fact]
    public void TruncatedWeightsExitTwoNamingTheFile()
    {
        using var dir = TestSupport.TempDir();
        foreach (var file in Directory.EnumerateFiles(FrugalProcess.BundledModel))
        {
            File.Copy(file, Path.Combine(dir.Path, Path.GetFileName(file)));
        }
        var weights = Path.Combine(dir.Path, "model.safetensors");
        using (var stream = new FileStream(weights, FileMode.Open))
        {
            stream.SetLength(stream.Length * 2 / 3);
        }
        var (exit, output, error) = FrugalProcess.Run(["generate", "--model", dir.Path, "--prompt", "And God said"]);
        Assert.Equal(2, exit);
        Assert.Contains("model.safetensors", error);
        Assert.Contains("truncated", error);
        Assert.DoesNotContain("   at ", error); // a message, not a stack trace
        Assert.Equal("", output);
    }

    [Fact]
    public void UnsupportedArchitectureAndMissingFolderExitTwo()
    {
        using var dir = TestSupport.TempDir();
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), """{"model_type": "bert", "hidden_size": 8}""");
        foreach (var name in new[] { "tokenizer.json", "tokenizer_config.json" })
        {
            File.Copy(Path.Combine(FrugalProcess.BundledModel, name), Path.Combine(dir.Path, name));
        }
        var unsupported = FrugalProcess.Run(["generate", "--model", dir.Path, "--prompt", "x"]);
        Assert.Equal(2, unsupported.Exit);
        Assert.Contains("unsupported architecture 'bert'", unsupported.Err);
        var missing = FrugalProcess.Run(["generate", "--model", Path.Combine(dir.Path, "nope"), "--prompt", "x"]);
        Assert.Equal(2, missing.Exit);
        Assert.Contains("nope", missing.Err);
    }
}
