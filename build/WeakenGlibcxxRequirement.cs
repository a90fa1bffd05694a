// An MSBuild task (compiled by RoslynCodeTaskFactory) that lets TorchSharp's native glue load on
// Debian 12 and other distributions whose libstdc++ predates GLIBCXX_3.4.32.
//
// Why by hand: libLibTorchSharp.so asks for GLIBCXX_3.4.32 for a single symbol
// (std::ios_base_library_init) that it references but never calls. Setting VER_FLG_WEAK on that
// requirement in .gnu.version_r lets the dynamic loader accept an older libstdc++, exactly as if the
// library had been linked against it. No tool in the .NET or Debian toolbox edits version flags
// (patchelf does not), and the edit is a two-byte change, so it lives here.
//
// The task is idempotent (an already-weak entry is left alone), writes atomically (temp + rename),
// touches only the copies in this build's output, and does nothing where the system libstdc++
// already defines the version.
using System;
using System.IO;
using System.Linq;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public sealed class WeakenGlibcxxRequirement : Task
{
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlgWeak = 0x2;

    [Required] public ITaskItem[] Libraries { get; set; } = Array.Empty<ITaskItem>();

    [Required] public string Version { get; set; } = "";

    public override bool Execute()
    {
        if (Environment.OSVersion.Platform != PlatformID.Unix)
        {
            return true;
        }
        if (SystemLibstdcxxHas(Version))
        {
            Log.LogMessage(MessageImportance.Low, $"System libstdc++ defines {Version}; nothing to patch.");
            return true;
        }
        foreach (var item in Libraries)
        {
            var path = item.ItemSpec;
            if (!File.Exists(path))
            {
                continue;
            }
            try
            {
                var result = Patch(path, Version);
                Log.LogMessage(MessageImportance.Normal, $"{Path.GetFileName(path)}: {result}");
            }
            catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException)
            {
                Log.LogError($"Could not weaken the {Version} requirement of '{path}': {e.Message}");
                return false;
            }
        }
        return !Log.HasLoggedErrors;
    }

    private static bool SystemLibstdcxxHas(string version)
    {
        string[] candidates =
        {
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/lib/aarch64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6",
        };
        var needle = Encoding.ASCII.GetBytes(version + "\0");
        foreach (var candidate in candidates.Where(File.Exists))
        {
            if (IndexOf(File.ReadAllBytes(candidate), needle, 0) >= 0)
            {
                return true;
            }
        }
        return false;
    }

    private static int IndexOf(byte[] haystack, byte[] needle, int start)
    {
        for (int i = Array.IndexOf(haystack, needle[0], start); i >= 0 && i <= haystack.Length - needle.Length;
             i = Array.IndexOf(haystack, needle[0], i + 1))
        {
            int j = 1;
            while (j < needle.Length && haystack[i + j] == needle[j])
            {
                j++;
            }
            if (j == needle.Length)
            {
                return i;
            }
        }
        return -1;
    }

    /// <summary>Sets VER_FLG_WEAK on every vernaux entry naming <paramref name="version"/>.</summary>
    private static string Patch(string path, string version)
    {
        var elf = File.ReadAllBytes(path);
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
        {
            throw new InvalidDataException("not an ELF file");
        }
        if (elf[4] != 2 || elf[5] != 1)
        {
            throw new InvalidDataException("only little-endian ELF64 is supported");
        }
        ulong shoff = BitConverter.ToUInt64(elf, 0x28);
        int shentsize = BitConverter.ToUInt16(elf, 0x3A);
        int shnum = BitConverter.ToUInt16(elf, 0x3C);
        int patched = 0, alreadyWeak = 0;
        for (int i = 0; i < shnum; i++)
        {
            int sh = checked((int)shoff + i * shentsize);
            if (BitConverter.ToUInt32(elf, sh + 4) != ShtGnuVerneed)
            {
                continue;
            }
            int offset = checked((int)BitConverter.ToUInt64(elf, sh + 0x18));
            int link = (int)BitConverter.ToUInt32(elf, sh + 0x28);
            int count = (int)BitConverter.ToUInt32(elf, sh + 0x2C);
            int strtab = checked((int)BitConverter.ToUInt64(elf, checked((int)shoff + link * shentsize) + 0x18));
            int need = offset;
            for (int n = 0; n < count; n++)
            {
                int auxCount = BitConverter.ToUInt16(elf, need + 2);
                int aux = need + (int)BitConverter.ToUInt32(elf, need + 8);
                for (int a = 0; a < auxCount; a++)
                {
                    int nameOffset = strtab + (int)BitConverter.ToUInt32(elf, aux + 8);
                    int end = Array.IndexOf(elf, (byte)0, nameOffset);
                    var name = Encoding.ASCII.GetString(elf, nameOffset, end - nameOffset);
                    if (name == version)
                    {
                        ushort flags = BitConverter.ToUInt16(elf, aux + 4);
                        if ((flags & VerFlgWeak) != 0)
                        {
                            alreadyWeak++;
                        }
                        else
                        {
                            flags |= VerFlgWeak;
                            elf[aux + 4] = (byte)(flags & 0xff);
                            elf[aux + 5] = (byte)(flags >> 8);
                            patched++;
                        }
                    }
                    aux += (int)BitConverter.ToUInt32(elf, aux + 12);
                }
                need += (int)BitConverter.ToUInt32(elf, need + 12);
            }
        }
        if (patched == 0)
        {
            return alreadyWeak > 0 ? $"{version} already weak" : $"does not require {version}";
        }
        var temp = path + ".weak-tmp";
        using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write))
        {
            stream.Write(elf, 0, elf.Length);
            stream.Flush(flushToDisk: true);
        }
        // File.Replace is an atomic rename(2) on Unix (the netstandard2.0 File.Move cannot overwrite).
        File.Replace(temp, path, null);
        return $"marked {patched} {version} requirement(s) weak";
    }
}
