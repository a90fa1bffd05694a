using System.CommandLine;
using System.Globalization;
using FrugalLM.Native;
using FrugalLM.Offload;
using FrugalLM.Planning;

namespace FrugalLM.Cli;

/// <summary>The <c>--offload</c> and <c>--memory-budget</c> options shared by train, generate and eval.</summary>
internal sealed class OffloadOptions
{
    public Option<string?> Offload { get; } = new("--offload")
    {
        Description = "none; optimizer (train: ZeRO-Offload, fp32 masters and optimizer states on the host, the step in vectorized C# overlapping backward layer by layer); params: the decoder layers' frozen weights on the host tier, copied into two device layer buffers as they run, the next copied ahead (a LoRA base when training; on a CPU host and device are one memory, so this shows the placement and its cost, not a saving); all (train): params and optimizer; or disk: the decoder layers' weights stay in the model folder's safetensors files and are read into two reusable layer buffers as they run, the next read ahead on a background thread (default: none, or chosen by --memory-budget)",
    };

    public Option<string?> Budget { get; } = new("--memory-budget")
    {
        Description = "Memory the run may use above the runtime baseline, e.g. 512MiB: chooses in-memory or disk offload (and, generating, how many layers stay resident) so that the estimated peak fits; exit 3 if nothing does",
    };

    public IEnumerable<Option> All => [Offload, Budget];

    /// <summary>The budget in bytes, or null.</summary>
    public long? ReadBudget(ParseResult result) => result.GetValue(Budget) is { } text
        ? ByteSize.TryParse(text, out long bytes) ? bytes : throw new ArgumentException($"--memory-budget: '{text}' is not a size (e.g. 512MiB, 2GiB)")
        : null;

    /// <summary>One line of what streaming cost: reads, bytes, and how much of the read time the read-ahead hid.</summary>
    public static string StatsLine(OffloadedModel offload)
    {
        var s = offload.Stats;
        return string.Create(CultureInfo.InvariantCulture,
            $"offload: {s.StreamedLayers} layers streamed, {s.Loads} {(offload.FromHost ? "layer copies from the host tier" : "layer reads")}, {s.BytesRead / 1073741824.0:F2} GiB read in {s.LoadTime.TotalSeconds:F2} s; compute waited {s.WaitTime.TotalSeconds:F2} s ({100 * s.HiddenShare:F0}% of read time hidden by read-ahead); buffers {MemoryProbe.Mib(s.BufferBytes + s.StagingBytes)}");
    }
}
