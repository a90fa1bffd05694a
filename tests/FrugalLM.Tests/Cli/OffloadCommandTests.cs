namespace FrugalLM.Tests.Cli;

/// <summary><c>--offload disk|params|all</c> and <c>--memory-budget</c> through the command line, on the bundled model.</summary>
public sealed class OffloadCommandTests
{
    private static readonly string[] Greedy = ["generate", "--model", FrugalProcess.BundledModel, "--prompt", "And God said", "--max-new-tokens", "20", "--temperature", "0"];

    [Fact]
    public void DiskOffloadAndABudgetGiveTheInMemoryTokensAndNothingFittingExitsThree()
    {
        var memory = FrugalProcess.Run(Greedy);
        var disk = FrugalProcess.Run([.. Greedy, "--offload", "disk"]);
        Assert.Equal(0, disk.Exit);
        Assert.Equal(memory.Out, disk.Out);
        Assert.Contains("placement: disk offload, 0 of 6 decoder layers resident", disk.Err);
        Assert.Contains("% of read time hidden by read-ahead", disk.Err);

        // In memory the bundled model needs ~82 MiB above the baseline, streaming every layer ~71: a budget (less its 5% headroom) between
        // them keeps some layers resident and streams the rest.
        var budget = FrugalProcess.Run([.. Greedy, "--memory-budget", "82MiB"]);
        Assert.Equal(0, budget.Exit);
        Assert.Equal(memory.Out, budget.Out);
        Assert.Matches(@"placement: disk offload, [1-5] of 6 decoder layers resident \(budget 82\.0 MiB", budget.Err);

        var tiny = FrugalProcess.Run([.. Greedy, "--memory-budget", "1MiB"]);
        Assert.Equal(3, tiny.Exit);
        Assert.Contains("nothing fits the memory budget of 1.0 MiB", tiny.Err);
        Assert.Equal("", tiny.Out);
    }

    [Fact]
    public void ParamsOffloadGivesTheInMemoryTokensAndRefusesFullTrainingAndABudget()
    {
        var memory = FrugalProcess.Run(Greedy);
        var host = FrugalProcess.Run([.. Greedy, "--offload", "params"]);
        Assert.Equal(0, host.Exit);
        Assert.Equal(memory.Out, host.Out);
        Assert.Contains("placement: offload params", host.Err);
        Assert.Matches(@"MiB on the host tier, [0-9.]+ MiB device layer buffers", host.Err);
        Assert.Contains("layer copies from the host tier", host.Err);

        var budget = FrugalProcess.Run([.. Greedy, "--offload", "params", "--memory-budget", "1GiB"]);
        Assert.Equal(2, budget.Exit);
        Assert.Contains("with --offload params leave it out", budget.Err);

        using var dir = TestSupport.TempDir();
        var data = Path.Combine(dir.Path, "data.txt");
        File.WriteAllText(data, string.Concat(Enumerable.Repeat("In the beginning God created the heaven and the earth. ", 40)));
        var full = FrugalProcess.Run("train", "--model", FrugalProcess.BundledModel, "--data", data,
            "--out", Path.Combine(dir.Path, "out"), "--steps", "1", "--batch", "1", "--seq", "16", "--offload", "all");
        Assert.Equal(2, full.Exit);
        Assert.Contains("train LoRA adapters on them (--lora-r)", full.Err);

        // LoRA with the base and the optimizer on the host tier, then its adapter over a host-streamed base: the same tokens
        // as the adapter merged into an in-memory base (fp32 generation merges it; a streamed base is not merged into).
        var adapter = Path.Combine(dir.Path, "adapter");
        var lora = FrugalProcess.Run("train", "--model", FrugalProcess.BundledModel, "--data", data, "--out", adapter,
            "--steps", "2", "--batch", "1", "--seq", "16", "--lora-r", "4", "--offload", "all", "--grad-clip", "0");
        Assert.True(lora.Exit == 0, lora.Err);
        Assert.Contains("placement: offload all", lora.Err);
        Assert.Contains("layer copies from the host tier", lora.Err);
        var merged = FrugalProcess.Run([.. Greedy, "--adapter", adapter]);
        var streamed = FrugalProcess.Run([.. Greedy, "--adapter", adapter, "--offload", "params"]);
        Assert.True(streamed.Exit == 0, streamed.Err);
        Assert.Equal(merged.Out, streamed.Out);
    }
}
