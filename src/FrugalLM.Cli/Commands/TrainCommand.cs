using System.CommandLine;
using System.Globalization;
using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Tokenization;
using FrugalLM.Training;
using Spectre.Console;
using static TorchSharp.torch;

namespace FrugalLM.Cli.Commands;

/// <summary><c>frugal train</c>: train from scratch (<c>--config</c>) or continue training (<c>--model</c>) on a text corpus.</summary>
internal static class TrainCommand
{
    private static readonly string[] TokenizerFiles =
        ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

    public static Command Create()
    {
        var model = new Option<string?>("--model") { Description = "Continue training this Hugging Face model folder" };
        var config = new Option<string?>("--config") { Description = "Train from scratch: an HF config.json describing the architecture" };
        var tokenizerOption = new Option<string?>("--tokenizer") { Description = "Tokenizer folder, or 'gpt2' (GPT-2 BPE, bundled); default: the model's, or gpt2 with --config" };
        var data = new Option<string>("--data") { Description = "Text file, JSONL file with a \"text\" field, or a folder of them", Required = true };
        var output = new Option<string>("--out") { Description = "Output folder: an HF model folder (weights, configs, tokenizer) and train_log.jsonl", Required = true };
        var steps = new Option<int>("--steps") { Description = "Optimizer steps", Required = true };
        var batch = new Option<int>("--batch") { Description = "Sequences per micro-batch", DefaultValueFactory = _ => 8 };
        var seq = new Option<int>("--seq") { Description = "Tokens per sequence", DefaultValueFactory = _ => 256 };
        var accumulation = new Option<int>("--grad-accum") { Description = "Micro-batches per optimizer step", DefaultValueFactory = _ => 1 };
        var lr = new Option<double>("--lr") { Description = "Peak learning rate (warm-up, then cosine decay to a tenth)", DefaultValueFactory = _ => 3e-4 };
        var warmup = new Option<int?>("--warmup") { Description = "Warm-up steps (default: 5% of --steps)" };
        var weightDecay = new Option<double>("--weight-decay") { Description = "AdamW weight decay (matrices and embeddings only)", DefaultValueFactory = _ => 0.1 };
        var clip = new Option<double>("--grad-clip") { Description = "Clip the global gradient norm; 0 = off", DefaultValueFactory = _ => 1.0 };
        var evalEvery = new Option<int>("--eval-every") { Description = "Held-out evaluation every N steps (and at the end)", DefaultValueFactory = _ => 0 };
        var evalBatches = new Option<int>("--eval-batches") { Description = "Held-out batches per evaluation; 0 = all", DefaultValueFactory = _ => 0 };
        var saveEvery = new Option<int>("--save-every") { Description = "Save the model every N steps (and at the end)", DefaultValueFactory = _ => 0 };
        var logEvery = new Option<int>("--log-every") { Description = "Print progress every N steps", DefaultValueFactory = _ => 10 };
        var seed = new Option<int>("--seed") { Description = "Seed of weight initialization and data order", DefaultValueFactory = _ => 0 };
        var saveDtype = new Option<string>("--save-dtype") { Description = "Dtype of saved weights: float32, bfloat16 or float16", DefaultValueFactory = _ => "float32" };
        var samplePrompt = new Option<string?>("--sample-prompt") { Description = "Print a sample continuation of this prompt before and after training" };
        var threads = new Option<int?>("--threads") { Description = "CPU threads (default: all cores)" };
        var command = new Command("train", "Train a LLaMA model on a text corpus and save it as a Hugging Face folder")
        {
            model, config, tokenizerOption, data, output, steps, batch, seq, accumulation, lr, warmup, weightDecay, clip,
            evalEvery, evalBatches, saveEvery, logEvery, seed, saveDtype, samplePrompt, threads,
        };
        command.SetAction(pr => CliRunner.Run(() =>
        {
            TorchRuntime.Initialize(pr.GetValue(threads));
            var modelFolder = pr.GetValue(model);
            var configFile = pr.GetValue(config);
            if ((modelFolder is null) == (configFile is null))
            {
                throw new ArgumentException("give exactly one of --model (continue training) or --config (train from scratch)");
            }
            var outFolder = pr.GetValue(output)!;
            var savedAs = HfCheckpoint.ParseDtype(pr.GetValue(saveDtype)!);
            Directory.CreateDirectory(outFolder);

            var tokenizerSource = pr.GetValue(tokenizerOption) ?? modelFolder ?? "gpt2";
            InstallTokenizer(tokenizerSource, outFolder);
            var tokenizer = HfTokenizer.Load(outFolder);
            int eos = tokenizer.EosTokenIds.Count > 0
                ? tokenizer.EosTokenIds[0]
                : throw new ArgumentException($"the tokenizer in {tokenizerSource} defines no EOS token to separate documents");

            // The architecture first (headers only), then the data, then the runtime baseline, and only then the
            // weights: the baseline is everything the run holds besides the model.
            using var checkpoint = modelFolder is null ? null : HfCheckpoint.Open(modelFolder);
            var architecture = checkpoint?.Config ?? LlamaConfig.Load(configFile!) with
            {
                BosTokenId = tokenizer.BosTokenId,
                EosTokenIds = tokenizer.EosTokenIds,
                PadTokenId = tokenizer.PadTokenId,
            };
            if (architecture.VocabSize < tokenizer.VocabSize)
            {
                throw new ArgumentException($"the model's vocab_size ({architecture.VocabSize}) is smaller than the tokenizer's ({tokenizer.VocabSize})");
            }
            int sequence = pr.GetValue(seq);
            if (sequence > architecture.MaxPositionEmbeddings)
            {
                throw new ArgumentException($"--seq {sequence} exceeds the model's max_position_embeddings ({architecture.MaxPositionEmbeddings})");
            }
            CliRunner.Status($"model: {architecture}");

            var corpus = LoadCorpus(pr.GetValue(data)!, tokenizer, eos, sequence);
            CliRunner.Status(string.Create(CultureInfo.InvariantCulture,
                $"data: {corpus.Documents} documents, {corpus.TokenCount:N0} tokens, {corpus.TrainBlocks} training and {corpus.EvalBlocks} held-out sequences of {sequence}"));

            var report = MemoryReport.Predict(architecture, Path.GetFileName(Path.TrimEndingDirectorySeparator(outFolder)), RunMode.Train, Precision.Fp32,
                pr.GetValue(batch), sequence, pr.GetValue(accumulation));
            CliRunner.Status(report.PredictionLine());

            using var llama = new LlamaForCausalLM(architecture);
            if (checkpoint is not null)
            {
                checkpoint.LoadInto(llama);
            }
            else
            {
                llama.InitializeWeights(pr.GetValue(seed));
            }
            var generation = checkpoint?.Generation ?? DefaultGeneration(tokenizer);
            var prompt = pr.GetValue(samplePrompt);
            if (prompt is not null)
            {
                Sample("before", llama, tokenizer, prompt);
            }
            var options = new TrainOptions
            {
                Steps = pr.GetValue(steps),
                MicroBatch = pr.GetValue(batch),
                GradientAccumulation = pr.GetValue(accumulation),
                LearningRate = pr.GetValue(lr),
                WarmupSteps = pr.GetValue(warmup),
                WeightDecay = pr.GetValue(weightDecay),
                GradClip = pr.GetValue(clip),
                EvalEvery = pr.GetValue(evalEvery),
                EvalBatches = pr.GetValue(evalBatches),
                SaveEvery = pr.GetValue(saveEvery),
                LogEvery = pr.GetValue(logEvery),
                Seed = pr.GetValue(seed),
            };
            options.Validate();
            generation.Save(outFolder);
            var trainer = new Trainer(llama, corpus, options);
            var result = RunWithProgress(trainer, options, _ => HfCheckpoint.Save(llama, outFolder, savedAs, generation), outFolder);
            if (prompt is not null)
            {
                Sample("after", llama, tokenizer, prompt);
            }
            CliRunner.Status(report.ComparisonLine(result.PeakBytes));
            Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"done: {result.Steps} steps in {result.Elapsed.TotalMinutes:F1} min; train loss {result.FinalLoss:F3}; held-out loss {result.EvalLoss:F3} (perplexity {result.EvalPerplexity:F2}); {result.TokensPerSecond:F0} tokens/s; peak memory {MemoryProbe.Mib(result.PeakBytes)}; saved to {outFolder}"));
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static TrainResult RunWithProgress(Trainer trainer, TrainOptions options, Action<int> save, string outFolder)
    {
        using var log = new StreamWriter(Path.Combine(outFolder, "train_log.jsonl"), append: false);
        void Record(TrainProgress p)
        {
            log.WriteLine(System.Text.Json.JsonSerializer.Serialize(p));
            log.Flush();
        }
        static string Line(TrainProgress p) => string.Create(CultureInfo.InvariantCulture,
            $"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4}{(p.EvalLoss is double e ? $" held-out {e:F4} (ppl {Math.Exp(e):F2})" : "")} lr {p.LearningRate:E2} grad-norm {p.GradNorm:F2} {p.TokensPerSecond:F0} tok/s mem {MemoryProbe.Mib(p.ResidentBytes)} ({p.Elapsed:hh\\:mm\\:ss})");
        if (!CliRunner.Interactive)
        {
            return trainer.Run(p =>
            {
                Console.Out.WriteLine(Line(p));
                Record(p);
            }, save);
        }
        TrainResult? result = null;
        AnsiConsole.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("training", maxValue: options.Steps);
                result = trainer.Run(p =>
                {
                    task.Value = p.Step;
                    task.Description = Markup.Escape(Line(p));
                    if (p.EvalLoss is not null)
                    {
                        AnsiConsole.WriteLine(Line(p));
                    }
                    Record(p);
                }, save);
            });
        return result!;
    }

    private static TokenCorpus LoadCorpus(string path, HfTokenizer tokenizer, int eos, int sequence)
    {
        Func<string, IReadOnlyList<int>> encode = text => tokenizer.Encode(text, addBos: false);
        if (!CliRunner.Interactive)
        {
            CliRunner.Status($"tokenizing {path} ...");
            return TokenCorpus.Load(path, encode, eos, sequence);
        }
        TokenCorpus? corpus = null;
        AnsiConsole.Progress().Start(ctx =>
        {
            var task = ctx.AddTask("tokenizing", maxValue: 1.0);
            corpus = TokenCorpus.Load(path, encode, eos, sequence, new Progress<double>(f => task.Value = f));
            task.Value = 1.0;
        });
        return corpus!;
    }

    private static void Sample(string label, LlamaForCausalLM model, HfTokenizer tokenizer, string prompt)
    {
        model.eval();
        var options = new SamplingOptions { MaxNewTokens = 40, Temperature = 0.8, TopK = 50, TopP = 0.95, Seed = 1 };
        var result = new TextGenerator(model, tokenizer).Generate(prompt, options);
        Console.Out.WriteLine($"sample {label}: {prompt}{result.Text.ReplaceLineEndings(" ")}");
        model.train();
    }

    private static GenerationConfig DefaultGeneration(HfTokenizer tokenizer) => new()
    {
        BosTokenId = tokenizer.BosTokenId,
        EosTokenIds = tokenizer.EosTokenIds,
        PadTokenId = tokenizer.PadTokenId,
        DoSample = true,
        Temperature = 0.8,
        TopK = 50,
        TopP = 0.95,
    };

    // The output folder must be self-contained: the tokenizer travels with the weights.
    private static void InstallTokenizer(string source, string outFolder)
    {
        if (source == "gpt2")
        {
            Gpt2TokenizerFiles.WriteTo(outFolder);
            return;
        }
        if (!Directory.Exists(source))
        {
            throw new ArgumentException($"tokenizer folder '{source}' not found (or pass --tokenizer gpt2)");
        }
        if (Path.GetFullPath(source) == Path.GetFullPath(outFolder))
        {
            return;
        }
        foreach (var name in TokenizerFiles)
        {
            var from = Path.Combine(source, name);
            if (File.Exists(from))
            {
                AtomicFile.Write(Path.Combine(outFolder, name), s =>
                {
                    using var input = File.OpenRead(from);
                    input.CopyTo(s);
                });
            }
        }
    }
}
