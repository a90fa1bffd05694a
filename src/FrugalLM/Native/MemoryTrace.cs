using TorchSharp;
namespace FrugalLM.Native;

/// <summary>
/// <c>FRUGAL_MEMTRACE=1</c> prints, at named points of a run (each phase of a training step, each generated
/// token), the resident set, the native heap in use and the peak (since the previous phase, or since the run
/// began for tokens), on standard error. It is how a step's memory was taken apart, and how the hygiene test
/// watches a real <c>frugal generate</c> from outside, untouched by whatever else a test process did.
/// </summary>
public static class MemoryTrace
{
    /// <summary>Whether <c>FRUGAL_MEMTRACE=1</c> is set.</summary>
    public static bool Enabled { get; } = Environment.GetEnvironmentVariable("FRUGAL_MEMTRACE") == "1";

    /// <summary>The prefix of every trace line.</summary>
    public const string Prefix = "memtrace";

    // FRUGAL_MALLOC_INFO=DIR: at each mark, glibc's malloc_info XML (free chunks per size class and arena) into DIR. It is
    // how the 192 KiB holes of a 64-token disk-offloaded step were found (TorchRuntime's mmap threshold).
    private static readonly string? MallocInfoFolder = Environment.GetEnvironmentVariable("FRUGAL_MALLOC_INFO");
    private static int mallocInfoDumps;

    /// <summary>Writes one trace line for <paramref name="point"/> when tracing is on.</summary>
    /// <param name="point">What just ended.</param>
    /// <param name="resetPeak">Start a new peak after this line (phases of a step), or keep the run's peak so the
    /// run's own peak report stays true (generated tokens).</param>
    public static void Mark(string point, bool resetPeak = true)
    {
        if (!Enabled)
        {
            return;
        }
        Console.Error.WriteLine($"{Prefix} {point,-9} resident {MemoryProbe.Mib(MemoryProbe.CurrentBytes),12} heap {MemoryProbe.Mib(MemoryProbe.NativeHeapBytes),12} peak {MemoryProbe.Mib(MemoryProbe.PeakBytes),12} heap-free {MemoryProbe.Mib(MemoryProbe.NativeHeapFreeBytes),10} managed {MemoryProbe.Mib(GC.GetGCMemoryInfo().TotalCommittedBytes),10}");
        if (MallocInfoFolder is { } folder && OperatingSystem.IsLinux())
        {
            WriteMallocInfo(Path.Combine(folder, $"{++mallocInfoDumps:D3}-{point}.xml"));
        }
        if (resetPeak)
        {
            MemoryProbe.ResetPeak();
        }
    }

    /// <summary>
    /// Returns <paramref name="x"/> unchanged; in trace mode, through an identity autograd function that marks
    /// <paramref name="point"/> when the backward pass reaches it (TorchSharp 0.107 has no tensor hooks), so the
    /// backward pass shows its resident set and peak between decoder layers.
    /// </summary>
    public static torch.Tensor MarkInBackward(torch.Tensor x, string point) =>
        Enabled && x.requires_grad && torch.is_grad_enabled() ? BackwardHook.Apply(x, () => Mark(point)) : x;

    private static void WriteMallocInfo(string path)
    {
        nint file = fopen(path, "w");
        if (file != 0)
        {
            _ = malloc_info(0, file);
            _ = fclose(file);
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "fopen")]
    private static extern nint fopen(string path, string mode);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "fclose")]
    private static extern int fclose(nint file);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "malloc_info")]
    private static extern int malloc_info(int options, nint file);
}
