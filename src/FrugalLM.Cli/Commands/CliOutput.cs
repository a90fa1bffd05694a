using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.Planning;
using Spectre.Console;

namespace FrugalLM.Cli.Commands;

/// <summary>Console, JSON and error output for commands, written to the invocation's writers.</summary>
internal static class CliOutput
{
    /// <summary>Exit code: success.</summary>
    public const int ExitOk = 0;

    /// <summary>Exit code: bad usage or bad input.</summary>
    public const int ExitBadInput = 2;

    /// <summary>Exit code: the plan does not fit its budget.</summary>
    public const int ExitDoesNotFit = 3;

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    /// <summary>
    /// A Spectre console over the invocation's output. When that is not a terminal (a pipe, a file, a test's
    /// writer) it prints plain text, wide enough that tables do not wrap.
    /// </summary>
    public static IAnsiConsole Console(ParseResult result)
    {
        var output = new AnsiConsoleOutput(result.InvocationConfiguration.Output);
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = output,
            Ansi = output.IsTerminal ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = output.IsTerminal ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });
        if (!output.IsTerminal)
        {
            console.Profile.Width = 200;
        }
        return console;
    }

    /// <summary>Writes a JSON document to the invocation's output.</summary>
    public static void Json(ParseResult result, JsonNode node) =>
        result.InvocationConfiguration.Output.WriteLine(node.ToJsonString(Indented));

    /// <summary>Runs a command body, turning bad input into a message on stderr and exit code 2.</summary>
    public static int Guard(ParseResult result, Func<int> body)
    {
        try
        {
            return body();
        }
        catch (Exception e) when (e is PlanException or ModelConfigException)
        {
            result.InvocationConfiguration.Error.WriteLine($"error: {e.Message}");
            return ExitBadInput;
        }
    }

    /// <summary>"12.34 GiB".</summary>
    public static string GiB(long bytes) => ByteSize.FormatGiB(bytes);

    /// <summary>"12.34 GB".</summary>
    public static string GB(long bytes) => ByteSize.FormatGB(bytes);

    /// <summary>A number with thousands separators.</summary>
    public static string Count(long value) => value.ToString("N0", CultureInfo.InvariantCulture);

    /// <summary>The plan's settings as JSON (names as on the command line).</summary>
    public static JsonObject PlanJson(RunPlan plan) => new()
    {
        ["mode"] = PlanNames.Format(plan.Mode),
        ["precision"] = PlanNames.Format(plan.Precision),
        ["quantization"] = PlanNames.Format(plan.Quantization.Kind),
        ["lora"] = plan.Lora is { } lora
            ? new JsonObject
            {
                ["rank"] = lora.Rank,
                ["alpha"] = lora.Alpha,
                ["targets"] = new JsonArray(lora.TargetModules.Select(t => (JsonNode?)t).ToArray()),
                ["dropout"] = lora.Dropout,
            }
            : null,
        ["optimizer"] = PlanNames.Format(plan.Optimizer),
        ["checkpoint_every"] = plan.Checkpointing.Interval,
        ["attention"] = PlanNames.Format(plan.Attention),
        ["loss"] = plan.Loss.Chunked ? "chunked" : "full",
        ["loss_chunk_tokens"] = plan.Loss.Chunked ? plan.Loss.ChunkTokens : null,
        ["fsdp"] = PlanNames.Format(plan.Sharding.Strategy),
        ["world_size"] = plan.Sharding.WorldSize,
        ["offload"] = plan.Offload.Name,
        ["micro_batch_size"] = plan.MicroBatchSize,
        ["sequence_length"] = plan.SequenceLength,
        ["gradient_accumulation_steps"] = plan.GradientAccumulationSteps,
        ["device"] = plan.Device == ComputeDevice.Cpu ? "cpu" : "cuda",
        ["cuda_context_bytes"] = plan.Overhead.ContextBytes,
        ["runtime_baseline_bytes"] = plan.Overhead.RuntimeBaselineBytes,
    };
}
