using System.Globalization;
using System.Runtime.InteropServices;

namespace FrugalLM.Native;

/// <summary>
/// Reads the process's resident memory from <c>/proc/self/status</c>: the current resident set (VmRSS) and
/// its high-water mark (VmHWM), which <see cref="ResetPeak"/> brings back to the current value. libtorch on
/// CPU keeps no allocator statistics, so the kernel's accounting is the measurement.
/// </summary>
public static class MemoryProbe
{
    /// <summary>Resident set size now, in bytes (0 where /proc is unavailable).</summary>
    public static long CurrentBytes => ReadStatusKiB("VmRSS:") * 1024;

    /// <summary>Peak resident set size since the process started or the last <see cref="ResetPeak"/>, in bytes.</summary>
    public static long PeakBytes => ReadStatusKiB("VmHWM:") * 1024;

    /// <summary>
    /// Bytes the C heap has handed out and not had back (glibc's <c>mallinfo2</c>: in-use chunks of every
    /// arena plus mmapped blocks), 0 where that is unavailable. Every libtorch CPU tensor lives here, so a
    /// leaked tensor shows in it; unlike the resident set it ignores the managed heap, code pages and
    /// freed-but-resident heap pages, which makes it the steadier measure of a leak in a busy process.
    /// </summary>
    public static long NativeHeapBytes => MallInfo() is { } info ? (long)(info.Uordblks + info.Hblkhd) : 0;

    /// <summary>
    /// Bytes of free chunks the C heap holds in its arenas (glibc's <c>mallinfo2</c> <c>fordblks</c>): freed memory
    /// that stays in the process, resident once touched, until the heap's top is trimmed; 0 where unavailable.
    /// </summary>
    public static long NativeHeapFreeBytes => MallInfo() is { } info ? (long)info.Fordblks : 0;

    private static MallInfo2? MallInfo()
    {
        if (!OperatingSystem.IsLinux())
        {
            return null;
        }
        try
        {
            return mallinfo2();
        }
        catch (Exception e) when (e is EntryPointNotFoundException or DllNotFoundException)
        {
            return null; // musl or a glibc older than 2.33
        }
    }

    /// <summary>Resets the peak to the current resident set; returns false where the kernel does not allow it.</summary>
    public static bool ResetPeak()
    {
        try
        {
            // "5" resets the peak RSS counter (Documentation/filesystems/proc.rst, clear_refs).
            File.WriteAllText("/proc/self/clear_refs", "5");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <summary>Formats a byte count as MiB with one decimal.</summary>
    public static string Mib(long bytes) => (bytes / (1024.0 * 1024.0)).ToString("F1", CultureInfo.InvariantCulture) + " MiB";

    [StructLayout(LayoutKind.Sequential)]
    private struct MallInfo2
    {
        public nuint Arena, Ordblks, Smblks, Hblks, Hblkhd, Usmblks, Fsmblks, Uordblks, Fordblks, Keepcost;
    }

    [DllImport("libc", EntryPoint = "mallinfo2")]
    private static extern MallInfo2 mallinfo2();

    private static long ReadStatusKiB(string key)
    {
        const string path = "/proc/self/status";
        if (!File.Exists(path))
        {
            return 0;
        }
        foreach (var line in File.ReadLines(path))
        {
            if (line.StartsWith(key, StringComparison.Ordinal))
            {
                var parts = line[key.Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries);
                return long.Parse(parts[0], CultureInfo.InvariantCulture);
            }
        }
        return 0;
    }
}
