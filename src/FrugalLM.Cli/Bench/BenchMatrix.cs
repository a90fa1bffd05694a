namespace FrugalLM.Cli.Bench;

/// <summary>
/// The configurations <c>frugal bench</c> measures: every technique the runtime has, on each model, with a
/// workload sized for a 2-core CPU. <c>--quick</c> keeps one representative of each technique family on the
/// first model.
/// </summary>
internal static class BenchMatrix
{
    /// <summary>A model of the matrix: its label, its config.json, the batch and sequence of training runs.</summary>
    public sealed record BenchModel(string Name, string Config, int Batch, int Seq);

    public static IReadOnlyList<BenchCase> Cases(IReadOnlyList<(BenchModel Model, string Weights)> models, bool quick, int steps, int warmup, int threads)
    {
        var cases = new List<BenchCase>();
        foreach (var (model, weights) in models)
        {
            var train = new BenchCase
            {
                Model = model.Name,
                Config = model.Config,
                Weights = weights,
                Batch = model.Batch,
                Seq = model.Seq,
                Steps = steps,
                Warmup = warmup,
                Threads = threads,
            };
            var generate = train with { Mode = "generate" };
            if (quick)
            {
                cases.AddRange(
                [
                    train,
                    train with { Precision = "bf16" },
                    train with { Checkpointing = true },
                    train with { LoraRank = 16 },
                    train with { Quantize = "int8", LoraRank = 16, Checkpointing = true },
                    generate,
                    generate with { Quantize = "int8" },
                ]);
                break;
            }
            foreach (var precision in new[] { "fp32", "bf16", "fp16", "bf16-pure" })
            {
                cases.Add(train with { Precision = precision });
                cases.Add(train with { Precision = precision, Checkpointing = true });
            }
            cases.AddRange(
            [
                // The activation claim: with the loss chunked, what remains of the step's peak is the layers' activations.
                train with { LossChunk = 256 },
                train with { LossChunk = 256, Checkpointing = true },
                train with { Optimizer = "adamw8bit" },
                train with { LoraRank = 16 },
                train with { LoraRank = 16, Checkpointing = true },
                train with { Precision = "bf16", LoraRank = 16, Checkpointing = true },
                // The article's flow: a frozen int8 base, LoRA on q_proj and v_proj, checkpointing.
                train with { Quantize = "int8", LoraRank = 16, Checkpointing = true },
                generate,
                generate with { Precision = "bf16" },
                generate with { Precision = "fp16" },
                generate with { Quantize = "int8" },
                // transformers' load_in_8bit default: the layers int8, everything else (embedding, norms, head) 16-bit.
                generate with { Quantize = "int8", Precision = "bf16" },
            ]);
        }
        return cases;
    }
}
