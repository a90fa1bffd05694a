using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using FrugalLM.Planning;
using Spectre.Console;

namespace FrugalLM.Cli.Commands;

/// <summary><c>frugal estimate</c>: the memory of one plan, per component and tier, and the largest batch that fits.</summary>
internal static class EstimateCommand
{
    public static Command Create()
    {
        var options = new PlanOptions();
        var method = new Option<string>("--method")
        {
            Description = "detailed (FrugalLM's estimator) or seed (the article's method: parameters + gradients + optimizer + 1.3 GB, plus (hidden + intermediate) x layers x context per sequence)",
            DefaultValueFactory = _ => "detailed",
        };
        var parameters = new Option<string?>("--params") { Description = "Seed method: parameter count to use instead of the model's (the article uses 6e9)" };
        var json = new Option<bool>("--json") { Description = "Print JSON (bytes) instead of tables" };
        var failIfOver = new Option<bool>("--fail-if-over") { Description = "Exit with 3 when the estimate exceeds the budget" };
        var compare = new Option<bool>("--compare") { Description = "Also print what Accelerate's estimate-memory and DeepSpeed's ZeRO estimators say for this model" };
        var command = new Command("estimate", "Estimate the memory of a training or generation run before running it");
        options.AddTo(command);
        command.Options.Add(method);
        command.Options.Add(parameters);
        command.Options.Add(json);
        command.Options.Add(failIfOver);
        command.Options.Add(compare);
        command.SetAction(result => CliOutput.Guard(result, () =>
        {
            var gpu = options.ResolveGpu(result);
            var plan = options.Build(result, gpu);
            var budget = options.ResolveBudget(result, gpu);
            var methodName = result.GetValue(method)!.Trim().ToLowerInvariant();
            bool asJson = result.GetValue(json);
            bool exceeds = methodName switch
            {
                "detailed" => Detailed(result, plan, gpu, budget, asJson, result.GetValue(compare)),
                "seed" => Seed(result, plan, gpu, result.GetValue(options.Budget) is null ? null : budget,
                    ParseCount(result.GetValue(parameters)), asJson),
                _ => throw new PlanException($"unknown method '{methodName}' (expected detailed or seed)"),
            };
            return exceeds && result.GetValue(failIfOver) ? CliOutput.ExitDoesNotFit : CliOutput.ExitOk;
        }));
        return command;
    }

    private static long? ParseCount(string? text)
    {
        if (text is null)
        {
            return null;
        }
        if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out var value) || !(value >= 1) || value > 1e15)
        {
            throw new PlanException($"--params: '{text}' is not a parameter count (e.g. 6e9)");
        }
        return (long)Math.Round(value);
    }

    private static bool Detailed(ParseResult result, RunPlan plan, GpuSpec? gpu, long? budget, bool asJson, bool compare)
    {
        var estimate = MemoryEstimator.Estimate(plan);
        int? maxBatch = budget is long b ? MemoryEstimator.MaxMicroBatch(plan, b) : null;
        bool? fits = budget is long limit ? estimate.DeviceBytes <= limit : null;
        if (asJson)
        {
            var node = DetailedJson(estimate, gpu, budget, fits, maxBatch);
            if (compare)
            {
                node["peers"] = PeersJson(plan.Model);
            }
            CliOutput.Json(result, node);
        }
        else
        {
            var console = CliOutput.Console(result);
            RenderDetailed(console, estimate, gpu, budget, fits, maxBatch);
            if (compare)
            {
                RenderPeers(console, plan.Model);
            }
        }
        return fits == false;
    }

    private static readonly (Phases Phase, string Name)[] PhaseNames =
        [(Phases.ForwardEnd, "forward_end"), (Phases.BackwardEnd, "backward_end"), (Phases.OptimizerStep, "optimizer_step")];

    private static readonly (Phases Phase, string Name)[] LiveInNames = [.. PhaseNames, (Phases.Loading, "loading")];

    private static JsonObject DetailedJson(MemoryEstimate e, GpuSpec? gpu, long? budget, bool? fits, int? maxBatch)
    {
        var phases = new JsonObject();
        if (e.Plan.Trains)
        {
            foreach (var (phase, name) in PhaseNames)
            {
                phases[name] = e.DeviceBytesAt(phase);
            }
        }
        return new JsonObject
        {
            ["method"] = "detailed",
            ["model"] = e.Plan.Model.Name,
            ["parameters"] = e.Plan.Model.ParameterCount,
            ["trainable_parameters"] = e.TrainableParameterCount,
            ["plan"] = CliOutput.PlanJson(e.Plan),
            ["components"] = new JsonArray(e.Components.Select(c => (JsonNode?)new JsonObject
            {
                ["key"] = c.Key,
                ["label"] = c.Label,
                ["bytes"] = c.Bytes,
                ["tier"] = PlanNames.Format(c.Tier),
                ["live_in"] = new JsonArray(LiveInNames.Where(p => (c.LiveIn & p.Phase) != 0).Select(p => (JsonNode?)p.Name).ToArray()),
                ["formula"] = c.Formula,
            }).ToArray()),
            ["device_bytes_by_phase"] = e.Plan.Trains ? phases : null,
            ["peak_phase"] = e.Plan.Trains ? PhaseNames.First(p => p.Phase == e.PeakPhase).Name : null,
            ["device_bytes"] = e.DeviceBytes,
            ["host_bytes"] = e.HostBytes,
            ["disk_bytes"] = e.DiskBytes,
            ["total_bytes"] = e.TotalBytes,
            ["gpu"] = gpu?.Name,
            ["budget_bytes"] = budget,
            ["fits"] = fits,
            ["max_batch_size"] = maxBatch,
            ["warnings"] = new JsonArray(e.Warnings.Select(w => (JsonNode?)w).ToArray()),
        };
    }

    private static void RenderDetailed(IAnsiConsole console, MemoryEstimate e, GpuSpec? gpu, long? budget, bool? fits, int? maxBatch)
    {
        var plan = e.Plan;
        console.MarkupLine($"[bold]{Markup.Escape(plan.Model.ToString())}[/]");
        console.MarkupLine(Markup.Escape(string.Create(CultureInfo.InvariantCulture,
            $"{PlanNames.Format(plan.Mode)}: {plan.Describe()}; micro-batch {plan.MicroBatchSize} x {plan.SequenceLength} tokens, trainable parameters {CliOutput.Count(e.TrainableParameterCount)}")));
        var table = new Table().Border(TableBorder.Rounded);
        table.AddColumn("Component");
        table.AddColumn("Tier");
        table.AddColumn(plan.Trains ? "Alive (fwd end / bwd end / step)" : "Alive");
        table.AddColumn(new TableColumn("GiB").RightAligned());
        table.AddColumn("How");
        foreach (var c in e.Components)
        {
            table.AddRow(
                Markup.Escape(c.Label),
                PlanNames.Format(c.Tier),
                plan.Trains ? Alive(c.LiveIn) : c.LiveIn == Phases.Loading ? "while loading" : "throughout",
                ((double)c.Bytes / ByteSize.GiB).ToString("F2", CultureInfo.InvariantCulture),
                Markup.Escape(c.Formula));
        }
        console.Write(table);

        var summary = new Table().Border(TableBorder.Rounded);
        summary.AddColumn("Total");
        summary.AddColumn(new TableColumn("GiB").RightAligned());
        summary.AddColumn(new TableColumn("GB").RightAligned());
        if (plan.Trains)
        {
            foreach (var (phase, name) in PhaseNames)
            {
                var label = $"device at {name.Replace('_', ' ')}{(phase == e.PeakPhase ? " (peak)" : "")}";
                summary.AddRow(label, Gib(e.DeviceBytesAt(phase)), Gb(e.DeviceBytesAt(phase)));
            }
        }
        summary.AddRow("[bold]device peak[/]", Gib(e.DeviceBytes), Gb(e.DeviceBytes));
        if (e.HostBytes > 0)
        {
            summary.AddRow("host", Gib(e.HostBytes), Gb(e.HostBytes));
        }
        if (e.DiskBytes > 0)
        {
            summary.AddRow("disk", Gib(e.DiskBytes), Gb(e.DiskBytes));
        }
        summary.AddRow("total (device peak + host + disk)", Gib(e.TotalBytes), Gb(e.TotalBytes));
        console.Write(summary);
        if (budget is long limit)
        {
            var device = gpu is null ? "budget" : gpu.DisplayName;
            console.MarkupLine(fits == true
                ? $"[green]Fits[/] {Markup.Escape(device)} ({CliOutput.GiB(limit)}): {CliOutput.GiB(limit - e.DeviceBytes)} to spare."
                : $"[red]Does not fit[/] {Markup.Escape(device)} ({CliOutput.GiB(limit)}): {CliOutput.GiB(e.DeviceBytes - limit)} over.");
            console.MarkupLine(maxBatch > 0
                ? $"Largest micro-batch that fits: [bold]{maxBatch}[/] sequences of {plan.SequenceLength} tokens."
                : "Largest micro-batch that fits: [bold]0[/] (not even one sequence).");
        }
        foreach (var warning in e.Warnings)
        {
            console.MarkupLine($"[yellow]warning:[/] {Markup.Escape(warning)}");
        }
    }

    private static string Alive(Phases live) => string.Join(" / ", new[]
    {
        (live & Phases.ForwardEnd) != 0 ? "x" : "-",
        (live & Phases.BackwardEnd) != 0 ? "x" : "-",
        (live & Phases.OptimizerStep) != 0 ? "x" : "-",
    });

    private static string Gib(long bytes) => ((double)bytes / ByteSize.GiB).ToString("F2", CultureInfo.InvariantCulture);

    private static string Gb(long bytes) => ((double)bytes / ByteSize.GB).ToString("F2", CultureInfo.InvariantCulture);

    private static bool Seed(ParseResult result, RunPlan plan, GpuSpec? gpu, long? explicitBudget, long? parameters, bool asJson)
    {
        var seed = SeedMethod.Estimate(SeedMethod.InputsFor(plan, parameters));
        // The article divides decimal GB: a GPU's advertised size in decimal GB, unless --budget says otherwise.
        long? budget = explicitBudget ?? (gpu is null ? null : (long)(gpu.NominalGb * ByteSize.GB));
        int? maxBatch = budget is long b ? seed.MaxBatch(b) : null;
        long total = seed.TotalBytes(plan.MicroBatchSize);
        bool? fits = budget is long limit ? total <= limit : null;
        if (asJson)
        {
            CliOutput.Json(result, new JsonObject
            {
                ["method"] = "seed",
                ["model"] = plan.Model.Name,
                ["parameters"] = seed.Inputs.Parameters,
                ["bytes_per_value"] = seed.Inputs.BytesPerValue,
                ["optimizer_bytes_per_parameter"] = seed.Inputs.OptimizerBytesPerParameter,
                ["parameters_bytes"] = seed.ParameterBytes,
                ["gradients_bytes"] = seed.GradientBytes,
                ["optimizer_bytes"] = seed.OptimizerBytes,
                ["cuda_context_bytes"] = seed.CudaContextBytes,
                ["model_bytes"] = seed.ModelBytes,
                ["activation_bytes_per_sequence"] = seed.ActivationBytesPerSequence,
                ["micro_batch_size"] = plan.MicroBatchSize,
                ["sequence_length"] = plan.SequenceLength,
                ["device_bytes"] = total,
                ["total_bytes"] = total,
                ["gpu"] = gpu?.Name,
                ["budget_bytes"] = budget,
                ["fits"] = fits,
                ["max_batch_size"] = maxBatch,
            });
            return fits == false;
        }
        var console = CliOutput.Console(result);
        console.MarkupLine($"[bold]Seed method (the article's estimate)[/] for {Markup.Escape(plan.Model.Name)}: "
            + Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                $"{seed.Inputs.Parameters:N0} parameters at {seed.Inputs.BytesPerValue} B per value, optimizer {seed.Inputs.OptimizerBytesPerParameter} B per parameter")));
        var table = new Table().Border(TableBorder.Rounded);
        table.AddColumn("Part");
        table.AddColumn(new TableColumn("GB (decimal)").RightAligned());
        table.AddColumn(new TableColumn("GiB").RightAligned());
        void Row(string name, long bytes) => table.AddRow(Markup.Escape(name), Gb(bytes), Gib(bytes));
        Row("parameters", seed.ParameterBytes);
        Row("gradients", seed.GradientBytes);
        Row("optimizer states", seed.OptimizerBytes);
        Row("CUDA context", seed.CudaContextBytes);
        Row("model part", seed.ModelBytes);
        Row("activations per sequence: (hidden + intermediate) x layers x context x bytes", seed.ActivationBytesPerSequence);
        Row($"total with {plan.MicroBatchSize} sequence(s)", total);
        console.Write(table);
        if (budget is long limit2)
        {
            console.MarkupLine(string.Create(CultureInfo.InvariantCulture,
                $"Budget {(double)limit2 / ByteSize.GB:F1} GB{(gpu is null ? "" : $" ({Markup.Escape(gpu.DisplayName)})")}: largest batch floor((budget - model part) / activations per sequence) = [bold]{maxBatch}[/]."));
        }
        console.MarkupLine("[grey]The seed method ignores logits, attention, norms, master weights, LoRA, checkpointing, offload and sharding; --method detailed counts them.[/]");
        return fits == false;
    }

    private static JsonObject PeersJson(ModelSpec model) => new()
    {
        ["accelerate_estimate_memory"] = new JsonArray(PeerEstimators.Accelerate(model).Select(r => (JsonNode?)new JsonObject
        {
            ["dtype"] = r.Dtype,
            ["total_bytes"] = r.TotalBytes,
            ["training_bytes"] = r.TrainingBytes,
        }).ToArray()),
        ["deepspeed_zero2"] = DeepSpeedJson(PeerEstimators.DeepSpeedZero2(model)),
        ["deepspeed_zero3"] = DeepSpeedJson(PeerEstimators.DeepSpeedZero3(model)),
    };

    private static JsonArray DeepSpeedJson(IReadOnlyList<DeepSpeedRow> rows) =>
        new(rows.Select(r => (JsonNode?)new JsonObject
        {
            ["options"] = r.Options,
            ["per_gpu_bytes"] = r.PerGpuBytes,
            ["per_cpu_bytes"] = r.PerCpuBytes,
        }).ToArray());

    private static void RenderPeers(IAnsiConsole console, ModelSpec model)
    {
        var accelerate = new Table().Border(TableBorder.Rounded)
            .Title("Accelerate estimate-memory (prints GiB labelled \"GB\"; no LM head; training = max, not sum)");
        accelerate.AddColumn("dtype");
        accelerate.AddColumn(new TableColumn("Total Size (GiB)").RightAligned());
        accelerate.AddColumn(new TableColumn("Training using Adam (GiB)").RightAligned());
        foreach (var row in PeerEstimators.Accelerate(model))
        {
            accelerate.AddRow(row.Dtype, Gib(row.TotalBytes), row.TrainingBytes is long t ? Gib(t) : "N/A");
        }
        console.Write(accelerate);
        var deepspeed = new Table().Border(TableBorder.Rounded)
            .Title("DeepSpeed model-states estimators, 1 GPU (no activations)");
        deepspeed.AddColumn("stage");
        deepspeed.AddColumn("options");
        deepspeed.AddColumn(new TableColumn("per GPU (GiB)").RightAligned());
        deepspeed.AddColumn(new TableColumn("per CPU (GiB)").RightAligned());
        foreach (var row in PeerEstimators.DeepSpeedZero2(model))
        {
            deepspeed.AddRow("ZeRO-2", Markup.Escape(row.Options), Gib(row.PerGpuBytes), Gib(row.PerCpuBytes));
        }
        foreach (var row in PeerEstimators.DeepSpeedZero3(model))
        {
            deepspeed.AddRow("ZeRO-3", Markup.Escape(row.Options), Gib(row.PerGpuBytes), Gib(row.PerCpuBytes));
        }
        console.Write(deepspeed);
    }
}
