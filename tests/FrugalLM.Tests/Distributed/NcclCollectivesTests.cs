using System.Runtime.InteropServices;
using FrugalLM.Distributed;
using FrugalLM.Tests.Cli;

namespace FrugalLM.Tests.Distributed;

/// <summary>
/// The NCCL backend where NCCL is absent (every machine of this project so far): it says so, names the library,
/// and nothing falls back silently. On a machine with NCCL and a GPU these tests check that it is found instead.
/// </summary>
public sealed class NcclCollectivesTests
{
    private static bool NcclInstalled => NativeLibrary.TryLoad("libnccl.so.2", out _);

    [Fact]
    public void AvailabilityFollowsTheLibraryAndNamesWhatIsMissing()
    {
        bool available = NcclCollectives.IsAvailable(out var reason);
        if (!NcclInstalled)
        {
            Assert.False(available);
            Assert.Contains("libnccl.so.2", reason, StringComparison.Ordinal);
        }
        else
        {
            Assert.True(available || reason.Contains("libcudart", StringComparison.Ordinal) || reason.Contains("lacks", StringComparison.Ordinal), reason);
        }
    }

    [Fact]
    public void ChoosingNcclWithoutItStopsWithAClearError()
    {
        if (NcclInstalled)
        {
            return; // the backend would start; the GPU check script covers that machine
        }
        var (exit, stdout, stderr) = FrugalProcess.RunWith(new Dictionary<string, string> { [Collectives.BackendVariable] = "nccl" },
            "collectives-selftest");
        Assert.NotEqual(0, exit);
        Assert.Contains("NCCL not available: libnccl.so.2 could not be loaded", stdout + stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);

        var (badExit, badOut, badErr) = FrugalProcess.RunWith(new Dictionary<string, string> { [Collectives.BackendVariable] = "gloo" },
            "collectives-selftest");
        Assert.NotEqual(0, badExit);
        Assert.Contains("FRUGAL_COLLECTIVES=gloo: expected auto, mpi, nccl or single", badOut + badErr, StringComparison.Ordinal);
    }
}
