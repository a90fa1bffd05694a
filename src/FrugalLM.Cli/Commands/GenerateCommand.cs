using System.CommandLine;
using System.Globalization;
using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Tokenization;
using static TorchSharp.torch;

namespace FrugalLM.Cli.Commands;

// The runtime has namespaces FrugalLM.Precision and FrugalLM.Checkpointing; these names mean the plan types.
using Checkpointing = FrugalLM.Planning.Checkpointing;
using Precision = FrugalLM.Planning.Precision;

/// <summary><c>frugal generate</c>: continue a prompt with a model folder.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Hugging Face model folder (config.json, *.safetensors, tokenizer files)", Required = true };
        var prompt = new Option<string>("--prompt") { Description = "Text to continue", DefaultValueFactory = _ => "" };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Tokens to generate at most", DefaultValueFactory = _ => 64 };
        var temperature = new Option<double?>("--temperature") { Description = "Sampling temperature; 0 = greedy (default: the folder's generation_config.json, else greedy)" };
        var topK = new Option<int?>("--top-k") { Description = "Sample among the k most likely tokens; 0 = all" };
        var topP = new Option<double?>("--top-p") { Description = "Nucleus sampling mass in (0, 1]; 1 = all" };
        var seed = new Option<long?>("--seed") { Description = "Sampling seed: the same seed prints the same text (default: random, printed)" };
        var stop = new Option<string[]>("--stop") { Description = "Stop before this string (repeatable)", AllowMultipleArgumentsPerToken = false };
        var precision = new Option<string>("--precision") { Description = "fp32; bf16 (half the weight memory, computed natively with AVX-512 BF16); fp16 (half the weight memory, the article's model.half(): this CPU has no fp16 arithmetic, so fp16 is a storage format and matmuls run in fp32)", DefaultValueFactory = _ => "fp32" };
        var threads = new Option<int?>("--threads") { Description = "CPU threads (default: all cores)" };
        var quantize = new QuantizeOptions();
        var offload = new OffloadOptions();
        var adapter = new Option<string?>("--adapter") { Description = "A PEFT LoRA adapter folder to apply (merged into fp32 weights; kept separate at 16 bits)" };
        var device = DeviceOption.Create();
        var command = new Command("generate", "Continue a prompt, streaming the text to stdout (stats go to stderr)")
        {
            model, adapter, prompt, maxNew, temperature, topK, topP, seed, stop, precision, threads, device,
        };
        foreach (var option in quantize.All.Concat(offload.All))
        {
            command.Options.Add(option);
        }
        command.SetAction(pr => CliRunner.Run(() =>
        {
            DeviceOption.Require(pr.GetValue(device));
            TorchRuntime.Initialize(pr.GetValue(threads));
            var text = pr.GetValue(prompt) ?? "";
            using var loaded = InferenceModel.Open(pr.GetValue(model)!, pr.GetValue(adapter), PlanNames.ParsePrecision(pr.GetValue(precision)!), 1,
                tokenizer => Math.Max(1, tokenizer.Encode(text, addBos: tokenizer.AddBosToken).Count) + Math.Max(0, pr.GetValue(maxNew)),
                quantize.Read(pr), pr.GetValue(offload.Offload), offload.ReadBudget(pr));
            var llama = loaded.Model;
            var tokenizer = loaded.Tokenizer;
            var report = loaded.Report;
            var defaults = loaded.Generation;
            bool sample = defaults?.DoSample ?? false;
            long chosenSeed = pr.GetValue(seed) ?? Random.Shared.NextInt64(1, 1_000_000);
            var options = new SamplingOptions
            {
                MaxNewTokens = pr.GetValue(maxNew),
                Temperature = pr.GetValue(temperature) ?? (sample ? defaults?.Temperature ?? 1.0 : 0.0),
                TopK = pr.GetValue(topK) ?? (sample ? defaults?.TopK ?? 0 : 0),
                TopP = pr.GetValue(topP) ?? (sample ? defaults?.TopP ?? 1.0 : 1.0),
                Seed = chosenSeed,
            };
            options.Validate();
            if (pr.GetValue(seed) is null && !options.IsGreedy)
            {
                CliRunner.Status($"seed {chosenSeed} (pass --seed {chosenSeed} to repeat)");
            }
            Console.Out.Write(text);
            var result = new TextGenerator(llama, tokenizer).Generate(text, options, pr.GetValue(stop), piece =>
            {
                Console.Out.Write(piece);
                Console.Out.Flush();
            });
            Console.Out.WriteLine();
            CliRunner.Status(string.Create(CultureInfo.InvariantCulture,
                $"[{result.NewTokens} tokens, stop: {result.StopReason}; prefill {result.PromptTokens} tokens {result.PrefillTime.TotalMilliseconds:F0} ms, decode {result.DecodeTokensPerSecond:F1} tokens/s; peak memory {MemoryProbe.Mib(MemoryProbe.PeakBytes)}]"));
            if (loaded.Offload is { } streamed)
            {
                CliRunner.Status(OffloadOptions.StatsLine(streamed));
            }
            CliRunner.Status(report.ComparisonLine(MemoryProbe.PeakBytes));
            return ExitCodes.Ok;
        }));
        return command;
    }
}
