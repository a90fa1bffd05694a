using System.Runtime.InteropServices;
using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// Process-wide set-up of the tensor engine: loads libtorch, tunes glibc's allocator so freed tensors go
/// back to the operating system, and sets the thread count. Call once before any tensor work; later calls
/// are no-ops.
/// </summary>
public static class TorchRuntime
{
    private const int MallocMmapThreshold = -3; // M_MMAP_THRESHOLD in glibc's malloc.h
    private const int MmapThresholdBytes = 1 << 20;
    private static readonly Lock Gate = new();
    private static bool initialized;

    /// <summary>The threads libtorch uses for intra-op parallelism after <see cref="Initialize"/>.</summary>
    public static int Threads => torch.get_num_threads();

    /// <summary>Loads libtorch and applies the process-wide settings.</summary>
    /// <param name="threads">Intra-op threads; null keeps libtorch's default (one per core).</param>
    public static void Initialize(int? threads = null)
    {
        lock (Gate)
        {
            if (!initialized)
            {
                // Without this, glibc serves large blocks from its heap and keeps them resident after
                // libtorch frees them, so a process's footprint only ever grows (measured: 506 -> 867 MiB
                // over 60 steps). Allocations of 1 MiB and more become private mmaps, unmapped on free.
                // An explicit MALLOC_MMAP_THRESHOLD_ from the user wins (glibc has already applied it).
                if (OperatingSystem.IsLinux() && Environment.GetEnvironmentVariable("MALLOC_MMAP_THRESHOLD_") is null)
                {
                    _ = mallopt(MallocMmapThreshold, MmapThresholdBytes);
                }
                // libtorch's OpenMP workers spin after every parallel op, waiting for the next. The int8
                // kernels run between libtorch ops on .NET threads, which then fight the spinners for the
                // cores (measured on 2 cores: a 1-token 4096x4096 int8 projection 0.4 ms alone, 2.9 ms right
                // after a libtorch matmul; one decoder layer of int8 projections 36-60 ms, 17-24 ms passive).
                // Passive waiting must be chosen before libgomp loads; the user's own setting wins.
                if (OperatingSystem.IsLinux() && Environment.GetEnvironmentVariable("OMP_WAIT_POLICY") is null)
                {
                    _ = setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
                }
                try
                {
                    torch.InitializeDeviceType(DeviceType.CPU);
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    throw new InvalidOperationException(
                        "libtorch could not be loaded. Build with 'dotnet build' so the TorchSharp native glue is " +
                        "prepared for this system's libstdc++ (see build/WeakenGlibcxxRequirement.cs). " + e.Message, e);
                }
                initialized = true;
            }
            if (threads is int n)
            {
                torch.set_num_threads(Math.Max(1, n));
            }
        }
    }

    [DllImport("libc", EntryPoint = "mallopt")]
    private static extern int mallopt(int param, int value);

    [DllImport("libc", EntryPoint = "setenv", CharSet = CharSet.Ansi, BestFitMapping = false, ThrowOnUnmappableChar = true)]
    private static extern int setenv(string name, string value, int overwrite);
}
