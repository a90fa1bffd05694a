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
                    train with { LossChunk = 0 },
                    train with { Precision = "bf16" },
                    train with { Checkpointing = true },
                    train with { LoraRank = 16 },
                    train with { Quantize = "int8", LoraRank = 16, Checkpointing = true },
                    train with { LoraRank = 16, Offload = "disk" },
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
                // All logits at once, as transformers and the peer (every other row has frugal train's fused chunked loss).
                train with { LossChunk = 0 },
                train with { LossChunk = 0, Checkpointing = true },
                train with { Optimizer = "adamw8bit" },
                train with { LoraRank = 16 },
                train with { LoraRank = 16, Checkpointing = true },
                train with { Precision = "bf16", LoraRank = 16, Checkpointing = true },
                // The article's flow: a frozen int8 base, LoRA on q_proj and v_proj, checkpointing.
                train with { Quantize = "int8", LoraRank = 16, Checkpointing = true },
                // Offload: the optimizer step on the host (C# kernel; clipping keeps it after backward), a LoRA base copied
                // from the host tier (with and without the optimizer there), and a LoRA base read from the weights folder.
                train with { Offload = "optimizer" },
                train with { LoraRank = 16, Offload = "params" },
                train with { LoraRank = 16, Offload = "all" },
                train with { LoraRank = 16, Offload = "disk" },
                // FSDP (per-rank memory and speed; ranks share the cores): one rank, and two and four over OpenMPI.
                train with { Fsdp = "full", Ranks = 1 },
                train with { Fsdp = "full", Ranks = 2, Threads = Math.Max(1, threads / 2) },
                train with { Fsdp = "grad-op", Ranks = 2, Threads = Math.Max(1, threads / 2) },
                train with { Fsdp = "full", Ranks = 4, Threads = Math.Max(1, threads / 4) },
                train with { Fsdp = "full", Ranks = 2, LoraRank = 16, Threads = Math.Max(1, threads / 2) },
                generate,
                generate with { Precision = "bf16" },
                generate with { Precision = "fp16" },
                generate with { Quantize = "int8" },
                // transformers' load_in_8bit default: the layers int8, everything else (embedding, norms, head) 16-bit.
                generate with { Quantize = "int8", Precision = "bf16" },
                generate with { Offload = "params" },
                generate with { Offload = "disk" },
            ]);
        }
        return cases;
    }
}
