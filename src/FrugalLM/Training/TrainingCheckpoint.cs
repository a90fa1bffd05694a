using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.IO;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>
/// Resumable training state: trainable weights (or their fp32 masters), AdamW moments and step count, the
/// loss scaler, the RNG and the data position, in <c>step-NNNNNN/</c> folders (<c>state.safetensors</c> +
/// <c>state.json</c>). A checkpoint is written into a temporary folder and renamed into place when complete,
/// so a kill at any moment leaves the previous one intact; the two newest are kept. Frozen weights are not
/// stored: a resumed run loads them from the model it started from.
/// </summary>
public static class TrainingCheckpoint
{
    private const string Tensors = "state.safetensors";
    private const string Json = "state.json";

    /// <summary>Writes the trainer's state under <paramref name="folder"/>; returns the checkpoint's path.</summary>
    public static string Save(Trainer trainer, string folder)
    {
        Directory.CreateDirectory(folder);
        var name = string.Create(CultureInfo.InvariantCulture, $"step-{trainer.StepsDone:D6}");
        var final = Path.Combine(folder, name);
        var temp = Path.Combine(folder, $".{name}.{Environment.ProcessId}.tmp");
        if (Directory.Exists(temp))
        {
            Directory.Delete(temp, recursive: true);
        }
        Directory.CreateDirectory(temp);
        using (var scope = NewDisposeScope())
        {
            var tensors = new List<(string, Tensor)>();
            var masters = trainer.Precision.Masters.ToDictionary(m => m.Name, m => m.Master);
            foreach (var (n, p) in trainer.Precision.OptimizerParameters)
            {
                tensors.Add(((masters.ContainsKey(n) ? "master." : "weight.") + n, p));
            }
            tensors.AddRange(trainer.Optimizer.StateTensors());
            tensors.Add(("rng", get_rng_state()));
            SafeTensors.Write(Path.Combine(temp, Tensors), tensors);
        }
        var (epoch, batch) = trainer.DataPosition;
        var scaler = trainer.Precision.Scaler;
        var state = new JsonObject
        {
            ["step"] = trainer.StepsDone,
            ["data_epoch"] = epoch,
            ["data_batch"] = batch,
            ["optimizer_step"] = trainer.Optimizer.StepCount,
            ["precision"] = trainer.Precision.Mode.ToString(),
            ["loss_scale"] = scaler?.Scale,
            ["loss_scale_clean_steps"] = scaler?.CleanSteps,
            ["loss_scale_skipped"] = scaler?.SkippedSteps,
        };
        AtomicFile.WriteText(Path.Combine(temp, Json), state.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        if (Directory.Exists(final))
        {
            Directory.Delete(final, recursive: true);
        }
        Directory.Move(temp, final);
        foreach (var old in Complete(folder).SkipLast(2))
        {
            Directory.Delete(old, recursive: true);
        }
        return final;
    }

    /// <summary>The newest complete checkpoint under <paramref name="folder"/>, or null.</summary>
    public static string? Latest(string folder) => Directory.Exists(folder) ? Complete(folder).LastOrDefault() : null;

    /// <summary>Restores a trainer (built exactly as for the original run) from <paramref name="checkpoint"/>.</summary>
    public static void Load(Trainer trainer, string checkpoint)
    {
        var jsonPath = Path.Combine(checkpoint, Json);
        if (!File.Exists(jsonPath))
        {
            throw new CheckpointFormatException(checkpoint, "not a complete training checkpoint (no state.json)");
        }
        var state = JsonNode.Parse(File.ReadAllText(jsonPath))!.AsObject();
        var mode = state["precision"]!.GetValue<string>();
        if (mode != trainer.Precision.Mode.ToString())
        {
            throw new CheckpointFormatException(jsonPath, $"checkpoint was written with precision {mode}, the run uses {trainer.Precision.Mode}");
        }
        using var file = SafeTensorsFile.Open(Path.Combine(checkpoint, Tensors));
        var masters = trainer.Precision.Masters.Select(m => m.Name).ToHashSet();
        using (no_grad())
        {
            foreach (var (n, p) in trainer.Precision.OptimizerParameters)
            {
                file.CopyTo((masters.Contains(n) ? "master." : "weight.") + n, p);
            }
        }
        trainer.Precision.SyncWeights();
        RestoreRun(trainer, file, n => state[n]!);
    }

    /// <summary>
    /// What every checkpoint format restores the same way (this one and the sharded one): the optimizer's moments by
    /// name from <paramref name="file"/>, the RNG, the loss scaler, the step and the data position.
    /// </summary>
    internal static void RestoreRun(Trainer trainer, SafeTensorsFile file, Func<string, JsonNode> state)
    {
        trainer.Optimizer.LoadState(n => file.Tensors.ContainsKey(n) ? file.Load(n) : null, state("optimizer_step").GetValue<long>());
        using (var rng = file.Load("rng"))
        {
            set_rng_state(rng);
        }
        if (trainer.Precision.Scaler is { } scaler)
        {
            scaler.Restore(state("loss_scale").GetValue<double>(), state("loss_scale_clean_steps").GetValue<int>(), state("loss_scale_skipped").GetValue<long>());
        }
        trainer.StepsDone = state("step").GetValue<int>();
        trainer.DataPosition = (state("data_epoch").GetValue<int>(), state("data_batch").GetValue<int>());
    }

    private static IEnumerable<string> Complete(string folder) =>
        Directory.EnumerateDirectories(folder, "step-*")
            .Where(d => File.Exists(Path.Combine(d, Json)))
            .Order(StringComparer.Ordinal);
}
