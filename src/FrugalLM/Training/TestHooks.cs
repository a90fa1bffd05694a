namespace FrugalLM.Training;

/// <summary>
/// Faults the tests inject into real multi-process runs, read from the environment once. Not an interface for users:
/// the variables are undocumented outside the tests and docs/distributed.md.
/// </summary>
internal static class TestHooks
{
    // FRUGAL_TEST_HANG_RANK=r and FRUGAL_TEST_HANG_STEP=k: rank r stops before step k and sleeps forever while staying alive,
    // as a deadlocked or stuck rank does, so the collective timeout of the other ranks can be tested.
    private static readonly int? HangRank = Read("FRUGAL_TEST_HANG_RANK");
    private static readonly int? HangStep = Read("FRUGAL_TEST_HANG_STEP");

    /// <summary>Called before step <paramref name="step"/> (1-based) on rank <paramref name="rank"/>.</summary>
    public static void BeforeStep(int step, int rank)
    {
        if (HangRank == rank && HangStep == step)
        {
            Console.Error.WriteLine($"test hook: rank {rank} hangs before step {step} (FRUGAL_TEST_HANG_RANK/STEP)");
            Console.Error.Flush();
            Thread.Sleep(Timeout.Infinite);
        }
    }

    private static int? Read(string name) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int value) ? value : null;
}
