using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using FrugalLM.Planning;
using Spectre.Console;

namespace FrugalLM.Cli.Commands;

/// <summary><c>frugal plan</c>: which configurations of a model fit a device, best first.</summary>
internal static class PlanCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Model preset or folder with config.json", Required = true };
        var gpu = new Option<string?>("--gpu") { Description = $"Device: {string.Join(", ", GpuCatalog.Names)}" };
        var budget = new Option<string?>("--budget") { Description = "Device memory budget, e.g. 24GiB (overrides the GPU's size)" };
        var memory = new Option<string?>("--memory") { Description = "RAM for --gpu cpu (default: MemAvailable)" };
        var hostMemory = new Option<string?>("--host-memory")
        {
            Description = "Host RAM for offloaded tensors, shared by the GPUs (default: MemAvailable from /proc/meminfo; 'unlimited' for none)",
        };
        var gpus = new Option<int>("--gpus") { Description = "GPUs available for FSDP sharding", DefaultValueFactory = _ => 1 };
        var sequence = new Option<int>("--seq") { Description = "Tokens per sequence", DefaultValueFactory = _ => 2048 };
        var task = new Option<string>("--task") { Description = "finetune, pretrain or infer", DefaultValueFactory = _ => "finetune" };
        var loraRank = new Option<int>("--lora-r") { Description = "LoRA rank to try", DefaultValueFactory = _ => LoraSettings.ArticleExample.Rank };
        var loraTargets = new Option<string>("--lora-targets")
        {
            Description = "LoRA targets to try (comma-separated, or all-linear)",
            DefaultValueFactory = _ => string.Join(',', LoraSettings.ArticleExample.TargetModules),
        };
        var top = new Option<int>("--top") { Description = "Fitting configurations to list", DefaultValueFactory = _ => 10 };
        var json = new Option<bool>("--json") { Description = "Print JSON (bytes) instead of tables" };
        var cudaContext = new Option<string?>("--cuda-context") { Description = "CUDA context size (default 1.3GB)" };
        var baseline = new Option<string?>("--runtime-baseline") { Description = "Measured resident memory of the runtime before the model" };
        var command = new Command("plan", "List the configurations of a model that fit a device, ranked by estimated throughput");
        foreach (var option in new Option[] { model, gpu, budget, memory, hostMemory, gpus, sequence, task, loraRank, loraTargets, top, json, cudaContext, baseline })
        {
            command.Options.Add(option);
        }
        command.SetAction(result => CliOutput.Guard(result, () =>
        {
            var spec = ModelCatalog.Resolve(result.GetValue(model)!);
            var memoryText = result.GetValue(memory);
            var gpuName = result.GetValue(gpu);
            var budgetText = result.GetValue(budget);
            if (gpuName is null && budgetText is null)
            {
                throw new PlanException("give the device with --gpu NAME or its memory with --budget SIZE");
            }
            var device = gpuName is null
                ? CustomDevice(PlanOptions.ParseSize(budgetText!, "--budget"))
                : GpuCatalog.Find(gpuName, memoryText is null ? null : PlanOptions.ParseSize(memoryText, "--memory"));
            long budgetBytes = budgetText is null ? device.MemoryBytes : PlanOptions.ParseSize(budgetText, "--budget");
            int rank = result.GetValue(loraRank);
            if (rank < 1)
            {
                throw new PlanException($"--lora-r must be at least 1 (got {rank})");
            }
            var targets = result.GetValue(loraTargets)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            var lora = new LoraSettings(rank, 2.0 * rank, targets, LoraSettings.ArticleExample.Dropout);
            var overhead = new FrameworkOverhead(
                device.Device == ComputeDevice.Cpu ? 0
                    : result.GetValue(cudaContext) is { } c ? PlanOptions.ParseSize(c, "--cuda-context") : FrameworkOverhead.DefaultCudaContextBytes,
                result.GetValue(baseline) is { } b ? PlanOptions.ParseSize(b, "--runtime-baseline") : 0);
            var hostText = result.GetValue(hostMemory);
            long? hostBudget = hostText is null ? HostMemory.AvailableBytes()
                : hostText.Trim().Equals("unlimited", StringComparison.OrdinalIgnoreCase) ? null
                : PlanOptions.ParseSize(hostText, "--host-memory");
            var request = new PlanRequest(spec, device, budgetBytes, result.GetValue(sequence), ParseTask(result.GetValue(task)!),
                result.GetValue(gpus), lora, overhead, hostBudget);
            var answer = Planner.Plan(request);
            int shown = Math.Max(1, result.GetValue(top));
            if (result.GetValue(json))
            {
                CliOutput.Json(result, Json(answer, shown));
            }
            else
            {
                Render(CliOutput.Console(result), answer, shown);
            }
            return answer.Fitting.Count > 0 ? CliOutput.ExitOk : CliOutput.ExitDoesNotFit;
        }));
        return command;
    }

    /// <summary>A device known only by its memory: rates of a mid-range Ampere card, used only for ranking.</summary>
    private static GpuSpec CustomDevice(long bytes) =>
        new("custom", "custom budget", ComputeDevice.Cuda, bytes, bytes / 1e9, 100, 100, 25, 1000, 32);

    private static PlanTask ParseTask(string name) => name.Trim().ToLowerInvariant() switch
    {
        "finetune" or "fine-tune" => PlanTask.Finetune,
        "pretrain" or "pre-train" => PlanTask.Pretrain,
        "infer" or "generate" => PlanTask.Infer,
        _ => throw new PlanException($"unknown task '{name}' (expected finetune, pretrain or infer)"),
    };

    private static string Trains(RunPlan plan) => !plan.Trains ? "-" : plan.Lora?.ToString() ?? "all weights";

    private static void Render(IAnsiConsole console, PlanResult answer, int shown)
    {
        var r = answer.Request;
        console.MarkupLine($"[bold]{Markup.Escape(r.Model.ToString())}[/]");
        console.MarkupLine(Markup.Escape(string.Create(CultureInfo.InvariantCulture,
            $"{r.Task.ToString().ToLowerInvariant()} on {r.Gpu.DisplayName}{(r.Gpus > 1 ? $" x{r.Gpus}" : "")}, budget {CliOutput.GiB(r.BudgetBytes)} per device, host {(r.HostBudgetBytes is long h ? CliOutput.GiB(h) : "unlimited")}, {r.SequenceLength} tokens per sequence")));
        if (answer.Fitting.Count == 0)
        {
            console.MarkupLine("[red]Nothing fits.[/]");
        }
        else
        {
            var table = new Table().Border(TableBorder.Rounded)
                .Title(string.Create(CultureInfo.InvariantCulture, $"{answer.Fitting.Count} configurations fit; best {Math.Min(shown, answer.Fitting.Count)}"));
            foreach (var header in new[] { "#", "precision", "base", "trains", "ckpt", "optimizer", "offload", "fsdp" })
            {
                table.AddColumn(header);
            }
            table.AddColumn(new TableColumn("peak @1 (GiB)").RightAligned());
            table.AddColumn(new TableColumn("max batch").RightAligned());
            table.AddColumn(new TableColumn("peak @max (GiB)").RightAligned());
            table.AddColumn(new TableColumn("host (GiB)").RightAligned());
            table.AddColumn(new TableColumn("tokens/s bound").RightAligned());
            int index = 0;
            foreach (var c in answer.Fitting.Take(shown))
            {
                var p = c.Plan;
                table.AddRow(
                    (++index).ToString(CultureInfo.InvariantCulture),
                    PlanNames.Format(p.Precision),
                    p.Quantization.Kind == QuantizationKind.None ? "-" : PlanNames.Format(p.Quantization.Kind),
                    Markup.Escape(Trains(p)),
                    p.Trains && p.Checkpointing.Enabled ? "every layer" : "-",
                    p.Trains ? PlanNames.Format(p.Optimizer) : "-",
                    p.Offload.Name,
                    p.Sharding.Strategy == ShardingStrategy.None ? "-" : $"{PlanNames.Format(p.Sharding.Strategy)} x{p.Sharding.WorldSize}",
                    Gib(c.DeviceBytesAtOne),
                    c.MaxMicroBatch.ToString(CultureInfo.InvariantCulture),
                    Gib(c.DeviceBytesAtMax),
                    Gib(c.HostBytes),
                    c.TokensPerSecond.ToString("N0", CultureInfo.InvariantCulture));
            }
            console.Write(table);
        }
        if (answer.Rejected.Count > 0)
        {
            var rejected = new Table().Border(TableBorder.Rounded).Title("Does not fit, even in the leanest variant");
            rejected.AddColumn("family");
            rejected.AddColumn("leanest variant");
            rejected.AddColumn(new TableColumn("peak @1 (GiB)").RightAligned());
            rejected.AddColumn(new TableColumn("host (GiB)").RightAligned());
            rejected.AddColumn("exceeds");
            foreach (var x in answer.Rejected)
            {
                rejected.AddRow(Markup.Escape(x.Family), Markup.Escape(x.Leanest.Describe()), Gib(x.DeviceBytesAtOne),
                    Gib(x.HostBytes), x.Reason);
            }
            console.Write(rejected);
        }
        foreach (var note in answer.Skipped)
        {
            console.MarkupLine($"[grey]note: {Markup.Escape(note)}[/]");
        }
        console.MarkupLine("[grey]Ranked by a throughput bound (training: matmul FLOPs at the device's peak rate with recomputation; generation: the slower of FLOPs and reading weights and KV cache; plus host-link traffic), then larger batch, then fewer techniques; see docs/estimator.md.[/]");
    }

    private static string Gib(long bytes) => ((double)bytes / ByteSize.GiB).ToString("F2", CultureInfo.InvariantCulture);

    private static JsonObject Json(PlanResult answer, int shown)
    {
        var r = answer.Request;
        return new JsonObject
        {
            ["model"] = r.Model.Name,
            ["parameters"] = r.Model.ParameterCount,
            ["gpu"] = r.Gpu.Name,
            ["gpus"] = r.Gpus,
            ["budget_bytes"] = r.BudgetBytes,
            ["host_budget_bytes"] = r.HostBudgetBytes,
            ["sequence_length"] = r.SequenceLength,
            ["task"] = r.Task.ToString().ToLowerInvariant(),
            ["fitting_count"] = answer.Fitting.Count,
            ["fitting"] = new JsonArray(answer.Fitting.Take(shown).Select(c => (JsonNode?)new JsonObject
            {
                ["plan"] = CliOutput.PlanJson(c.Plan),
                ["description"] = c.Plan.Describe(),
                ["peak_bytes_at_batch_1"] = c.DeviceBytesAtOne,
                ["max_batch_size"] = c.MaxMicroBatch,
                ["peak_bytes_at_max_batch"] = c.DeviceBytesAtMax,
                ["host_bytes"] = c.HostBytes,
                ["tokens_per_second_bound"] = Math.Round(c.TokensPerSecond, 1),
            }).ToArray()),
            ["not_fitting"] = new JsonArray(answer.Rejected.Select(x => (JsonNode?)new JsonObject
            {
                ["family"] = x.Family,
                ["leanest"] = x.Leanest.Describe(),
                ["peak_bytes_at_batch_1"] = x.DeviceBytesAtOne,
                ["host_bytes"] = x.HostBytes,
                ["exceeds"] = x.Reason,
            }).ToArray()),
            ["notes"] = new JsonArray(answer.Skipped.Select(s => (JsonNode?)s).ToArray()),
        };
    }
}
