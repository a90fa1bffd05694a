using System.CommandLine;
using System.Text.Json.Nodes;
using FrugalLM.Cli;
using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

/// <summary>Runs <c>frugal</c> commands in process, with their output captured.</summary>
internal static class Frugal
{
    public static (int Exit, string Out, string Err) Run(params string[] args)
    {
        var root = new RootCommand("frugal");
        foreach (var command in CommandCatalog.All())
        {
            root.Subcommands.Add(command);
        }
        var output = new StringWriter();
        var error = new StringWriter();
        int exit = root.Parse(args).Invoke(new InvocationConfiguration { Output = output, Error = error });
        return (exit, output.ToString(), error.ToString());
    }

    public static JsonObject Json(params string[] args)
    {
        var (exit, output, error) = Run(args);
        Assert.True(exit is 0 or 3, $"exit {exit}: {error}");
        return JsonNode.Parse(output)!.AsObject();
    }
}

public sealed class CliTests
{
    [Fact]
    public void EstimateLlama7bFp32AdamWOnA3090ExceedsItAndFitsNoBatch()
    {
        var (exit, output, error) = Frugal.Run("estimate", "--model", "llama-7b", "--precision", "fp32", "--optimizer", "adamw",
            "--gpu", "rtx3090", "--json");
        Assert.Equal(0, exit);
        Assert.Equal("", error);
        var json = JsonNode.Parse(output)!.AsObject();
        Assert.True(json["total_bytes"]!.GetValue<long>() > 24_000_000_000);
        Assert.True(json["device_bytes"]!.GetValue<long>() > 24 * ByteSize.GiB);
        Assert.Equal(0, json["max_batch_size"]!.GetValue<int>());
        Assert.False(json["fits"]!.GetValue<bool>());
        Assert.Equal(6_738_415_616, json["parameters"]!.GetValue<long>());
        long sum = json["components"]!.AsArray().Sum(c => c!["bytes"]!.GetValue<long>());
        Assert.True(sum >= json["device_bytes"]!.GetValue<long>()); // the peak is one phase of the components
    }

    [Fact]
    public void PlanLlama7bOnA3090ListsAFittingConfiguration()
    {
        var (exit, output, _) = Frugal.Run("plan", "--model", "llama-7b", "--gpu", "rtx3090", "--seq", "2048");
        Assert.Equal(0, exit);
        Assert.Contains("configurations fit", output);
        var json = Frugal.Json("plan", "--model", "llama-7b", "--gpu", "rtx3090", "--seq", "2048", "--json");
        Assert.True(json["fitting_count"]!.GetValue<int>() >= 1);
        var best = json["fitting"]!.AsArray()[0]!;
        Assert.True(best["max_batch_size"]!.GetValue<int>() >= 1);
        Assert.True(best["peak_bytes_at_max_batch"]!.GetValue<long>() <= 24 * ByteSize.GiB);
    }

    [Fact]
    public void EstimateTablePrintsGiBAndTheLargestBatch()
    {
        var (exit, output, _) = Frugal.Run("estimate", "--model", "llama-7b", "--precision", "bf16", "--quant", "nf4",
            "--lora-r", "16", "--checkpoint-every", "1", "--gpu", "rtx3090");
        Assert.Equal(0, exit);
        Assert.Contains("GiB", output);
        Assert.Contains("Fits", output);
        Assert.Matches(@"Largest micro-batch that fits: \d+", output);
    }

    [Fact]
    public void SeedMethodPrintsTheArticlesFigures()
    {
        var json = Frugal.Json("estimate", "--model", "llama-7b", "--method", "seed", "--params", "6e9", "--quant", "int8",
            "--optimizer", "adamw8bit", "--gpu", "a100-80gb", "--json");
        Assert.Equal(25_300_000_000, json["model_bytes"]!.GetValue<long>());
        Assert.Equal(55, json["max_batch_size"]!.GetValue<int>());
        var (_, table, _) = Frugal.Run("estimate", "--model", "llama-7b", "--method", "seed", "--params", "6e9", "--quant", "int8",
            "--optimizer", "adamw8bit", "--gpu", "a100-80gb");
        Assert.Contains("25.30", table);
    }

    [Fact]
    public void CompareListsThePeersFigures()
    {
        var json = Frugal.Json("estimate", "--model", "llama-7b", "--json", "--compare");
        Assert.Equal(26_429_374_464, json["peers"]!["accelerate_estimate_memory"]![0]!["total_bytes"]!.GetValue<long>());
        Assert.Equal(6, json["peers"]!["deepspeed_zero3"]!.AsArray().Count);
    }

    [Theory]
    [InlineData("--model", "llama-1000b")]
    [InlineData("--model", "llama-7b", "--batch", "-1")]
    [InlineData("--model", "llama-7b", "--lora-r", "5000")]
    [InlineData("--model", "llama-7b", "--fsdp", "full", "--gpus", "0")]
    [InlineData("--model", "llama-7b", "--gpu", "rtx9090")]
    [InlineData("--model", "llama-7b", "--precision", "fp8")]
    [InlineData("--model", "llama-7b", "--budget", "24G")]
    [InlineData("--model", "llama-7b", "--lora-r", "8", "--lora-targets", "fc1")]
    public void BadInputExitsWithTwoAndAMessage(params string[] options)
    {
        var (exit, _, error) = Frugal.Run(["estimate", .. options]);
        Assert.Equal(2, exit);
        Assert.StartsWith("error: ", error);
    }

    [Fact]
    public void BadConfigJsonExitsWithTwo()
    {
        var dir = Directory.CreateTempSubdirectory("frugal-bad-");
        try
        {
            File.WriteAllText(Path.Combine(dir.FullName, "config.json"), "{ not json");
            var (exit, _, error) = Frugal.Run("estimate", "--model", dir.FullName);
            Assert.Equal(2, exit);
            Assert.Contains("config.json", error);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public void ExceedingTheBudgetExitsWithThreeOnlyWhenAsked()
    {
        string[] args = ["estimate", "--model", "llama-7b", "--gpu", "rtx3090", "--json"];
        Assert.Equal(0, Frugal.Run(args).Exit);
        Assert.Equal(3, Frugal.Run([.. args, "--fail-if-over"]).Exit);
        Assert.Equal(0, Frugal.Run([.. args, "--fail-if-over", "--budget", "200GiB"]).Exit);
    }

    [Fact]
    public void PlanExitsWithThreeWhenNothingFits()
    {
        var (exit, output, _) = Frugal.Run("plan", "--model", "llama-65b", "--gpu", "t4", "--task", "pretrain", "--host-memory", "1GiB");
        Assert.Equal(3, exit);
        Assert.Contains("Nothing fits", output);
    }

    [Fact]
    public void CpuRunsUseTheGivenMemoryAndNoCudaContext()
    {
        var json = Frugal.Json("estimate", "--model", "llama-7b", "--precision", "bf16", "--mode", "generate", "--gpu", "cpu",
            "--memory", "24GiB", "--runtime-baseline", "400MiB", "--json");
        Assert.Equal(24 * ByteSize.GiB, json["budget_bytes"]!.GetValue<long>());
        var keys = json["components"]!.AsArray().Select(c => c!["key"]!.GetValue<string>()).ToArray();
        Assert.DoesNotContain("cuda_context", keys);
        Assert.Contains("runtime_baseline", keys);
        Assert.True(json["max_batch_size"]!.GetValue<int>() >= 1);
    }
}
