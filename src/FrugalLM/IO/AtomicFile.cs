using System.Runtime.InteropServices;
using System.Text;

namespace FrugalLM.IO;

/// <summary>
/// Writes files so that a crash never leaves a half-written one behind: the content goes to a temporary
/// file in the same folder, is flushed to disk, and is renamed over the target (atomic on POSIX); the
/// folder is then synced so the rename itself survives a power loss.
/// </summary>
public static class AtomicFile
{
    /// <summary>Writes <paramref name="path"/> atomically with what <paramref name="write"/> puts in the stream.</summary>
    public static void Write(string path, Action<FileStream> write)
    {
        var full = Path.GetFullPath(path);
        var folder = Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(folder);
        var temp = Path.Combine(folder, $".{Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
            SyncDirectory(folder);
        }
        catch
        {
            File.Delete(temp);
            throw;
        }
    }

    /// <summary>Writes UTF-8 text (no byte-order mark) atomically.</summary>
    public static void WriteText(string path, string text) =>
        Write(path, s => s.Write(new UTF8Encoding(false).GetBytes(text)));

    /// <summary>Flushes a folder's entries to disk (after a rename into it), so the rename survives a power loss.</summary>
    public static void SyncFolder(string folder) => SyncDirectory(folder);

    private static void SyncDirectory(string folder)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        const int ReadOnlyDirectory = 0x10000; // O_RDONLY | O_DIRECTORY
        int fd = open(folder, ReadOnlyDirectory);
        if (fd >= 0)
        {
            _ = fsync(fd);
            _ = close(fd);
        }
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

    [DllImport("libc")]
    private static extern int fsync(int fd);

    [DllImport("libc")]
    private static extern int close(int fd);
}
