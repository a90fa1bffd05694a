using System.CommandLine;
using System.Globalization;
using FrugalLM.IO;
using FrugalLM.Lora;
using FrugalLM.Native;
using FrugalLM.Quantization;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>frugal merge</c>: fold a LoRA adapter into its base (LLaMA or OPT) and write a plain Hugging Face folder.
/// An int8 base (a folder written by <c>frugal quantize</c>) is dequantized, summed and requantized, written as
/// an int8 folder again, and the requantization error is printed.
/// </summary>
internal static class MergeCommand
{
    private static readonly string[] Companions =
        ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json"];

    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "The base model folder", Required = true };
        var adapter = new Option<string>("--adapter") { Description = "The PEFT LoRA adapter folder", Required = true };
        var output = new Option<string>("--out") { Description = "Folder for the merged model", Required = true };
        var saveDtype = new Option<string?>("--save-dtype") { Description = "float32, bfloat16 or float16 for the floating weights (default: the base's torch_dtype; int8 weights stay int8)" };
        var command = new Command("merge", "Merge a LoRA adapter into its base model (W + B·A·alpha/r, in fp32; an int8 base is requantized) and save an HF folder")
        {
            model, adapter, output, saveDtype,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            TorchRuntime.Initialize();
            var folder = pr.GetValue(model)!;
            var outFolder = pr.GetValue(output)!;
            using var checkpoint = HfCheckpoint.Open(folder);
            // The architecture the folder holds (LLaMA or OPT); a folder saved 8-bit loads with int8 layers.
            var int8 = Int8Checkpoint.Options(checkpoint);
            using var lm = checkpoint.CreateModel();
            var lora = LoraAdapter.Load(pr.GetValue(adapter)!, lm);
            CliRunner.Status($"merging {lora}");
            var report = lora.MergeAndUnload();
            var dtype = HfCheckpoint.ParseDtype(pr.GetValue(saveDtype) ?? checkpoint.TorchDtype);
            // An int8 base stays int8: the same layout and quantization_config as frugal quantize writes.
            HfCheckpoint.Save(lm, outFolder, dtype, checkpoint.Generation, extraConfig: int8 is null ? null : Int8Checkpoint.ConfigFields(int8));
            foreach (var name in Companions.Where(n => n != "generation_config.json"))
            {
                var from = Path.Combine(folder, name);
                if (File.Exists(from))
                {
                    AtomicFile.Write(Path.Combine(outFolder, name), s =>
                    {
                        using var input = File.OpenRead(from);
                        input.CopyTo(s);
                    });
                }
            }
            if (report.Requantized.Count > 0)
            {
                var worst = report.Requantized.MaxBy(r => r.RelativeError)!;
                Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"requantized {report.Requantized.Count} int8 layers: relative weight error (Frobenius) max {report.MaxRelativeError:E2} ({worst.Path}), mean {report.MeanRelativeError:E2}"));
            }
            Console.Out.WriteLine($"merged adapter '{report.Adapter}' into {report.Layers} layers; {(int8 is null ? "" : Int8Checkpoint.Describe(int8) + " ")}model written to {outFolder}");
            return ExitCodes.Ok;
        }));
        return command;
    }
}
