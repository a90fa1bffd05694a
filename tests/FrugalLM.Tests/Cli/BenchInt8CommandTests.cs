using System.Globalization;
using System.Text.RegularExpressions;

namespace FrugalLM.Tests.Cli;

public sealed partial class BenchInt8CommandTests
{
    [Fact]
    public void PrintsTheSpeedTableAndWritesItAsMarkdown()
    {
        // Small odd shapes instead of LLaMA-7B's, one timed round: the command's path end to end in seconds.
        using var dir = TestSupport.TempDir();
        var file = Path.Combine(dir.Path, "sub", "int8.md");
        var (exit, stdout, stderr) = FrugalProcess.Run("bench", "int8-kernels", "--shapes", "96x40,33x70", "--tokens", "1,5",
            "--rounds", "1", "--threads", "1", "--out", file);
        Assert.True(exit == 0, stderr);
        Assert.Contains("| out x in | tokens | fp32 ms | bf16 ms | int8 ms | int8 vs fp32 | int8 vs bf16 |", stdout);
        Assert.Contains("1 threads", stdout);
        var rows = TableRow().Matches(stdout);
        Assert.Equal(["96 x 40 | 1", "96 x 40 | 5", "33 x 70 | 1", "33 x 70 | 5"], rows.Select(m => $"{m.Groups[1].Value} | {m.Groups[2].Value}"));
        foreach (Match row in rows)
        {
            double fp32 = double.Parse(row.Groups[3].Value, CultureInfo.InvariantCulture);
            double int8 = double.Parse(row.Groups[5].Value, CultureInfo.InvariantCulture);
            double ratio = double.Parse(row.Groups[6].Value, CultureInfo.InvariantCulture);
            Assert.True(fp32 > 0 && int8 > 0, row.Value);
            // The ratio column is fp32 / int8 of the unrounded times: within what the printed times' rounding to
            // 3 decimals (+-0.0005 ms each, large against these microsecond layers) and its own to 2 decimals allow.
            const double half = 0.0005;
            Assert.InRange(ratio, (fp32 - half) / (int8 + half) - 0.005, (fp32 + half) / Math.Max(int8 - half, 1e-9) + 0.005);
        }

        var markdown = File.ReadAllText(file);
        Assert.Contains("- command: `./frugal bench int8-kernels --shapes 96x40,33x70 --tokens 1,5 --rounds 1 --threads 1 --out ", markdown);
        Assert.Contains("- machine: ", markdown);
        Assert.Contains("- date: ", markdown);
        Assert.Equal(rows.Select(m => m.Value), TableRow().Matches(markdown).Select(m => m.Value));
    }

    [Theory]
    [InlineData("--shapes", "4096")]
    [InlineData("--shapes", "0x16")]
    [InlineData("--tokens", "1,-2")]
    [InlineData("--rounds", "0")]
    public void BadOptionsExitTwo(string option, string value)
    {
        var (exit, _, stderr) = FrugalProcess.Run("bench", "int8-kernels", option, value);
        Assert.Equal(2, exit);
        Assert.Contains(option, stderr);
    }

    [GeneratedRegex(@"^\| (\d+ x \d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+)x \|$", RegexOptions.Multiline)]
    private static partial Regex TableRow();
}
