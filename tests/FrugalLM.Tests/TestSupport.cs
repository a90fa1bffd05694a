using FrugalLM.Native;
using FrugalLM.Planning;

namespace FrugalLM.Tests;

/// <summary>Shared helpers: libtorch initialization, temporary folders, small configs.</summary>
internal static class TestSupport
{
    static TestSupport() => TorchRuntime.Initialize();

    /// <summary>Ensures libtorch is loaded (the static constructor does the work).</summary>
    public static void Init()
    {
    }

    /// <summary>Path of the repository root (the folder holding FrugalLM.slnx).</summary>
    public static string RepoRoot
    {
        get
        {
            var dir = new DirectoryInfo(AppContext.BaseDirectory);
            while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "FrugalLM.slnx")))
            {
                dir = dir.Parent;
            }
            return dir?.FullName ?? throw new InvalidOperationException("repository root not found");
        }
    }

    /// <summary>A fresh temporary folder, deleted when disposed.</summary>
    public static TempDir TempDir() => new();

    /// <summary>A small GQA config for fast tests.</summary>
    public static LlamaConfig TinyConfig(bool tied = false, int kvHeads = 2) => new()
    {
        VocabSize = 101,
        HiddenSize = 64,
        IntermediateSize = 144,
        NumHiddenLayers = 2,
        NumAttentionHeads = 4,
        NumKeyValueHeads = kvHeads,
        HeadDim = 16,
        MaxPositionEmbeddings = 256,
        RmsNormEps = 1e-5,
        TieWordEmbeddings = tied,
        BosTokenId = 1,
        EosTokenIds = [2],
    };
}

/// <summary>A temporary folder deleted on dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "frugal-test-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>Tensor assertions.</summary>
internal static class TensorAssert
{
    /// <summary>True when both tensors have the same shape and exactly equal elements.</summary>
    public static bool Same(this TorchSharp.torch.Tensor a, TorchSharp.torch.Tensor b) =>
        a.shape.SequenceEqual(b.shape) && a.dtype == b.dtype && a.eq(b).all().item<bool>();

    /// <summary>Norm-wise relative error ||a - b|| / ||b||, computed in float64.</summary>
    public static double RelativeError(TorchSharp.torch.Tensor actual, TorchSharp.torch.Tensor expected)
    {
        using var scope = TorchSharp.torch.NewDisposeScope();
        var a = actual.to(TorchSharp.torch.ScalarType.Float64);
        var b = expected.to(TorchSharp.torch.ScalarType.Float64);
        return (a - b).norm().item<double>() / Math.Max(1e-300, b.norm().item<double>());
    }
}

/// <summary>
/// Tests that seed the process-wide random generator and then rely on the numbers it draws (dropout masks that
/// recomputation must replay) run alone: a test on another thread drawing from it in between changes the masks.
/// </summary>
[CollectionDefinition(nameof(GlobalRandom), DisableParallelization = true)]
public sealed class GlobalRandom;
