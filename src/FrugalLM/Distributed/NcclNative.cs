using System.Runtime.InteropServices;

namespace FrugalLM.Distributed;

/// <summary>
/// NCCL's C API (<c>libnccl.so.2</c>) and the two CUDA runtime calls it needs (<c>libcudart.so</c>), bound at run
/// time so that FrugalLM builds and runs where neither exists (this project's CPU machines): <see cref="TryLoad"/>
/// then says which library is missing instead of failing at the first call. No .NET package wraps NCCL, hence the
/// hand-written binding; it covers only what <see cref="NcclCollectives"/> calls.
/// </summary>
internal static unsafe class NcclNative
{
    public const string LibraryName = "libnccl.so.2";

    // ncclDataType_t and ncclRedOp_t values from nccl.h (stable since NCCL 2.10, which added bf16 and avg).
    public const int Float16 = 6;
    public const int Float32 = 7;
    public const int BFloat16 = 9;
    public const int OpSum = 0;
    public const int OpAvg = 4;

    private static readonly Lock Gate = new();
    private static string? failure;
    private static bool loaded;

    public static delegate* unmanaged<NcclUniqueId*, int> GetUniqueId;
    public static delegate* unmanaged<IntPtr*, int, NcclUniqueId, int, int> CommInitRank;
    public static delegate* unmanaged<IntPtr, int> CommDestroy;
    public static delegate* unmanaged<int, byte*> GetErrorString;
    public static delegate* unmanaged<void*, void*, nuint, int, IntPtr, IntPtr, int> AllGather;
    public static delegate* unmanaged<void*, void*, nuint, int, int, IntPtr, IntPtr, int> ReduceScatter;
    public static delegate* unmanaged<void*, void*, nuint, int, int, IntPtr, IntPtr, int> AllReduce;
    public static delegate* unmanaged<void*, void*, nuint, int, int, IntPtr, IntPtr, int> Broadcast;
    public static delegate* unmanaged<int, int> CudaSetDevice;
    public static delegate* unmanaged<IntPtr, int> CudaStreamSynchronize;
    public static delegate* unmanaged<IntPtr, int> CudaStreamQuery;

    /// <summary>Loads NCCL and the CUDA runtime once; false with the reason when either is absent or too old.</summary>
    public static bool TryLoad(out string reason)
    {
        lock (Gate)
        {
            if (!loaded && failure is null)
            {
                failure = Load();
                loaded = failure is null;
            }
            reason = failure ?? "";
            return loaded;
        }
    }

    public static void Check(int result, string call)
    {
        if (result != 0)
        {
            string text = GetErrorString is null ? "" : Marshal.PtrToStringUTF8((IntPtr)GetErrorString(result)) ?? "";
            throw new InvalidOperationException($"{call} failed with NCCL error {result}: {text}");
        }
    }

    public static void CheckCuda(int result, string call)
    {
        if (result != 0)
        {
            throw new InvalidOperationException($"{call} failed with CUDA error {result}");
        }
    }

    private static string? Load()
    {
        if (!NativeLibrary.TryLoad(LibraryName, out var nccl))
        {
            return $"{LibraryName} could not be loaded (NCCL is not installed; FrugalLM's libtorch here is the CPU build)";
        }
        IntPtr cudart = IntPtr.Zero;
        foreach (var name in new[] { "libcudart.so", "libcudart.so.12", "libcudart.so.11.0" })
        {
            if (NativeLibrary.TryLoad(name, out cudart))
            {
                break;
            }
        }
        if (cudart == IntPtr.Zero)
        {
            return "libcudart.so (the CUDA runtime) could not be loaded";
        }
        IntPtr Find(IntPtr library, string symbol) => NativeLibrary.TryGetExport(library, symbol, out var address) ? address : IntPtr.Zero;
        var symbols = new Dictionary<string, IntPtr>
        {
            ["ncclGetUniqueId"] = Find(nccl, "ncclGetUniqueId"),
            ["ncclCommInitRank"] = Find(nccl, "ncclCommInitRank"),
            ["ncclCommDestroy"] = Find(nccl, "ncclCommDestroy"),
            ["ncclGetErrorString"] = Find(nccl, "ncclGetErrorString"),
            ["ncclAllGather"] = Find(nccl, "ncclAllGather"),
            ["ncclReduceScatter"] = Find(nccl, "ncclReduceScatter"),
            ["ncclAllReduce"] = Find(nccl, "ncclAllReduce"),
            ["ncclBroadcast"] = Find(nccl, "ncclBroadcast"),
            ["cudaSetDevice"] = Find(cudart, "cudaSetDevice"),
            ["cudaStreamSynchronize"] = Find(cudart, "cudaStreamSynchronize"),
            ["cudaStreamQuery"] = Find(cudart, "cudaStreamQuery"),
        };
        var missing = symbols.Where(s => s.Value == IntPtr.Zero).Select(s => s.Key).ToArray();
        if (missing.Length > 0)
        {
            return $"{LibraryName} or the CUDA runtime lacks {string.Join(", ", missing)} (FrugalLM needs NCCL 2.10 or newer)";
        }
        GetUniqueId = (delegate* unmanaged<NcclUniqueId*, int>)symbols["ncclGetUniqueId"];
        CommInitRank = (delegate* unmanaged<IntPtr*, int, NcclUniqueId, int, int>)symbols["ncclCommInitRank"];
        CommDestroy = (delegate* unmanaged<IntPtr, int>)symbols["ncclCommDestroy"];
        GetErrorString = (delegate* unmanaged<int, byte*>)symbols["ncclGetErrorString"];
        AllGather = (delegate* unmanaged<void*, void*, nuint, int, IntPtr, IntPtr, int>)symbols["ncclAllGather"];
        ReduceScatter = (delegate* unmanaged<void*, void*, nuint, int, int, IntPtr, IntPtr, int>)symbols["ncclReduceScatter"];
        AllReduce = (delegate* unmanaged<void*, void*, nuint, int, int, IntPtr, IntPtr, int>)symbols["ncclAllReduce"];
        Broadcast = (delegate* unmanaged<void*, void*, nuint, int, int, IntPtr, IntPtr, int>)symbols["ncclBroadcast"];
        CudaSetDevice = (delegate* unmanaged<int, int>)symbols["cudaSetDevice"];
        CudaStreamSynchronize = (delegate* unmanaged<IntPtr, int>)symbols["cudaStreamSynchronize"];
        CudaStreamQuery = (delegate* unmanaged<IntPtr, int>)symbols["cudaStreamQuery"];
        return null;
    }
}

/// <summary>NCCL's <c>ncclUniqueId</c>: 128 opaque bytes that rank 0 makes and every rank passes to ncclCommInitRank.</summary>
[StructLayout(LayoutKind.Sequential, Size = 128)]
internal unsafe struct NcclUniqueId
{
    public fixed byte Internal[128];
}
