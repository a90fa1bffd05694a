namespace FrugalLM.Native;

/// <summary>What this CPU can do natively that decides how 16-bit tensors are computed.</summary>
public static class CpuFeatures
{
    private static readonly Lazy<bool> Bf16 = new(DetectNativeBFloat16);

    /// <summary>
    /// True when the CPU has bf16 dot-product instructions (x86 AVX-512 BF16 or AMX-BF16, Arm BF16), with which
    /// libtorch's bf16 GEMM is faster than fp32. Without them libtorch emulates it, 6-8x slower than fp32
    /// (measured on an AVX2-only AMD EPYC: a 1024x256 by 256x50257 product 4.0 s in bf16, 0.7 s in fp32).
    /// <c>FRUGAL_BF16_MATMUL=native</c> or <c>=fp32</c> overrides the detection.
    /// </summary>
    public static bool NativeBFloat16 => Bf16.Value;

    private static bool DetectNativeBFloat16()
    {
        switch (Environment.GetEnvironmentVariable("FRUGAL_BF16_MATMUL"))
        {
            case "native":
                return true;
            case "fp32":
                return false;
        }
        try
        {
            // The first CPU's flags stand for all; /proc/cpuinfo lists "flags" on x86 and "Features" on Arm.
            var line = File.ReadLines("/proc/cpuinfo")
                .FirstOrDefault(l => l.StartsWith("flags", StringComparison.Ordinal) || l.StartsWith("Features", StringComparison.Ordinal));
            var flags = line?.Split(':', 2)[^1].Split(' ', StringSplitOptions.RemoveEmptyEntries) ?? [];
            return flags.Contains("avx512_bf16") || flags.Contains("amx_bf16") || flags.Contains("bf16");
        }
        catch (IOException)
        {
            return false;
        }
    }
}
