using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using FrugalLM.Inference;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Training;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>frugal eval</c>: held-out loss and perplexity of a model (with an optional adapter) on a corpus, and for
/// prompt/completion data also the exact-match accuracy of greedy completions.
/// </summary>
internal static class EvalCommand
{
    // Tokens per chunk of the held-out loss; the memory estimate of the run reads the same number.
    private const int LossChunk = 1024;

    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "Hugging Face model folder", Required = true };
        var adapter = new Option<string?>("--adapter") { Description = "PEFT LoRA adapter folder to apply" };
        var data = new Option<string>("--data") { Description = "Text, JSONL (\"text\" or \"prompt\" + \"completion\") or a folder", Required = true };
        var all = new Option<bool>("--all") { Description = "Evaluate every sequence of the data, not only the held-out split that training leaves out" };
        var batch = new Option<int>("--batch") { Description = "Sequences per batch", DefaultValueFactory = _ => 8 };
        var seq = new Option<int>("--seq") { Description = "Tokens per sequence", DefaultValueFactory = _ => 256 };
        var precision = new Option<string>("--precision") { Description = "fp32, bf16 or fp16 (storage only on this CPU)", DefaultValueFactory = _ => "fp32" };
        var maxBatches = new Option<int>("--max-batches") { Description = "Stop after N batches (0: all)", DefaultValueFactory = _ => 0 };
        var maxNew = new Option<int>("--max-new-tokens") { Description = "Longest greedy completion for accuracy", DefaultValueFactory = _ => 24 };
        var json = new Option<bool>("--json") { Description = "Print the result as JSON" };
        var threads = new Option<int?>("--threads") { Description = "CPU threads (default: all cores)" };
        var quantize = new QuantizeOptions();
        var offload = new OffloadOptions();
        var device = DeviceOption.Create();
        var command = new Command("eval", "Held-out loss, perplexity and (for prompt/completion data) exact-match accuracy")
        {
            model, adapter, data, all, batch, seq, precision, maxBatches, maxNew, json, threads, device,
        };
        foreach (var option in quantize.All.Concat(offload.All))
        {
            command.Options.Add(option);
        }
        command.SetAction(pr => CliRunner.Run(() =>
        {
            DeviceOption.Require(pr.GetValue(device));
            TorchRuntime.Initialize(pr.GetValue(threads));
            int sequence = pr.GetValue(seq);
            using var loaded = InferenceModel.Open(pr.GetValue(model)!, pr.GetValue(adapter), PlanNames.ParsePrecision(pr.GetValue(precision)!),
                pr.GetValue(batch), _ => sequence, quantize.Read(pr), pr.GetValue(offload.Offload), offload.ReadBudget(pr), LossChunk);
            var tokenizer = loaded.Tokenizer;
            int eos = tokenizer.EosTokenIds.Count > 0 ? tokenizer.EosTokenIds[0] : throw new ArgumentException("the tokenizer defines no EOS token");
            var corpus = TrainingData.Load(pr.GetValue(data)!, t => tokenizer.Encode(t, addBos: false), eos, tokenizer.PadTokenId ?? eos, sequence);
            var batches = pr.GetValue(all) ? corpus.AllBatches(pr.GetValue(batch)) : corpus.EvalBatches(pr.GetValue(batch));
            // The head and loss run 1024 tokens at a time: evaluation never holds the whole batch's fp32 logits.
            var (loss, tokens) = Evaluation.MeanLoss(loaded.Model, batches, LossChunk, pr.GetValue(maxBatches));
            var result = new JsonObject
            {
                ["model"] = pr.GetValue(model),
                ["adapter"] = pr.GetValue(adapter),
                ["precision"] = pr.GetValue(precision),
                ["quantize"] = pr.GetValue(quantize.Quantize),
                ["split"] = pr.GetValue(all) ? "all" : "held-out",
                ["tokens"] = tokens,
                ["loss"] = loss,
                ["perplexity"] = Math.Exp(loss),
            };
            var lines = new List<string>
            {
                string.Create(CultureInfo.InvariantCulture, $"{result["split"]} loss {loss:F4}, perplexity {Math.Exp(loss):F3} over {tokens:N0} tokens"),
            };
            if (corpus is PromptCompletionData pairs)
            {
                var examples = pr.GetValue(all) ? pairs.AllTexts : pairs.HeldOutTexts;
                var (correct, total) = Accuracy(loaded, examples, pr.GetValue(maxNew));
                result["exact_match"] = (double)correct / Math.Max(1, total);
                result["examples"] = total;
                lines.Add(string.Create(CultureInfo.InvariantCulture, $"exact-match accuracy {100.0 * correct / Math.Max(1, total):F1}% ({correct}/{total}, greedy)"));
            }
            result["peak_bytes"] = MemoryProbe.PeakBytes;
            if (pr.GetValue(json))
            {
                Console.Out.WriteLine(result.ToJsonString());
            }
            else
            {
                lines.ForEach(Console.Out.WriteLine);
            }
            if (loaded.Offload is { } streamed)
            {
                CliRunner.Status(OffloadOptions.StatsLine(streamed));
            }
            CliRunner.Status($"peak memory {MemoryProbe.Mib(MemoryProbe.PeakBytes)}");
            CliRunner.Status(loaded.Report.ComparisonLine(MemoryProbe.PeakBytes));
            return ExitCodes.Ok;
        }));
        return command;
    }

    /// <summary>
    /// Greedy completions compared with the expected ones: the generated text up to its first newline,
    /// trimmed, must equal the expected completion, trimmed.
    /// </summary>
    public static (int Correct, int Total) Accuracy(InferenceModel loaded, IReadOnlyList<(string Prompt, string Completion)> examples, int maxNewTokens)
    {
        var generator = new TextGenerator(loaded.Model, loaded.Tokenizer);
        int correct = 0;
        foreach (var (prompt, completion) in examples)
        {
            var output = generator.Generate(prompt, new SamplingOptions { Temperature = 0, MaxNewTokens = maxNewTokens }, ["\n"]).Text;
            if (output.Trim() == completion.Trim())
            {
                correct++;
            }
        }
        return (correct, examples.Count);
    }
}
