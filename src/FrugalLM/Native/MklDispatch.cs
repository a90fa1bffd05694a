using System.Runtime.InteropServices;

namespace FrugalLM.Native;

/// <summary>
/// Lets the oneMKL that libtorch links statically choose its GEMM kernels by the CPU's features on AMD processors.
/// </summary>
/// <remarks>
/// oneMKL (2024.0 in libtorch 2.10) asks one function, <c>mkl_serv_intel_cpu_true</c>, whether the vendor string is
/// GenuineIntel, and on other CPUs takes slower kernels whatever the CPU's instruction set. Measured on this AMD EPYC
/// (Zen 4, AVX-512), 2 threads: the bundled model's LM head, 1024x256 by 256x50257 fp32, 300-330 ms against 207-222 ms
/// once the answer is yes; a 512x4096 by 4096x4096 product 143-149 ms against 86-116 ms; OpenBLAS (the peer PyTorch's
/// BLAS) 199-221 and 98-145 ms. The function returns a flag it caches in a global after the first check; this class
/// stores 1 in that flag before any product runs, which is what oneMKL itself stores on an Intel CPU. No code is
/// modified: the flag's address is read from the function's first instruction, and only when the function begins
/// with the expected load (<c>mov eax, [rip + disp32]; test eax, eax; js</c>) is anything written; otherwise the
/// dispatch is left as it is and <see cref="Status"/> says why. <c>FRUGAL_MKL_VENDOR_CHECK=keep</c> leaves it alone.
/// Hand-written because neither oneMKL (its <c>MKL_DEBUG_CPU_TYPE</c> override was removed in 2020) nor TorchSharp
/// offers a switch.
/// </remarks>
public static class MklDispatch
{
    private const int RtldNow = 2;
    private const int RtldNoLoad = 4;

    /// <summary>What <see cref="Apply"/> did, for run reports: "feature dispatch", "vendor default (...)" or null before it ran.</summary>
    public static string? Status { get; private set; }

    /// <summary>
    /// On an AMD CPU, sets oneMKL's cached vendor check so it dispatches by CPU features. Call after libtorch is loaded
    /// and before its first matrix product; a no-op on other CPUs, without oneMKL, or when the user opted out.
    /// </summary>
    internal static unsafe void Apply()
    {
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64)
        {
            Status = "vendor default (not x86-64 Linux)";
            return;
        }
        if (Environment.GetEnvironmentVariable("FRUGAL_MKL_VENDOR_CHECK") == "keep")
        {
            Status = "vendor default (FRUGAL_MKL_VENDOR_CHECK=keep)";
            return;
        }
        if (!IsAmd())
        {
            Status = "vendor default (not an AMD CPU)";
            return;
        }
        nint library = dlopen("libtorch_cpu.so", RtldNow | RtldNoLoad);
        nint function = library == 0 ? 0 : dlsym(library, "mkl_serv_intel_cpu_true");
        if (function == 0)
        {
            Status = "vendor default (libtorch has no oneMKL vendor check)";
            return;
        }
        byte* code = (byte*)function;
        // 8B 05 d32 = mov eax, [rip + d32]; 85 C0 = test eax, eax; 78 = js (compute the flag when it is negative).
        if (code[0] != 0x8B || code[1] != 0x05 || code[6] != 0x85 || code[7] != 0xC0 || code[8] != 0x78)
        {
            Status = "vendor default (unrecognised oneMKL vendor check)";
            return;
        }
        int* flag = (int*)(code + 6 + *(int*)(code + 2));
        *flag = 1;
        Status = "feature dispatch";
    }

    private static bool IsAmd()
    {
        try
        {
            return File.ReadLines("/proc/cpuinfo")
                .FirstOrDefault(l => l.StartsWith("vendor_id", StringComparison.Ordinal))?
                .Contains("AuthenticAMD", StringComparison.Ordinal) == true;
        }
        catch (IOException)
        {
            return false;
        }
    }

    [DllImport("libc", CharSet = CharSet.Ansi, BestFitMapping = false, ThrowOnUnmappableChar = true)]
    private static extern nint dlopen(string file, int mode);

    [DllImport("libc", CharSet = CharSet.Ansi, BestFitMapping = false, ThrowOnUnmappableChar = true)]
    private static extern nint dlsym(nint handle, string name);
}
