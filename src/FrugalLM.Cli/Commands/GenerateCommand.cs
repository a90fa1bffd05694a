using System.CommandLine;
using System.Globalization;
using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Tokenization;
using static TorchSharp.torch;

namespace FrugalLM.Cli.Commands;

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
        var precision = new Option<string>("--precision") { Description = "Weights and compute: fp32 or bf16 (bf16 halves weight memory; AVX-512 BF16 computes it natively)", DefaultValueFactory = _ => "fp32" };
        var threads = new Option<int?>("--threads") { Description = "CPU threads (default: all cores)" };
        var command = new Command("generate", "Continue a prompt, streaming the text to stdout (stats go to stderr)")
        {
            model, prompt, maxNew, temperature, topK, topP, seed, stop, precision, threads,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            TorchRuntime.Initialize(pr.GetValue(threads));
            var dtype = pr.GetValue(precision) switch
            {
                "fp32" => ScalarType.Float32,
                "bf16" => ScalarType.BFloat16,
                var other => throw new ArgumentException($"--precision must be fp32 or bf16 (got '{other}')"),
            };
            var folder = pr.GetValue(model)!;
            var tokenizer = HfTokenizer.Load(folder);
            using var checkpoint = HfCheckpoint.Open(folder);
            var text = pr.GetValue(prompt) ?? "";
            int promptTokens = Math.Max(1, tokenizer.Encode(text, addBos: tokenizer.AddBosToken).Count);
            var report = MemoryReport.Predict(checkpoint.Config, Path.GetFileName(Path.TrimEndingDirectorySeparator(folder)), RunMode.Generate,
                dtype == ScalarType.BFloat16 ? Precision.Bf16 : Precision.Fp32, 1,
                Math.Min(checkpoint.Config.MaxPositionEmbeddings, promptTokens + Math.Max(0, pr.GetValue(maxNew))), 1);
            using var llama = new Models.Llama.LlamaForCausalLM(checkpoint.Config, dtype);
            checkpoint.LoadInto(llama);
            llama.eval();
            var defaults = checkpoint.Generation;
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
            CliRunner.Status(report.ComparisonLine(MemoryProbe.PeakBytes));
            return ExitCodes.Ok;
        }));
        return command;
    }
}
