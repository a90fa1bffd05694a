using System.Text.RegularExpressions;
using FrugalLM.Tests.Cli;

namespace FrugalLM.Tests.Distributed;

/// <summary>
/// The OpenMPI backend, checked by <c>frugal launch -n N -- collectives-selftest</c>: each rank runs every
/// collective (fp32 and bf16, odd sizes, whole and split into many MPI calls) against a reference it computes
/// alone. Gathers and broadcasts must be exact; sums within fp32 reduction order (plus one bf16 rounding for bf16).
/// Needs <c>mpirun</c> (openmpi-bin): without it these tests fail, never skip.
/// </summary>
public sealed partial class MpiCollectivesTests
{
    private static readonly string[] Collectives =
    [
        "all-gather", "all-gather-in-place", "all-gather-async", "reduce-scatter-sum", "reduce-scatter-avg",
        "reduce-scatter-in-place", "all-reduce-sum", "all-reduce-avg", "broadcast",
    ];

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void EveryCollectiveMatchesTheSingleProcessReference(int ranks)
    {
        RequireMpirun();
        var (exit, stdout, stderr) = FrugalProcess.Run("launch", "-n", ranks.ToString(System.Globalization.CultureInfo.InvariantCulture), "--",
            "collectives-selftest", "--seed", (40 + ranks).ToString(System.Globalization.CultureInfo.InvariantCulture));
        Assert.True(exit == 0, $"exit {exit}\n{stdout}\n{stderr}");
        var lines = ResultLine().Matches(stdout).ToDictionary(m => $"{m.Groups[2].Value} {m.Groups[3].Value}", m => m.Groups[1].Value);
        foreach (var split in new[] { "", " (split)" })
        {
            foreach (var type in new[] { "fp32", "bf16" })
            {
                foreach (var name in Collectives)
                {
                    var key = $"{name}{split} {type}";
                    Assert.True(lines.TryGetValue(key, out var verdict), $"no result for {key}\n{stdout}");
                    Assert.True(verdict == "PASS", $"{key}: {verdict}\n{stdout}");
                }
            }
        }
        Assert.Equal("PASS", lines["barrier -"]);
        Assert.Equal("PASS", lines["validation -"]);
        Assert.Contains($"all passed: 38 checks at world size {ranks} (openmpi)", stdout);
    }

    [Theory]
    [InlineData("0", "--ranks must be at least 1")]
    [InlineData("2", "needs a frugal subcommand")]
    public void LaunchRejectsBadUsage(string ranks, string message)
    {
        var args = ranks == "2" ? new[] { "launch", "-n", ranks, "--", "launch" } : ["launch", "-n", ranks, "--", "collectives-selftest"];
        var (exit, _, stderr) = FrugalProcess.Run(args);
        Assert.Equal(2, exit);
        Assert.Contains(message, stderr);
    }

    [Fact]
    public void OversubscribesOnlyWhenRanksExceedCores()
    {
        Assert.DoesNotContain("--oversubscribe", FrugalLM.Cli.Commands.LaunchCommand.MpirunArguments(2, 2));
        Assert.Contains("--oversubscribe", FrugalLM.Cli.Commands.LaunchCommand.MpirunArguments(4, 2));
    }

    private static void RequireMpirun()
    {
        bool found = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator)
            .Any(dir => dir.Length > 0 && File.Exists(Path.Combine(dir, "mpirun")));
        Assert.True(found, "mpirun not found: run tools/setup.sh (it installs openmpi-bin) to run the distributed tests");
    }

    [GeneratedRegex(@"^(PASS|FAIL) (\S+(?: \(split\))?) (fp32|bf16|-) ", RegexOptions.Multiline)]
    private static partial Regex ResultLine();
}
