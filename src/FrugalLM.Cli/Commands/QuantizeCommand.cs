using System.CommandLine;
using System.Globalization;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Quantization;

namespace FrugalLM.Cli.Commands;

/// <summary><c>frugal quantize</c>: write an int8 copy of a model folder in bitsandbytes' 8-bit layout.</summary>
internal static class QuantizeCommand
{
    private static readonly string[] Companions =
        ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "The model folder to quantize", Required = true };
        var to = new Option<string>("--to") { Description = "Target format: int8 (LLM.int8(), bitsandbytes' HF layout)", DefaultValueFactory = _ => "int8" };
        var output = new Option<string>("--out") { Description = "Folder for the quantized model", Required = true };
        var threshold = new Option<double>("--int8-threshold") { Description = "Outlier threshold recorded in quantization_config (used at run time)", DefaultValueFactory = _ => 6.0 };
        var skip = new Option<string>("--int8-skip") { Description = "Comma-separated linear layers kept in full precision", DefaultValueFactory = _ => "lm_head" };
        var command = new Command("quantize", "Write an int8 copy of a model: int8 weight + fp32 SCB per linear layer, quantization_config in config.json")
        {
            model, to, output, threshold, skip,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            if (pr.GetValue(to) != "int8")
            {
                throw new ArgumentException($"--to must be int8 (got '{pr.GetValue(to)}')");
            }
            TorchRuntime.Initialize();
            var folder = pr.GetValue(model)!;
            var outFolder = pr.GetValue(output)!;
            var options = new Int8Options
            {
                Threshold = pr.GetValue(threshold),
                Skip = pr.GetValue(skip)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
            };
            using var checkpoint = HfCheckpoint.Open(folder);
            using var llama = checkpoint.CreateModel();
            var quantized = Int8Quantization.Apply(llama, options);
            var dtype = HfCheckpoint.ParseDtype(checkpoint.TorchDtype);
            HfCheckpoint.Save(llama, outFolder, dtype, checkpoint.Generation, extraConfig: Int8Checkpoint.ConfigFields(options));
            foreach (var name in Companions)
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
            long before = DirectoryBytes(folder, "*.safetensors"), after = DirectoryBytes(outFolder, "*.safetensors");
            Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"quantized {quantized.Count} linear layers to {Int8Checkpoint.Describe(options)}; weights {before / 1048576.0:F1} MiB -> {after / 1048576.0:F1} MiB in {outFolder}"));
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static long DirectoryBytes(string folder, string pattern) =>
        Directory.EnumerateFiles(folder, pattern).Sum(f => new FileInfo(f).Length);
}
