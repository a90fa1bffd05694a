using System.CommandLine;
using TorchSharp;

namespace FrugalLM.Cli.Commands;

/// <summary>
/// <c>--device cpu|cuda</c> of generate, eval, train and bench. FrugalLM runs on CPU today: the libtorch package is
/// chosen in build/TorchSharpNative.props (<c>FrugalRuntimeIdentifier</c>), and the CUDA one
/// (<c>libtorch-cuda-12.8-linux-x64</c>) is not served by this project's NuGet feed, so <c>cuda</c> says exactly which
/// of the two things is missing instead of silently running on the CPU.
/// </summary>
internal static class DeviceOption
{
    public static Option<string> Create() => new("--device")
    {
        Description = "cpu, or cuda (needs the CUDA build of libtorch: -p:FrugalRuntimeIdentifier=linux-x64-cuda; see tools/gpu-check.sh)",
        DefaultValueFactory = _ => "cpu",
    };

    /// <summary>Accepts cpu; stops with a message naming what is missing for cuda (before TorchRuntime.Initialize).</summary>
    public static void Require(string? device)
    {
        switch (device?.Trim().ToLowerInvariant())
        {
            case null or "" or "cpu":
                return;
            case "cuda":
                if (!torch.cuda.is_available())
                {
                    throw new ArgumentException(
                        "--device cuda: CUDA is not available: this build uses libtorch's CPU package (libtorch-cpu-linux-x64). " +
                        "Build with -p:FrugalRuntimeIdentifier=linux-x64-cuda on a machine with an NVIDIA driver and a feed that serves libtorch-cuda-12.8-linux-x64 (tools/gpu-check.sh)");
                }
                throw new ArgumentException(
                    $"--device cuda: CUDA is available ({torch.cuda.device_count()} device(s)), but FrugalLM's runtime does not place models on CUDA yet: its int8 kernels, " +
                    "offload and collectives work on CPU memory (issue 9)");
            default:
                throw new ArgumentException($"--device {device}: expected cpu or cuda");
        }
    }
}
