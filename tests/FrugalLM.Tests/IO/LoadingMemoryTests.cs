using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Tests.Training;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace FrugalLM.Tests.IO;

/// <summary>
/// Loading a tensor costs its destination plus one slice (<see cref="WeightLoadLayout.SliceBytes"/>), not a copy of it
/// in the file's dtype plus its mapped pages: read whole, the 64 MiB fp32 tensor here cost +128 MiB on top of its
/// destination (the peak that made int8 inference of llama-100m miss half of fp32's weight memory). The margin
/// of 6 MiB covers allocator rounding and the test's own small allocations.
/// </summary>
[Collection(nameof(MemorySensitive))]
public sealed class LoadingMemoryTests(ITestOutputHelper output)
{
    private const long Rows = 4096, Columns = 4096;
    private const long MarginBytes = 6L << 20;

    [Fact]
    public void ConvertingLoadHoldsOneSliceBesideTheResult()
    {
        TestSupport.Init();
        using var dir = TestSupport.TempDir();
        var path = Write(dir.Path, out var expected);
        using var file = SafeTensorsFile.Open(path);
        long before = Settle();
        using var loaded = file.Load("w", ScalarType.BFloat16);
        long growth = MemoryProbe.PeakBytes - before;
        output.WriteLine($"fp32 -> bf16 load of {MemoryProbe.Mib(Rows * Columns * 4)}: peak +{MemoryProbe.Mib(growth)}");
        Assert.True(loaded.Same(expected), "the loaded tensor differs from the written one converted to bf16");
        Assert.True(growth < Rows * Columns * 2 + 2 * WeightLoadLayout.SliceBytes + MarginBytes, $"peak grew by {MemoryProbe.Mib(growth)}");
    }

    [Fact]
    public void DirectCopyHoldsOneSliceOfMappedPages()
    {
        TestSupport.Init();
        using var dir = TestSupport.TempDir();
        var path = Write(dir.Path, out var expected);
        using var file = SafeTensorsFile.Open(path);
        using var destination = empty(Rows, Columns); // untouched pages: not resident until the copy writes them
        long before = Settle();
        file.CopyTo("w", destination);
        long growth = MemoryProbe.PeakBytes - before;
        output.WriteLine($"fp32 copy of {MemoryProbe.Mib(Rows * Columns * 4)}: peak +{MemoryProbe.Mib(growth)}");
        Assert.True(destination.to(ScalarType.BFloat16).Same(expected), "the copied tensor differs from the written one");
        Assert.True(growth < Rows * Columns * 4 + WeightLoadLayout.SliceBytes + MarginBytes, $"peak grew by {MemoryProbe.Mib(growth)}");
    }

    // Writes a random fp32 [Rows, Columns] tensor "w"; keeps only its bf16 rounding for the comparison.
    private static string Write(string folder, out Tensor expectedBf16)
    {
        var path = Path.Combine(folder, "w.safetensors");
        using (var w = randn(Rows, Columns))
        {
            SafeTensors.Write(path, [("w", w)]);
            expectedBf16 = w.to(ScalarType.BFloat16);
        }
        return path;
    }

    private static long Settle()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        StepScope.TrimHeap();
        MemoryProbe.ResetPeak();
        return MemoryProbe.CurrentBytes;
    }
}
