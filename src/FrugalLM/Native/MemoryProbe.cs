using System.Globalization;

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
