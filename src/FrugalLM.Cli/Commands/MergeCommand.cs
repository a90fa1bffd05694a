using System.CommandLine;
using FrugalLM.IO;
using FrugalLM.Lora;
using FrugalLM.Models.Llama;
using FrugalLM.Native;

namespace FrugalLM.Cli.Commands;

/// <summary><c>frugal merge</c>: fold a LoRA adapter into its base and write a plain Hugging Face folder.</summary>
internal static class MergeCommand
{
    private static readonly string[] Companions =
        ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json"];

    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "The base model folder", Required = true };
        var adapter = new Option<string>("--adapter") { Description = "The PEFT LoRA adapter folder", Required = true };
        var output = new Option<string>("--out") { Description = "Folder for the merged model", Required = true };
        var saveDtype = new Option<string?>("--save-dtype") { Description = "float32, bfloat16 or float16 (default: the base's torch_dtype)" };
        var command = new Command("merge", "Merge a LoRA adapter into its base model (W + B·A·alpha/r, in fp32) and save an HF folder")
        {
            model, adapter, output, saveDtype,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            TorchRuntime.Initialize();
            var folder = pr.GetValue(model)!;
            var outFolder = pr.GetValue(output)!;
            using var checkpoint = HfCheckpoint.Open(folder);
            using var llama = new LlamaForCausalLM(checkpoint.Config);
            checkpoint.LoadInto(llama);
            var lora = LoraAdapter.Load(pr.GetValue(adapter)!, llama);
            CliRunner.Status($"merging {lora}");
            lora.MergeAndUnload();
            var dtype = HfCheckpoint.ParseDtype(pr.GetValue(saveDtype) ?? checkpoint.Config.TorchDtype);
            HfCheckpoint.Save(llama, outFolder, dtype, checkpoint.Generation);
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
            Console.Out.WriteLine($"merged model written to {outFolder}");
            return ExitCodes.Ok;
        }));
        return command;
    }
}
