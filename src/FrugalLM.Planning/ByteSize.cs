using System.Globalization;

namespace FrugalLM.Planning;

/// <summary>
/// Byte counts as people write them. Binary units (KiB, MiB, GiB, TiB) are powers of 1024 and decimal units
/// (KB, MB, GB, TB) powers of 1000, never mixed up: GPU and RAM sizes are usually binary, the article's figures
/// decimal.
/// </summary>
public static class ByteSize
{
    /// <summary>2^10 bytes.</summary>
    public const long KiB = 1L << 10;

    /// <summary>2^20 bytes.</summary>
    public const long MiB = 1L << 20;

    /// <summary>2^30 bytes.</summary>
    public const long GiB = 1L << 30;

    /// <summary>10^9 bytes.</summary>
    public const long GB = 1_000_000_000L;

    private static readonly (string Suffix, double Factor)[] Units =
    [
        ("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("TiB", 1L << 40),
        ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12),
        ("B", 1),
    ];

    /// <summary>
    /// Parses "24GiB", "1.3 GB", "512MiB", "1000" (bytes) or "1000B". Single-letter units such as "24G" are refused
    /// because they do not say whether they are binary or decimal.
    /// </summary>
    /// <exception cref="FormatException">The text is not a non-negative size with a known unit.</exception>
    public static long Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var trimmed = text.Trim();
        foreach (var (suffix, factor) in Units)
        {
            if (trimmed.EndsWith(suffix, StringComparison.OrdinalIgnoreCase))
            {
                return Scale(trimmed[..^suffix.Length], factor, text);
            }
        }
        return Scale(trimmed, 1, text);
    }

    /// <summary>Like <see cref="Parse"/> but reports failure instead of throwing.</summary>
    public static bool TryParse(string text, out long bytes)
    {
        try
        {
            bytes = Parse(text);
            return true;
        }
        catch (FormatException)
        {
            bytes = 0;
            return false;
        }
    }

    /// <summary>Bytes as binary gibibytes with two decimals, labelled "GiB".</summary>
    public static string FormatGiB(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{(double)bytes / GiB:F2} GiB");

    /// <summary>Bytes as decimal gigabytes with two decimals, labelled "GB".</summary>
    public static string FormatGB(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{(double)bytes / GB:F2} GB");

    private static long Scale(string number, double factor, string original)
    {
        if (!double.TryParse(number.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var value)
            || double.IsNaN(value) || double.IsInfinity(value) || value < 0)
        {
            throw new FormatException(
                $"'{original}' is not a size: write a non-negative number with a unit such as 24GiB, 1.3GB or 512MiB");
        }
        var bytes = value * factor;
        if (bytes > long.MaxValue)
        {
            throw new FormatException($"'{original}' is too large");
        }
        return (long)Math.Round(bytes);
    }
}
