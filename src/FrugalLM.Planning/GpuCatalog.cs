using System.Globalization;

namespace FrugalLM.Planning;

/// <summary>One accelerator (or the CPU) as the estimator and planner see it.</summary>
/// <param name="Name">CLI name, e.g. <c>rtx3090</c>.</param>
/// <param name="DisplayName">Marketing name.</param>
/// <param name="Device">CUDA GPU or CPU.</param>
/// <param name="MemoryBytes">Total device memory (nvidia-smi's total where known, else the nominal size in GiB).
/// The CUDA context is not subtracted here: the estimate carries it as a component.</param>
/// <param name="NominalGb">The advertised size in GB, which the article's method uses as decimal gigabytes.</param>
/// <param name="Bf16Tflops">Dense bf16 tensor throughput with fp32 accumulation (0 without bf16 support).</param>
/// <param name="Fp16Tflops">Dense fp16 tensor throughput with fp32 accumulation.</param>
/// <param name="Fp32Tflops">fp32 throughput without TF32 (PyTorch's default for matmul).</param>
/// <param name="MemoryBandwidthGBps">Device memory bandwidth, GB/s.</param>
/// <param name="HostLinkGBps">Host link bandwidth per direction, GB/s (PCIe generation x16).</param>
public sealed record GpuSpec(
    string Name,
    string DisplayName,
    ComputeDevice Device,
    long MemoryBytes,
    double NominalGb,
    double Bf16Tflops,
    double Fp16Tflops,
    double Fp32Tflops,
    double MemoryBandwidthGBps,
    double HostLinkGBps)
{
    /// <summary>Whether bf16 runs natively (Ampere and later, and the CPU here).</summary>
    public bool SupportsBf16 => Bf16Tflops > 0;

    /// <summary>Peak matmul throughput for a precision, TFLOP/s.</summary>
    public double Tflops(Precision precision) => precision switch
    {
        Precision.Fp32 => Fp32Tflops,
        Precision.Fp16 => Fp16Tflops,
        _ => Bf16Tflops,
    };
}

/// <summary>
/// Known GPUs. Throughputs are dense (no 2:4 sparsity) datasheet peaks from NVIDIA's product pages and architecture
/// whitepapers (GeForce cards at their fp32-accumulate tensor rate); the planner uses them only to rank
/// configurations against each other.
/// </summary>
public static class GpuCatalog
{
    private const long MiB = ByteSize.MiB;
    private const long GiB = ByteSize.GiB;

    /// <summary>Every known GPU.</summary>
    public static IReadOnlyList<GpuSpec> Gpus { get; } =
    [
        new("rtx3060", "GeForce RTX 3060 12GB", ComputeDevice.Cuda, 12 * GiB, 12, 25.5, 25.5, 12.7, 360, 32),
        new("rtx3090", "GeForce RTX 3090", ComputeDevice.Cuda, 24 * GiB, 24, 71, 71, 35.6, 936, 32),
        new("rtx4090", "GeForce RTX 4090", ComputeDevice.Cuda, 24 * GiB, 24, 165.2, 165.2, 82.6, 1008, 32),
        new("t4", "Tesla T4", ComputeDevice.Cuda, 15360 * MiB, 16, 0, 65, 8.1, 320, 16),
        new("l4", "L4", ComputeDevice.Cuda, 24 * GiB, 24, 121, 121, 30.3, 300, 32),
        new("a10", "A10", ComputeDevice.Cuda, 24 * GiB, 24, 125, 125, 31.2, 600, 32),
        new("v100-16gb", "Tesla V100 16GB", ComputeDevice.Cuda, 16 * GiB, 16, 0, 125, 15.7, 900, 16),
        new("v100-32gb", "Tesla V100 32GB", ComputeDevice.Cuda, 32 * GiB, 32, 0, 125, 15.7, 900, 16),
        new("a100-40gb", "A100 40GB", ComputeDevice.Cuda, 40 * GiB, 40, 312, 312, 19.5, 1555, 32),
        new("a100-80gb", "A100 80GB", ComputeDevice.Cuda, 80 * GiB, 80, 312, 312, 19.5, 2039, 32),
        new("h100-80gb", "H100 80GB SXM", ComputeDevice.Cuda, 81559 * MiB, 80, 989, 989, 67, 3350, 64),
        new("h200", "H200 141GB", ComputeDevice.Cuda, 143771 * MiB, 141, 989, 989, 67, 4800, 64),
    ];

    /// <summary>Names accepted by <see cref="Find"/>: every GPU plus <c>cpu</c>.</summary>
    public static IReadOnlyList<string> Names { get; } = [.. Gpus.Select(g => g.Name), "cpu"];

    /// <summary>
    /// The CPU as a device with <paramref name="memoryBytes"/> of RAM. Throughputs are this project's measurement of
    /// a 512x2048x2048 matmul with libtorch on the development machine (AMD Zen 4: fp32 63 ms, bf16 29 ms, fp16 14 s;
    /// see shared environment notes) and one-thread memory bandwidth, so CPU plans rank fp32 below bf16 and avoid fp16.
    /// </summary>
    public static GpuSpec Cpu(long memoryBytes) =>
        new("cpu", "CPU (host RAM)", ComputeDevice.Cpu, memoryBytes, memoryBytes / 1e9, 0.148, 0.0003, 0.068, 22.5, 0);

    /// <summary>
    /// Finds a device by name (case-insensitive; "3090" finds rtx3090). <c>cpu</c> needs the RAM size:
    /// <paramref name="cpuMemoryBytes"/>, or MemAvailable from /proc/meminfo when null.
    /// </summary>
    /// <exception cref="PlanException">Unknown name, or no RAM size for <c>cpu</c>.</exception>
    public static GpuSpec Find(string name, long? cpuMemoryBytes = null)
    {
        var key = name.Trim().ToLowerInvariant();
        if (key == "cpu")
        {
            var bytes = cpuMemoryBytes ?? HostMemory.AvailableBytes()
                ?? throw new PlanException("cannot read /proc/meminfo: give the RAM budget with --memory");
            return Cpu(bytes);
        }
        return Gpus.FirstOrDefault(g => g.Name == key)
            ?? Gpus.FirstOrDefault(g => g.Name == "rtx" + key)
            ?? throw new PlanException($"unknown GPU '{name}' (known: {string.Join(", ", Names)}); or give --budget 24GiB");
    }
}

/// <summary>Reads the host's memory from /proc/meminfo.</summary>
public static class HostMemory
{
    /// <summary>MemAvailable in bytes (what a new process can use without swapping), or null when unreadable.</summary>
    public static long? AvailableBytes(string path = "/proc/meminfo")
    {
        if (!File.Exists(path))
        {
            return null;
        }
        foreach (var line in File.ReadLines(path))
        {
            if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
            {
                var fields = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (fields.Length >= 2 && long.TryParse(fields[1], NumberStyles.None, CultureInfo.InvariantCulture, out var kib))
                {
                    return kib * 1024;
                }
            }
        }
        return null;
    }
}
