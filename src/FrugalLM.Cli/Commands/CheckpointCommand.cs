using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Sharding;

namespace FrugalLM.Cli.Commands;

/// <summary><c>frugal checkpoint consolidate</c>: turn a sharded (FSDP) checkpoint into a full HF folder or PEFT adapter, in one process.</summary>
internal static class CheckpointCommand
{
    private static readonly string[] TokenizerFiles =
        ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

    public static Command Create()
    {
        var checkpoint = new Argument<string>("checkpoint")
        {
            Description = "A sharded checkpoint (OUT/checkpoints/step-NNNNNN), or a folder of them (the newest complete one is taken)",
        };
        var output = new Option<string>("--out") { Description = "Folder to write: the HF model folder (or PEFT adapter folder of a LoRA run) the run would have saved at that step", Required = true };
        var consolidate = new Command("consolidate", "Merge the per-rank files of a sharded checkpoint into a full HF folder (no mpirun needed)")
        {
            checkpoint, output,
        };
        consolidate.SetAction(pr => CliRunner.Run(() =>
        {
            TorchRuntime.Initialize();
            var source = pr.GetValue(checkpoint)!;
            var outFolder = pr.GetValue(output)!;
            if (!ShardedCheckpoint.IsSharded(source) && Directory.Exists(source))
            {
                // A run folder or its checkpoints folder: the newest complete checkpoint in it.
                var folder = Directory.Exists(Path.Combine(source, "checkpoints")) ? Path.Combine(source, "checkpoints") : source;
                source = ShardedCheckpoint.Latest(folder) ?? source;
            }
            var clock = Stopwatch.StartNew();
            var written = ShardedCheckpoint.Consolidate(source, outFolder);
            // The tokenizer lives in the run folder (OUT), two levels above OUT/checkpoints/step-N.
            var run = Path.GetDirectoryName(Path.GetDirectoryName(Path.GetFullPath(Path.TrimEndingDirectorySeparator(source))));
            int copied = 0;
            foreach (var name in TokenizerFiles)
            {
                var from = run is null ? null : Path.Combine(run, name);
                if (from is not null && File.Exists(from) && Path.GetFullPath(outFolder) != run)
                {
                    AtomicFile.Write(Path.Combine(outFolder, name), s =>
                    {
                        using var input = File.OpenRead(from);
                        input.CopyTo(s);
                    });
                    copied++;
                }
            }
            long bytes = written.Sum(f => new FileInfo(Path.Combine(outFolder, f)).Length);
            Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"consolidated {source} into {outFolder}: {string.Join(", ", written)} ({MemoryProbe.Mib(bytes)}){(copied > 0 ? $", {copied} tokenizer file(s)" : "")} in {clock.Elapsed.TotalSeconds:F2} s"));
            return ExitCodes.Ok;
        }));
        return new Command("checkpoint", "Work with training checkpoints")
        {
            consolidate,
        };
    }
}
