using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.IO;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Sharding;

/// <summary>
/// What a consolidated sharded checkpoint becomes, recorded in its index so that
/// <see cref="ShardedCheckpoint.Consolidate"/> needs neither the model nor the ranks.
/// </summary>
/// <param name="Kind"><see cref="ShardedCheckpoint.ModelKind"/> (a full HF model folder) or <see cref="ShardedCheckpoint.AdapterKind"/> (a PEFT adapter folder).</param>
/// <param name="Dtype">Dtype the weights are saved in (what <c>--save-dtype</c> gives a full model; float32 for adapters).</param>
/// <param name="Tensors">The output file's tensors in the order the run's own save lists them: output key and the model
/// parameter (a name inside some flat vector) it comes from.</param>
/// <param name="WriteConfigs">Writes the run's configuration files into a folder (config.json and generation_config.json,
/// or adapter_config.json); they are copied into the checkpoint and from there into the consolidated folder.</param>
public sealed record ConsolidationTarget(string Kind, ScalarType Dtype, IReadOnlyList<(string Key, string Parameter)> Tensors, Action<string> WriteConfigs);

/// <summary>
/// Resumable checkpoints of an FSDP run: <c>step-NNNNNN/</c> with one <c>rank-0000r-of-0000W.safetensors</c> per rank
/// (its fp32 master shards, its optimizer state shards, its RNG, and in the header metadata the step, data position,
/// optimizer step and loss scaler) and <c>index.json</c> (world size, strategy, precision, each flat vector's layout:
/// parameters with shapes and offsets, padding), plus the run's configuration files for consolidation. Each rank writes
/// its own file atomically into a temporary folder; rank 0 writes the index last, after every rank's file is on disk,
/// and renames the folder into place, so a checkpoint without its index is incomplete and never resumed from.
/// </summary>
/// <remarks>
/// All ranks must see the same file system (one machine, or a shared folder). A checkpoint resumes only at the world
/// size that wrote it, because a shard is a fixed slice of each padded flat vector; at another world size,
/// <see cref="Consolidate"/> it into a full folder and continue training from that.
/// </remarks>
public static class ShardedCheckpoint
{
    /// <summary>The index file's name.</summary>
    public const string IndexFile = "index.json";

    /// <summary><see cref="ConsolidationTarget.Kind"/> of a full run: an HF model folder.</summary>
    public const string ModelKind = "model";

    /// <summary><see cref="ConsolidationTarget.Kind"/> of a LoRA run: a PEFT adapter folder.</summary>
    public const string AdapterKind = "lora-adapter";

    private const string Format = "frugal-sharded-checkpoint";
    private const int Version = 1;
    private const string MasterPrefix = "master.";

    /// <summary>Rank <paramref name="rank"/>'s file name in a checkpoint of <paramref name="world"/> ranks.</summary>
    public static string RankFile(int rank, int world) => string.Create(CultureInfo.InvariantCulture, $"rank-{rank:D5}-of-{world:D5}.safetensors");

    /// <summary>
    /// Writes this rank's part of the checkpoint of <paramref name="trainer"/>'s current step under
    /// <paramref name="folder"/>; every rank must call it. Returns the checkpoint's path.
    /// </summary>
    /// <param name="trainer">The trainer (its step, data position, optimizer and precision).</param>
    /// <param name="sharded">The trainer's sharded model.</param>
    /// <param name="folder">The checkpoints folder (<c>OUT/checkpoints</c>); the two newest complete checkpoints are kept.</param>
    /// <param name="target">What consolidation makes of it (null: the index records no output, and consolidation refuses).</param>
    public static string Save(Trainer trainer, ShardedModel sharded, string folder, ConsolidationTarget? target)
    {
        var c = sharded.Collectives;
        var name = string.Create(CultureInfo.InvariantCulture, $"step-{trainer.StepsDone:D6}");
        var final = Path.Combine(folder, name);
        // One temporary folder that every rank writes into: only a complete checkpoint ever carries the final name.
        var temp = Path.Combine(folder, $".{name}.tmp");
        if (c.Rank == 0)
        {
            Directory.CreateDirectory(folder);
            if (Directory.Exists(temp))
            {
                Directory.Delete(temp, recursive: true);
            }
            Directory.CreateDirectory(temp);
        }
        c.Barrier();
        var metadata = State(trainer).ToDictionary(kv => kv.Key, kv => kv.Value?.ToJsonString() ?? "null", StringComparer.Ordinal);
        metadata["rank"] = c.Rank.ToString(CultureInfo.InvariantCulture);
        metadata["world_size"] = c.WorldSize.ToString(CultureInfo.InvariantCulture);
        using (var scope = NewDisposeScope())
        {
            var tensors = new List<(string, Tensor)>();
            foreach (var flat in sharded.Vectors)
            {
                tensors.Add((MasterPrefix + flat.Name, flat.Shard.detach()));
            }
            tensors.AddRange(trainer.Optimizer.StateTensors());
            tensors.Add(("rng", get_rng_state()));
            SafeTensors.Write(Path.Combine(temp, RankFile(c.Rank, c.WorldSize)), tensors, metadata);
        }
        c.Barrier(); // every rank's file is on disk before the index says the checkpoint is complete
        if (c.Rank == 0)
        {
            var ranks = Enumerable.Range(0, c.WorldSize).Select(r => RankFile(r, c.WorldSize)).ToHashSet(StringComparer.Ordinal);
            target?.WriteConfigs(temp);
            var configs = Directory.EnumerateFiles(temp).Select(f => Path.GetFileName(f)!)
                .Where(f => !ranks.Contains(f) && !f.StartsWith('.')).Order(StringComparer.Ordinal).ToList();
            var index = Index(trainer, sharded, target, configs);
            AtomicFile.WriteText(Path.Combine(temp, IndexFile), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            if (Directory.Exists(final))
            {
                Directory.Delete(final, recursive: true);
            }
            Directory.Move(temp, final);
            AtomicFile.SyncFolder(folder);
            foreach (var old in Complete(folder).SkipLast(2))
            {
                Directory.Delete(old, recursive: true);
            }
        }
        c.Barrier(); // no rank runs ahead into the next step (and perhaps the next checkpoint) before this one is in place
        return final;
    }

    /// <summary>The newest complete checkpoint (one with its index) under <paramref name="folder"/>, or null.</summary>
    public static string? Latest(string folder) => Directory.Exists(folder) ? Complete(folder).LastOrDefault() : null;

    /// <summary>True when <paramref name="checkpoint"/> is a sharded checkpoint folder (it has an index).</summary>
    public static bool IsSharded(string checkpoint) => File.Exists(Path.Combine(checkpoint, IndexFile));

    /// <summary>
    /// Restores <paramref name="trainer"/> (built exactly as for the original run, at the same world size) from
    /// <paramref name="checkpoint"/>: this rank's shards, optimizer states, RNG, loss scaler, step and data position;
    /// every rank must call it (the root unit is gathered again at the end).
    /// </summary>
    /// <exception cref="CheckpointFormatException">The checkpoint is incomplete, of another world size or precision, or its
    /// flat vectors differ from this run's (another model, LoRA or sharding setting).</exception>
    public static void Load(Trainer trainer, ShardedModel sharded, string checkpoint)
    {
        var c = sharded.Collectives;
        var index = ReadIndex(checkpoint);
        var indexPath = Path.Combine(checkpoint, IndexFile);
        int world = index["world_size"]!.GetValue<int>();
        if (world != c.WorldSize)
        {
            throw new CheckpointFormatException(checkpoint,
                $"this sharded checkpoint was written by {world} rank(s) and cannot be resumed by {c.WorldSize}: each rank's file holds a fixed slice of every flat vector. "
                + $"Resume with 'frugal launch -n {world}', or turn it into a full folder with 'frugal checkpoint consolidate {checkpoint} --out FOLDER' and train from that (--model FOLDER; the optimizer state starts afresh)");
        }
        var mode = index["precision"]!.GetValue<string>();
        if (mode != trainer.Precision.Mode.ToString())
        {
            throw new CheckpointFormatException(indexPath, $"checkpoint was written with precision {mode}, the run uses {trainer.Precision.Mode}");
        }
        var optimizer = index["optimizer_format"]!.GetValue<string>();
        if (optimizer != trainer.Optimizer.Format.ToString())
        {
            throw new CheckpointFormatException(indexPath, $"checkpoint holds {optimizer} optimizer moments, the run uses {trainer.Optimizer.Format}");
        }
        var vectors = index["vectors"]!.AsArray().Select(v => v!.AsObject()).ToDictionary(v => v["name"]!.GetValue<string>(), StringComparer.Ordinal);
        var mine = sharded.Vectors;
        var problems = new List<string>();
        foreach (var flat in mine)
        {
            if (!vectors.TryGetValue(flat.Name, out var saved))
            {
                problems.Add($"this run's flat vector {flat.Name} is not in the checkpoint");
            }
            else if (saved["elements"]!.GetValue<long>() != flat.Count || saved["shard_elements"]!.GetValue<long>() != flat.ShardSize)
            {
                problems.Add($"{flat.Name} has {saved["elements"]} elements in the checkpoint, {flat.Count} in this run");
            }
        }
        problems.AddRange(vectors.Keys.Except(mine.Select(f => f.Name)).Select(n => $"the checkpoint's flat vector {n} is not in this run"));
        if (problems.Count > 0)
        {
            throw new CheckpointFormatException(indexPath, $"the checkpoint does not match this run's model (another model, LoRA or target setting?): {string.Join("; ", problems.Take(5))}");
        }
        using var file = SafeTensorsFile.Open(Path.Combine(checkpoint, RankFile(c.Rank, c.WorldSize)));
        using (no_grad())
        {
            foreach (var flat in mine)
            {
                file.CopyTo(MasterPrefix + flat.Name, flat.Shard);
            }
        }
        var state = file.Metadata.Where(kv => kv.Key != "format").ToDictionary(kv => kv.Key, kv => JsonNode.Parse(kv.Value), StringComparer.Ordinal);
        TrainingCheckpoint.RestoreRun(trainer, file, n => state[n]!);
        sharded.SyncWeights(); // the root unit stays gathered: refresh it from the loaded shards
    }

    /// <summary>Reads a checkpoint's index; a folder without one is an incomplete (or not a sharded) checkpoint.</summary>
    public static JsonObject ReadIndex(string checkpoint)
    {
        var path = Path.Combine(checkpoint, IndexFile);
        if (!File.Exists(path))
        {
            throw new CheckpointFormatException(checkpoint, Directory.Exists(checkpoint)
                ? $"no {IndexFile}: not a sharded checkpoint, or an incomplete one (rank 0 writes the index last)"
                : "folder not found");
        }
        try
        {
            var index = JsonNode.Parse(File.ReadAllText(path))?.AsObject() ?? throw new CheckpointFormatException(path, "empty index");
            if (index["format"]?.GetValue<string>() != Format || index["version"]?.GetValue<int>() != Version)
            {
                throw new CheckpointFormatException(path, $"not a version-{Version} {Format} index");
            }
            return index;
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            throw new CheckpointFormatException(path, $"malformed index ({e.Message})", e);
        }
    }

    /// <summary>
    /// Turns a sharded checkpoint into what the run itself saves: a full HF model folder (config.json,
    /// generation_config.json, model.safetensors with HF names, split as <see cref="HfCheckpoint.Save"/> splits) or a
    /// PEFT adapter folder; in one process, no MPI. Flat vectors are assembled one at a time from the ranks' files (memory
    /// mapped), so it holds one unit's vector, never the whole model. The weights are bitwise what rank 0 would save at
    /// that step (the same fp32 masters, converted to the same dtype); the files too.
    /// </summary>
    /// <param name="checkpoint">The <c>step-NNNNNN</c> folder.</param>
    /// <param name="output">The folder to write (created if needed).</param>
    /// <returns>The weight files written.</returns>
    public static IReadOnlyList<string> Consolidate(string checkpoint, string output)
    {
        var index = ReadIndex(checkpoint);
        var indexPath = Path.Combine(checkpoint, IndexFile);
        var target = index["output"] as JsonObject
            ?? throw new CheckpointFormatException(indexPath, "the index names no output (written without a consolidation target)");
        int world = index["world_size"]!.GetValue<int>();
        var kind = target["kind"]!.GetValue<string>();
        var dtype = HfCheckpoint.ParseDtype(target["dtype"]!.GetValue<string>());
        var vectors = index["vectors"]!.AsArray().Select(v => v!.AsObject()).ToList();
        // parameter name -> (vector, shape, offset, count)
        var where = new Dictionary<string, (string Vector, long[] Shape, long Offset, long Count)>(StringComparer.Ordinal);
        foreach (var v in vectors)
        {
            foreach (var p in v["parameters"]!.AsArray().Select(p => p!.AsObject()))
            {
                where[p["name"]!.GetValue<string>()] = (v["name"]!.GetValue<string>(), p["shape"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray(),
                    p["offset"]!.GetValue<long>(), p["elements"]!.GetValue<long>());
            }
        }
        var tensors = target["tensors"]!.AsArray().Select(t => (Key: t![0]!.GetValue<string>(), Parameter: t[1]!.GetValue<string>())).ToList();
        var missing = tensors.Where(t => !where.ContainsKey(t.Parameter)).Select(t => t.Parameter).ToList();
        if (missing.Count > 0)
        {
            throw new CheckpointFormatException(indexPath,
                $"{missing.Count} saved tensor(s) are not trainable and so not in the shards (frozen weights are not checkpointed): {string.Join(", ", missing.Take(5))}");
        }
        var files = Enumerable.Range(0, world).Select(r => SafeTensorsFile.Open(Path.Combine(checkpoint, RankFile(r, world)))).ToList();
        try
        {
            Directory.CreateDirectory(output);
            var shardSizes = vectors.ToDictionary(v => v["name"]!.GetValue<string>(), v => v["shard_elements"]!.GetValue<long>(), StringComparer.Ordinal);
            long elementSize = dtype == ScalarType.Float32 ? 4 : 2;
            var plan = kind == ModelKind
                ? HfCheckpoint.PlanWeightFiles(tensors.Select(t => (t.Key, where[t.Parameter].Count * elementSize)).ToList())
                : kind == AdapterKind
                    ? new WeightFilePlan([(Lora.LoraAdapter.WeightsFile, tensors.Select(t => t.Key).ToList())], tensors.Sum(t => where[t.Parameter].Count * 4))
                    : throw new CheckpointFormatException(indexPath, $"unknown output kind '{kind}'");
            var source = tensors.ToDictionary(t => t.Key, t => t.Parameter, StringComparer.Ordinal);
            var written = new List<string>();
            foreach (var (file, keys) in plan.Files)
            {
                var layout = keys.Select(k => new SafeTensorLayout(k, dtype, where[source[k]].Shape)).ToList();
                SafeTensors.Write(Path.Combine(output, file), layout, null, (_, put) =>
                {
                    // One flat vector at a time, in the checkpoint's order; each is read once per output file.
                    foreach (var group in keys.GroupBy(k => where[source[k]].Vector))
                    {
                        using var scope = NewDisposeScope();
                        long shard = shardSizes[group.Key];
                        var whole = empty(shard * world, ScalarType.Float32);
                        for (int r = 0; r < world; r++)
                        {
                            files[r].CopyTo(MasterPrefix + group.Key, whole.narrow(0, r * shard, shard));
                        }
                        foreach (var key in group)
                        {
                            var (_, shape, offset, count) = where[source[key]];
                            put(key, whole.narrow(0, offset, count).view(shape));
                        }
                    }
                });
                written.Add(file);
            }
            written.AddRange(HfCheckpoint.WriteWeightIndex(output, plan));
            foreach (var config in target["configs"]!.AsArray().Select(n => n!.GetValue<string>()))
            {
                var from = Path.Combine(checkpoint, config);
                AtomicFile.Write(Path.Combine(output, config), s =>
                {
                    using var input = File.OpenRead(from);
                    input.CopyTo(s);
                });
            }
            return written;
        }
        finally
        {
            foreach (var f in files)
            {
                f.Dispose();
            }
        }
    }

    // Step, data position, optimizer step, precision and loss scaler: what TrainingCheckpoint's state.json holds.
    private static Dictionary<string, JsonNode?> State(Trainer trainer)
    {
        var (epoch, batch) = trainer.DataPosition;
        var scaler = trainer.Precision.Scaler;
        return new Dictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["step"] = trainer.StepsDone,
            ["data_epoch"] = epoch,
            ["data_batch"] = batch,
            ["optimizer_step"] = trainer.Optimizer.StepCount,
            ["precision"] = JsonValue.Create(trainer.Precision.Mode.ToString()),
            ["loss_scale"] = scaler?.Scale,
            ["loss_scale_clean_steps"] = scaler?.CleanSteps,
            ["loss_scale_skipped"] = scaler?.SkippedSteps,
        };
    }

    private static JsonObject Index(Trainer trainer, ShardedModel sharded, ConsolidationTarget? target, IReadOnlyList<string> configs)
    {
        var c = sharded.Collectives;
        var index = new JsonObject
        {
            ["format"] = Format,
            ["version"] = Version,
            ["world_size"] = c.WorldSize,
            ["strategy"] = Planning.PlanNames.Format(sharded.Strategy),
            ["optimizer_format"] = trainer.Optimizer.Format.ToString(),
            ["files"] = new JsonArray(Enumerable.Range(0, c.WorldSize).Select(r => (JsonNode?)RankFile(r, c.WorldSize)).ToArray()),
        };
        foreach (var (key, value) in State(trainer))
        {
            index[key] = value;
        }
        var vectors = new JsonArray();
        foreach (var flat in sharded.Vectors)
        {
            long padded = flat.ShardSize * c.WorldSize;
            vectors.Add(new JsonObject
            {
                ["name"] = flat.Name,
                ["unit"] = flat.Name[..flat.Name.IndexOf('/', StringComparison.Ordinal)],
                ["elements"] = flat.Count,
                ["padded_elements"] = padded,
                ["padding"] = padded - flat.Count,
                ["shard_elements"] = flat.ShardSize,
                ["compute_dtype"] = HfCheckpoint.DtypeName(flat.ComputeDtype),
                ["parameters"] = new JsonArray(flat.Layout.Select(p => (JsonNode?)new JsonObject
                {
                    ["name"] = p.Name,
                    ["shape"] = new JsonArray(p.Shape.Select(d => (JsonNode?)d).ToArray()),
                    ["offset"] = p.Offset,
                    ["elements"] = p.Count,
                }).ToArray()),
            });
        }
        index["vectors"] = vectors;
        if (target is not null)
        {
            index["output"] = new JsonObject
            {
                ["kind"] = target.Kind,
                ["dtype"] = HfCheckpoint.DtypeName(target.Dtype),
                ["tensors"] = new JsonArray(target.Tensors.Select(t => (JsonNode?)new JsonArray(t.Key, t.Parameter)).ToArray()),
                ["configs"] = new JsonArray(configs.Select(f => (JsonNode?)f).ToArray()),
            };
        }
        return index;
    }

    private static IEnumerable<string> Complete(string folder) =>
        Directory.EnumerateDirectories(folder, "step-*")
            .Where(IsSharded)
            .Order(StringComparer.Ordinal);
}
