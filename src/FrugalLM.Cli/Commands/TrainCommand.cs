using System.CommandLine;
using System.Globalization;
using FrugalLM.Distributed;
using FrugalLM.Inference;
using FrugalLM.Lora;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Sharding;
using FrugalLM.Tokenization;
using FrugalLM.Training;
using Spectre.Console;

namespace FrugalLM.Cli.Commands;

// The runtime has namespaces FrugalLM.Precision, FrugalLM.Checkpointing and FrugalLM.Sharding; these names mean the plan types.
using Checkpointing = FrugalLM.Planning.Checkpointing;
using Precision = FrugalLM.Planning.Precision;
using Sharding = FrugalLM.Planning.Sharding;

/// <summary><c>frugal train</c>: train from scratch (<c>--config</c>) or continue training (<c>--model</c>) on a corpus.</summary>
internal static class TrainCommand
{
    private static readonly string[] TokenizerFiles =
        ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

    public static Command Create()
    {
        var model = new Option<string?>("--model") { Description = "Continue training this Hugging Face model folder" };
        var config = new Option<string?>("--config") { Description = "Train from scratch: an HF config.json describing the architecture" };
        var tokenizerOption = new Option<string?>("--tokenizer") { Description = "Tokenizer folder, or 'gpt2' (GPT-2 BPE, bundled); default: the model's, or gpt2 with --config" };
        var data = new Option<string>("--data") { Description = "Text file, JSONL (\"text\", or \"prompt\" + \"completion\": loss on completions only), or a folder of them", Required = true };
        var output = new Option<string>("--out") { Description = "Output folder: an HF model folder (weights, configs, tokenizer), train_log.jsonl, checkpoints/", Required = true };
        var steps = new Option<int>("--steps") { Description = "Optimizer steps", Required = true };
        var batch = new Option<int>("--batch") { Description = "Sequences per micro-batch", DefaultValueFactory = _ => 8 };
        var seq = new Option<int>("--seq") { Description = "Tokens per sequence", DefaultValueFactory = _ => 256 };
        var accumulation = new Option<int>("--grad-accum") { Description = "Micro-batches per optimizer step (the loss is normalized over the step's tokens)", DefaultValueFactory = _ => 1 };
        var precision = new Option<string>("--precision") { Description = "fp32; bf16 or fp16 (16-bit compute, fp32 masters; fp16 adds loss scaling and, on a CPU, computes matmuls in fp32); bf16-pure (bf16 weights and optimizer, no masters)", DefaultValueFactory = _ => "fp32" };
        var gradCheckpointing = new Option<bool?>("--grad-checkpointing") { Description = "Keep only decoder-layer inputs and recompute the layers in backward (default: on with --quantize int8, as PEFT's prepare_model_for_kbit_training; off otherwise)" };
        var fp32NormsAndHead = new Option<bool?>("--fp32-norms-and-head") { Description = "With LoRA and 16-bit precision: keep norm weights and an untied LM head in fp32, everything else (embedding included) 16-bit (default: on with --quantize int8, the rest of PEFT's prepare_model_for_kbit_training without its fp32 up-cast of every weight)" };
        var checkpointEvery = new Option<int>("--checkpoint-every") { Description = "With --grad-checkpointing: layers per recomputed segment", DefaultValueFactory = _ => 1 };
        var lossChunk = new Option<int>("--loss-chunk") { Description = "Compute the LM head and loss over chunks of this many tokens, each chunk's gradients at once, never materializing all logits (0: all logits at once, as transformers)", DefaultValueFactory = _ => LossComputation.DefaultChunkTokens };
        var loraRank = new Option<int>("--lora-r") { Description = "LoRA rank: freeze the model and train adapters only (0: train every weight); the output is then a PEFT adapter folder", DefaultValueFactory = _ => 0 };
        var loraAlpha = new Option<double?>("--lora-alpha") { Description = "LoRA alpha: the update is B·A·alpha/r (default 2 x rank)" };
        var loraDropout = new Option<double>("--lora-dropout") { Description = "Dropout on the adapters' input", DefaultValueFactory = _ => 0.0 };
        var loraTargets = new Option<string>("--lora-targets") { Description = "Comma-separated module names (q_proj,v_proj,...) or all-linear", DefaultValueFactory = _ => "q_proj,v_proj" };
        var optimizer = new Option<string>("--optimizer") { Description = "adamw (fp32 moments; bf16 with --precision bf16-pure) or adamw8bit (block-wise 8-bit moments, ~2 bytes per parameter)", DefaultValueFactory = _ => "adamw" };
        var lr = new Option<double>("--lr") { Description = "Peak learning rate (warm-up, then cosine decay to a tenth)", DefaultValueFactory = _ => 3e-4 };
        var warmup = new Option<int?>("--warmup") { Description = "Warm-up steps (default: 5% of --steps)" };
        var weightDecay = new Option<double?>("--weight-decay") { Description = "AdamW weight decay of matrices and embeddings (default 0.1; 0 with LoRA, as PEFT's trainer)" };
        var clip = new Option<double>("--grad-clip") { Description = "Clip the global gradient norm; 0 = off", DefaultValueFactory = _ => 1.0 };
        var evalEvery = new Option<int>("--eval-every") { Description = "Held-out evaluation every N steps (and at the end)", DefaultValueFactory = _ => 0 };
        var evalBatches = new Option<int>("--eval-batches") { Description = "Held-out batches per evaluation; 0 = all", DefaultValueFactory = _ => 0 };
        var saveEvery = new Option<int>("--save-every") { Description = "Save the HF model folder every N steps (and at the end)", DefaultValueFactory = _ => 0 };
        var stateEvery = new Option<int>("--state-every") { Description = "Write a resumable checkpoint (weights, optimizer, scaler, RNG, data position) every N steps into OUT/checkpoints (under --fsdp: one file per rank plus index.json; frugal checkpoint consolidate turns it into a full folder)", DefaultValueFactory = _ => 0 };
        var resume = new Option<bool>("--resume") { Description = "Continue from the newest complete checkpoint in OUT/checkpoints (same arguments, and under --fsdp the same number of ranks, as the interrupted run)" };
        var logEvery = new Option<int>("--log-every") { Description = "Print progress every N steps", DefaultValueFactory = _ => 10 };
        var seed = new Option<int>("--seed") { Description = "Seed of weight initialization and data order", DefaultValueFactory = _ => 0 };
        var saveDtype = new Option<string>("--save-dtype") { Description = "Dtype of saved weights: float32, bfloat16 or float16", DefaultValueFactory = _ => "float32" };
        var samplePrompt = new Option<string?>("--sample-prompt") { Description = "Print a sample continuation of this prompt before and after training" };
        var threads = new Option<int?>("--threads") { Description = "CPU threads (default: all cores; under frugal launch, the cores shared among the ranks)" };
        var fsdp = new Option<string>("--fsdp") { Description = "Shard trainable parameters, gradients and optimizer states across the ranks of 'frugal launch -n N -- train ...': full (FULL_SHARD, ZeRO-3: layers gathered as they run and recomputed in backward), grad-op (SHARD_GRAD_OP, ZeRO-2: gathered weights kept through backward) or none", DefaultValueFactory = _ => "none" };
        var collectiveTimeout = new Option<string>("--collective-timeout") { Description = "Under frugal launch: abort the job when a collective waits longer than this for the other ranks (a hung rank), e.g. 90s, 5m; 0 = wait forever", DefaultValueFactory = _ => "5m" };
        var quantize = new QuantizeOptions();
        var offloadOptions = new OffloadOptions();
        var offloadOverlap = new Option<bool>("--offload-overlap") { Description = "With --offload optimizer: step each decoder layer on a background thread while backward continues (needs --grad-clip 0 and no fp16 loss scaling; otherwise the host step runs after backward)", DefaultValueFactory = _ => true };
        var device = DeviceOption.Create();
        var command = new Command("train", "Train a LLaMA or OPT model on a text corpus and save it as a Hugging Face folder")
        {
            model, config, tokenizerOption, data, output, steps, batch, seq, accumulation, precision, gradCheckpointing, fp32NormsAndHead, checkpointEvery,
            lossChunk, loraRank, loraAlpha, loraDropout, loraTargets, optimizer, lr, warmup, weightDecay, clip, evalEvery, evalBatches, saveEvery, stateEvery, resume, logEvery, seed, saveDtype,
            samplePrompt, threads, fsdp, collectiveTimeout, device, offloadOverlap,
        };
        foreach (var option in quantize.All.Concat(offloadOptions.All))
        {
            command.Options.Add(option);
        }
        command.SetAction(pr => CliRunner.Run(() =>
        {
            DeviceOption.Require(pr.GetValue(device));
            var strategy = PlanNames.ParseStrategy(pr.GetValue(fsdp)!);
            // Under mpirun every rank runs this command; only rank 0 prints progress and writes files.
            var timeout = ParseDuration(pr.GetValue(collectiveTimeout)!, "--collective-timeout");
            using var collectives = strategy != ShardingStrategy.None || Collectives.LaunchedByMpirun ? Collectives.Create() : null;
            if (collectives is MpiCollectives mpi)
            {
                mpi.Timeout = timeout;
            }
            if (collectives is { WorldSize: > 1 } && strategy == ShardingStrategy.None)
            {
                throw new ArgumentException($"{collectives.WorldSize} ranks need --fsdp full or grad-op (without sharding each rank would train its own copy and write the same files)");
            }
            bool writer = collectives is null || collectives.Rank == 0;
            if (!writer)
            {
                CliRunner.Quiet = true;
                Console.SetOut(TextWriter.Null);
            }
            TorchRuntime.Initialize(pr.GetValue(threads) ?? (collectives is { WorldSize: > 1 } ? Math.Max(1, Environment.ProcessorCount / collectives.WorldSize) : null));
            var modelFolder = pr.GetValue(model);
            var configFile = pr.GetValue(config);
            if ((modelFolder is null) == (configFile is null))
            {
                throw new ArgumentException("give exactly one of --model (continue training) or --config (train from scratch)");
            }
            if (pr.GetValue(loraRank) > 0 && modelFolder is null)
            {
                throw new ArgumentException("LoRA fine-tunes an existing model: give --model");
            }
            var outFolder = pr.GetValue(output)!;
            var savedAs = HfCheckpoint.ParseDtype(pr.GetValue(saveDtype)!);
            var tokenizerSource = pr.GetValue(tokenizerOption) ?? modelFolder ?? "gpt2";
            if (writer)
            {
                Directory.CreateDirectory(outFolder);
                InstallTokenizer(tokenizerSource, outFolder);
            }
            collectives?.Barrier(); // the other ranks read the tokenizer rank 0 installed
            var tokenizer = HfTokenizer.Load(outFolder);
            int eos = tokenizer.EosTokenIds.Count > 0
                ? tokenizer.EosTokenIds[0]
                : throw new ArgumentException($"the tokenizer in {tokenizerSource} defines no EOS token to separate documents");

            // The architecture first (headers only), then the data, then the runtime baseline, and only then the
            // weights: the baseline is everything the run holds besides the model.
            using var checkpoint = modelFolder is null ? null : HfCheckpoint.Open(modelFolder);
            var name = Path.GetFileName(Path.TrimEndingDirectorySeparator(outFolder));
            var architecture = checkpoint?.Spec(name) ?? FreshSpec(configFile!, name, tokenizer);
            if (architecture.VocabSize < tokenizer.VocabSize)
            {
                throw new ArgumentException($"the model's vocab_size ({architecture.VocabSize}) is smaller than the tokenizer's ({tokenizer.VocabSize})");
            }
            var plan = new RunPlan
            {
                Model = architecture,
                Mode = RunMode.Train,
                Precision = PlanNames.ParsePrecision(pr.GetValue(precision)!),
                Optimizer = PlanNames.ParseOptimizer(pr.GetValue(optimizer)!),
                Quantization = quantize.Read(pr),
                Checkpointing = pr.GetValue(gradCheckpointing) ?? quantize.Read(pr).Kind == QuantizationKind.Int8
                    ? new Checkpointing(pr.GetValue(checkpointEvery)) : Checkpointing.None,
                Fp32NormsAndHead = pr.GetValue(fp32NormsAndHead) ?? (quantize.Read(pr).Kind == QuantizationKind.Int8 && pr.GetValue(loraRank) > 0),
                Loss = pr.GetValue(lossChunk) > 0 ? new LossComputation(true, pr.GetValue(lossChunk)) : LossComputation.Full,
                Lora = pr.GetValue(loraRank) > 0
                    ? new LoraSettings(pr.GetValue(loraRank), pr.GetValue(loraAlpha) ?? 2.0 * pr.GetValue(loraRank),
                        pr.GetValue(loraTargets)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries), pr.GetValue(loraDropout))
                    : null,
                MicroBatchSize = pr.GetValue(batch),
                SequenceLength = pr.GetValue(seq),
                GradientAccumulationSteps = pr.GetValue(accumulation),
                Sharding = strategy == ShardingStrategy.None ? Sharding.None : new Sharding(strategy, collectives!.WorldSize),
                Device = ComputeDevice.Cpu,
            };
            foreach (var warning in plan.Validate())
            {
                CliRunner.Status($"warning: {warning}");
            }
            if (plan.SequenceLength > architecture.MaxPositionEmbeddings)
            {
                throw new ArgumentException($"--seq {plan.SequenceLength} exceeds the model's max_position_embeddings ({architecture.MaxPositionEmbeddings})");
            }
            CliRunner.Status($"model: {architecture}");

            var corpus = LoadData(pr.GetValue(data)!, tokenizer, eos, tokenizer.PadTokenId ?? eos, plan.SequenceLength);
            CliRunner.Status($"data: {corpus.Describe()}");

            var report = MemoryReport.Predict(plan);
            var budget = offloadOptions.ReadBudget(pr);
            if (pr.GetValue(offloadOptions.Offload) is not null || budget is not null)
            {
                if ((checkpoint is null || plan.Lora is null) && pr.GetValue(offloadOptions.Offload) == "disk")
                {
                    throw new ArgumentException("--offload disk streams a frozen base from its folder: train LoRA adapters on it (--model and --lora-r)");
                }
                string? requested = pr.GetValue(offloadOptions.Offload);
                if (requested is "optimizer" or "all" && (strategy != ShardingStrategy.None || plan.Precision == Precision.Bf16Pure))
                {
                    throw new ArgumentException(strategy != ShardingStrategy.None
                        ? $"--offload {requested} does not compose with --fsdp (each rank would step its shard on the host: not implemented)"
                        : $"--offload {requested} steps fp32 masters: --precision bf16-pure has none (use bf16)");
                }
                if (requested is "params" or "all" && (plan.Lora is null || strategy != ShardingStrategy.None))
                {
                    throw new ArgumentException(strategy != ShardingStrategy.None
                        ? $"--offload {requested} does not compose with --fsdp"
                        : $"--offload {requested} streams frozen weights from the host tier: train LoRA adapters on them (--lora-r); streaming trainable weights (ZeRO-3 offload) is not implemented: --offload optimizer moves the step to the host, --fsdp full gathers fp32 shards layer by layer");
                }
                report = report.Place(pr.GetValue(offloadOptions.Offload), budget,
                    checkpoint is null || plan.Lora is null ? OffloadPolicy.None : Offload.DiskOffload.Policy(checkpoint), training: true);
                plan = report.Plan;
                CliRunner.Status(report.PlacementLine(budget));
            }
            CliRunner.Status(report.PredictionLine());

            // A streamed base is created in the compute dtype (so that no precision step converts, and so touches, the
            // weights it never loads) with the streamed layers' tensors left unloaded.
            using var lm = checkpoint?.CreateModel(InferenceModel.TrainingLoadDtype(plan),
                plan.Quantization.Kind == QuantizationKind.Int8
                ? new Quantization.Int8Options { Threshold = plan.Quantization.OutlierThreshold, Skip = plan.Quantization.SkipModules }
                : null, plan.StreamsWeights ? Offload.DiskOffload.Streamed(plan.Offload.ResidentLayers) : null) ?? CausalLM.Create(architecture);
            if (checkpoint is null)
            {
                lm.InitializeWeights(pr.GetValue(seed));
            }
            var generation = checkpoint?.Generation ?? DefaultGeneration(tokenizer);
            var prompt = pr.GetValue(samplePrompt);
            if (prompt is not null && !plan.StreamsWeights)
            {
                Sample("before", lm, tokenizer, prompt);
            }
            using var applied = Techniques.Apply(lm, plan, pr.GetValue(seed), weights: checkpoint);
            if (prompt is not null && plan.StreamsWeights)
            {
                Sample("before", lm, tokenizer, prompt); // new adapters add nothing yet (B = 0): this is the base
            }
            var mixed = applied.Precision;
            if (applied.Lora is { } adapters)
            {
                CliRunner.Status($"LoRA: {adapters}");
            }
            // Sharding comes last (Techniques' order); every rank built the same model from the same seed or folder.
            using var sharded = strategy == ShardingStrategy.None ? null : Fsdp.Wrap(lm, collectives!, strategy, mixed);
            if (sharded is not null)
            {
                CliRunner.Status(string.Create(CultureInfo.InvariantCulture,
                    $"fsdp: {PlanNames.Format(strategy)} over {collectives!.WorldSize} rank(s) ({collectives.Backend}); {sharded.TrainableCount:N0} trainable parameters, {MemoryProbe.Mib(sharded.ShardBytes)} of fp32 shards per rank{(sharded.FrozenCount > 0 ? $"; {sharded.FrozenCount:N0} frozen parameters of the decoder layers sharded, {MemoryProbe.Mib(sharded.FrozenShardBytes)} per rank" : "")}; batch {plan.MicroBatchSize} per rank, {plan.MicroBatchSize * collectives.WorldSize} per step"));
            }
            var options = new TrainOptions
            {
                Steps = pr.GetValue(steps),
                MicroBatch = plan.MicroBatchSize,
                GradientAccumulation = plan.GradientAccumulationSteps,
                LossChunk = plan.Loss.Chunked ? plan.Loss.ChunkTokens : 0,
                Optimizer = plan.Optimizer,
                LearningRate = pr.GetValue(lr),
                WarmupSteps = pr.GetValue(warmup),
                WeightDecay = pr.GetValue(weightDecay) ?? (plan.Lora is null ? 0.1 : 0.0),
                GradClip = pr.GetValue(clip),
                EvalEvery = pr.GetValue(evalEvery),
                EvalBatches = pr.GetValue(evalBatches),
                SaveEvery = pr.GetValue(saveEvery),
                LogEvery = pr.GetValue(logEvery),
                Seed = pr.GetValue(seed),
                CheckpointEvery = pr.GetValue(stateEvery),
                CheckpointFolder = Path.Combine(outFolder, "checkpoints"),
                OptimizerOnHost = plan.Offload.StepsOnHost,
                OverlapOptimizer = pr.GetValue(offloadOverlap),
            };
            var trainer = new Trainer(lm, corpus, options, mixed, sharded);
            if (trainer.HostOptimizer is { } host)
            {
                CliRunner.Status(trainer.OverlapsOptimizer
                    ? $"host optimizer: {host.Threads} threads; each decoder layer stepped while backward continues"
                    : $"host optimizer: {host.Threads} threads; stepped after backward ({(!options.OverlapOptimizer ? "--offload-overlap false" : options.GradClip > 0 ? "--grad-clip needs the global gradient norm before any layer is stepped; --grad-clip 0 overlaps" : "fp16 loss scaling must see every gradient before stepping, to skip overflowing steps")})");
            }
            if (sharded is not null)
            {
                // The index of a sharded checkpoint says what the run's own save would write, so that consolidation needs no model.
                trainer.CheckpointTarget = applied.Lora is { } adapter
                    ? new ConsolidationTarget(ShardedCheckpoint.AdapterKind, TorchSharp.torch.ScalarType.Float32, LoraAdapter.Keys(adapter), dir =>
                    {
                        generation.Save(dir);
                        LoraAdapter.SaveConfig(adapter, dir, baseModelNameOrPath: Path.GetFullPath(modelFolder!));
                    })
                    : new ConsolidationTarget(ShardedCheckpoint.ModelKind, savedAs, HfCheckpoint.State(lm).Select(t => (t.Name, t.Name)).ToList(), dir =>
                    {
                        generation.Save(dir);
                        HfCheckpoint.SaveConfig(lm, dir, savedAs);
                    });
            }
            trainer.CheckpointWritten = (path, took) => CliRunner.Status(string.Create(CultureInfo.InvariantCulture,
                $"checkpoint {path}: {MemoryProbe.Mib(FolderBytes(path))} in {took.TotalSeconds:F2} s"));
            if (pr.GetValue(resume))
            {
                var latest = trainer.Resume();
                CliRunner.Status($"resumed from {latest} at step {trainer.StepsDone}");
            }
            if (writer)
            {
                generation.Save(outFolder);
            }
            // A LoRA run saves the adapter (PEFT layout) beside the tokenizer; a full run saves the whole model. Under FSDP
            // every rank takes part in gathering the trainable parameters and rank 0 writes them.
            Action<IEnumerable<(string, TorchSharp.torch.Tensor)>> write = applied.Lora is { } lora
                ? sources => LoraAdapter.Save(lora, outFolder, baseModelNameOrPath: Path.GetFullPath(modelFolder!), sources: sources)
                : sources => HfCheckpoint.Save(lm, outFolder, savedAs, generation, sources: sources);
            Action<int> save = sharded is null ? _ => write(mixed.Masters)
                : applied.Lora is null ? _ => SaveShardedModel(sharded, lm, outFolder, savedAs, generation)
                : _ => SaveSharded(sharded, write);
            var result = RunWithProgress(trainer, options, save, writer ? outFolder : null, pr.GetValue(resume));
            if (prompt is not null)
            {
                Sample("after", lm, tokenizer, prompt);
            }
            if (applied.Offload is { } streamed)
            {
                CliRunner.Status(OffloadOptions.StatsLine(streamed));
            }
            CliRunner.Status(report.ComparisonLine(result.PeakBytes));
            if (trainer.HostOptimizer is { } hostOptimizer)
            {
                CliRunner.Status(HostOptimizerLine(hostOptimizer, report));
            }
            if (trainer.OptimizerStepTime is { } inMemory && result.Steps > 0)
            {
                var (kernel, ops) = trainer.Optimizer.LastStepValues;
                string how = ops == 0 ? "C# kernel" : kernel == 0 ? "libtorch ops"
                    : string.Create(CultureInfo.InvariantCulture, $"C# kernel for {kernel:N0} of {kernel + ops:N0} values");
                CliRunner.Status(string.Create(CultureInfo.InvariantCulture,
                    $"optimizer step ({how}, in memory): {1000 * inMemory.TotalSeconds / Math.Max(1, trainer.OptimizerSteps):F1} ms per step over {trainer.OptimizerSteps} steps"));
            }
            if (sharded is not null)
            {
                CliRunner.Status(RankLine(sharded, result));
            }
            CliRunner.Status(string.Create(CultureInfo.InvariantCulture,
                $"optimizer state: {MemoryProbe.Mib(trainer.Optimizer.StateBytes)} measured ({trainer.Optimizer.Format}), {MemoryProbe.Mib(report.Estimate.Bytes("optimizer_states"))} predicted; trainable parameters {sharded?.TrainableCount ?? trainer.Optimizer.Groups.Sum(g => g.Parameters.Sum(p => p.Parameter.numel())):N0}{(sharded is null ? "" : $" ({trainer.Optimizer.Groups.Sum(g => g.Parameters.Sum(p => p.Parameter.numel())):N0} in this rank's shards)")}"));
            if (writer)
            {
                LossCurve.Write(Path.Combine(outFolder, "train_log.jsonl"), Path.Combine(outFolder, "loss.png"));
            }
            Console.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"done: {result.Steps} steps in {result.Elapsed.TotalMinutes:F1} min; train loss {result.FinalLoss:F3}; held-out loss {result.EvalLoss:F3} (perplexity {result.EvalPerplexity:F2}); {result.TokensPerSecond:F0} tokens/s; peak memory {MemoryProbe.Mib(result.PeakBytes)}; saved to {outFolder}"));
            return ExitCodes.Ok;
        }));
        return command;
    }

    // A LoRA adapter under FSDP: gathered vector by vector on every rank into one fp32 copy of the trainable parameters on
    // rank 0, which then writes it (adapters are small; the full model streams instead, below).
    private static void SaveSharded(ShardedModel sharded, Action<IEnumerable<(string, TorchSharp.torch.Tensor)>> write)
    {
        MemoryTrace.Mark("pre-save");
        var state = sharded.CollectFullState();
        try
        {
            if (sharded.Collectives.Rank == 0)
            {
                write(state);
            }
        }
        finally
        {
            foreach (var (_, value) in state)
            {
                value.Dispose();
            }
        }
        sharded.Collectives.Barrier(); // no rank finishes before the files are written
        MemoryTrace.Mark("save");
    }

    // The full model under FSDP: rank 0 writes the HF folder while every rank gathers the flat vectors one at a time in
    // the writer's order (the other ranks discard them), so no rank holds more than one vector beyond what training holds.
    // FRUGAL_MEMTRACE=1 marks the save, which shows rank 0's peak during it.
    private static void SaveShardedModel(ShardedModel sharded, CausalLM lm, string folder, TorchSharp.torch.ScalarType dtype, GenerationConfig generation)
    {
        MemoryTrace.Mark("pre-save");
        var stream = sharded.FullStateStream();
        if (sharded.Collectives.Rank == 0)
        {
            HfCheckpoint.SaveStreamed(lm, folder, stream, dtype, generation);
        }
        else
        {
            HfCheckpoint.FetchStream(lm, stream, dtype);
        }
        sharded.Collectives.Barrier(); // no rank finishes before the files are written
        MemoryTrace.Mark("save");
    }

    // Host tier measured against predicted, the step kernel's time and how much of it backward hid.
    private static string HostOptimizerLine(HostOptimizer host, MemoryReport report)
    {
        var s = host.Stats;
        double perStep = 1000 * s.StepTime.TotalSeconds / Math.Max(1, s.Steps);
        return string.Create(CultureInfo.InvariantCulture,
            $"host optimizer: host tier {MemoryProbe.Mib(host.HostBytes)} measured (moments and fp32 masters), {MemoryProbe.Mib(report.PredictedHostOptimizerBytes)} predicted; step {perStep:F1} ms per step over {s.Steps} steps ({s.OverlappedSteps} overlapped, {s.LayersDuringBackward} layers stepped during backward); training thread waited {1000 * s.WaitTime.TotalSeconds / Math.Max(1, s.Steps):F1} ms and stepped {1000 * s.AfterBackwardTime.TotalSeconds / Math.Max(1, s.Steps):F1} ms per step after backward: {100 * s.HiddenShare:F0}% of the step hidden by backward");
    }

    /// <summary>A duration such as 90s, 5m, 1h, 500ms or a plain number of seconds; 0 means infinite.</summary>
    internal static TimeSpan ParseDuration(string text, string option)
    {
        var t = text.Trim().ToLowerInvariant();
        (string Suffix, double Seconds)[] units = [("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600)];
        var unit = units.FirstOrDefault(u => t.EndsWith(u.Suffix, StringComparison.Ordinal) && (u.Suffix != "s" || !t.EndsWith("ms", StringComparison.Ordinal)));
        var number = unit.Suffix is null ? t : t[..^unit.Suffix.Length];
        if (!double.TryParse(number, NumberStyles.Float, CultureInfo.InvariantCulture, out double value) || value < 0 || double.IsInfinity(value))
        {
            throw new ArgumentException($"{option}: '{text}' is not a duration (e.g. 90s, 5m, 500ms; 0 = no limit)");
        }
        return value == 0 ? Timeout.InfiniteTimeSpan : TimeSpan.FromSeconds(value * (unit.Suffix is null ? 1 : unit.Seconds));
    }

    private static long FolderBytes(string folder) =>
        Directory.Exists(folder) ? Directory.EnumerateFiles(folder).Sum(f => new FileInfo(f).Length) : 0;

    // Every rank's peak resident set (gathered to all, printed by rank 0), step time and the share spent in collectives.
    private static string RankLine(ShardedModel sharded, TrainResult result)
    {
        var c = sharded.Collectives;
        using var mine = TorchSharp.torch.tensor(new[] { result.PeakBytes / 1048576f, (float)sharded.CommunicationTime.TotalSeconds });
        using var all = TorchSharp.torch.empty(2 * c.WorldSize);
        c.AllGather(mine, all);
        var values = all.data<float>().ToArray();
        var peaks = string.Join(", ", Enumerable.Range(0, c.WorldSize).Select(r => string.Create(CultureInfo.InvariantCulture, $"rank {r} {values[2 * r]:F0} MiB")));
        double train = result.Steps > 0 ? result.Elapsed.TotalSeconds : 0;
        double comm = Enumerable.Range(0, c.WorldSize).Average(r => values[2 * r + 1]);
        return string.Create(CultureInfo.InvariantCulture,
            $"fsdp peak memory per rank: {peaks}; communication {comm:F2} s of {train:F2} s ({100 * comm / Math.Max(1e-9, train):F0}%, mean over ranks); {1000 * train / Math.Max(1, result.Steps):F0} ms per step (evaluation and saving included)");
    }

    private static TrainResult RunWithProgress(Trainer trainer, TrainOptions options, Action<int> save, string? outFolder, bool append)
    {
        using var log = outFolder is null ? null : new StreamWriter(Path.Combine(outFolder, "train_log.jsonl"), append);
        void Record(TrainProgress p)
        {
            log?.WriteLine(System.Text.Json.JsonSerializer.Serialize(p));
            log?.Flush();
        }
        static string Line(TrainProgress p) => string.Create(CultureInfo.InvariantCulture,
            $"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4}{(p.EvalLoss is double e ? $" held-out {e:F4} (ppl {Math.Exp(e):F2})" : "")} lr {p.LearningRate:E2} grad-norm {p.GradNorm:F2}{(p.LossScale is double s ? $" scale {s:G4} skipped {p.SkippedSteps}" : "")} {p.TokensPerSecond:F0} tok/s mem {MemoryProbe.Mib(p.ResidentBytes)} ({p.Elapsed:hh\\:mm\\:ss})");
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
                task.Value = trainer.StepsDone;
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

    private static ITrainingData LoadData(string path, HfTokenizer tokenizer, int eos, int pad, int sequence)
    {
        Func<string, IReadOnlyList<int>> encode = text => tokenizer.Encode(text, addBos: false);
        if (!CliRunner.Interactive)
        {
            CliRunner.Status($"tokenizing {path} ...");
            return TrainingData.Load(path, encode, eos, pad, sequence);
        }
        ITrainingData? data = null;
        AnsiConsole.Progress().Start(ctx =>
        {
            var task = ctx.AddTask("tokenizing", maxValue: 1.0);
            data = TrainingData.Load(path, encode, eos, pad, sequence, new Progress<double>(f => task.Value = f));
            task.Value = 1.0;
        });
        return data!;
    }

    private static void Sample(string label, CausalLM model, HfTokenizer tokenizer, string prompt)
    {
        model.eval();
        var options = new SamplingOptions { MaxNewTokens = 40, Temperature = 0.8, TopK = 50, TopP = 0.95, Seed = 1 };
        var result = new TextGenerator(model, tokenizer).Generate(prompt, options);
        Console.Out.WriteLine($"sample {label}: {prompt}{result.Text.ReplaceLineEndings(" ")}");
        model.train();
    }

    // A model from scratch takes the tokenizer's special tokens, so its saved config agrees with its data.
    private static ModelSpec FreshSpec(string configFile, string name, HfTokenizer tokenizer)
    {
        int? eos = tokenizer.EosTokenIds.Count > 0 ? tokenizer.EosTokenIds[0] : null;
        return ModelSpec.Load(configFile) switch
        {
            { Opt: { } opt } => ModelSpec.FromOpt(opt with { BosTokenId = tokenizer.BosTokenId, EosTokenId = eos, PadTokenId = tokenizer.PadTokenId }, name),
            { Llama: { } config } => ModelSpec.FromLlama(config with
            {
                BosTokenId = tokenizer.BosTokenId,
                EosTokenIds = tokenizer.EosTokenIds,
                PadTokenId = tokenizer.PadTokenId,
            }, name),
            var other => throw new ArgumentException($"--config {configFile}: FrugalLM cannot build a {other.Family} model"),
        };
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
