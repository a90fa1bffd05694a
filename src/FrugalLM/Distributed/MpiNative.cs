using System.Runtime.InteropServices;

namespace FrugalLM.Distributed;

/// <summary>
/// OpenMPI's C API, bound at run time from <c>libmpi.so.40</c>. Not MPI.NET: it supports only MS-MPI and MPICH.
/// OpenMPI's predefined handles (MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ...) are macros for the addresses of
/// exported globals (<c>&amp;ompi_mpi_comm_world</c>), so they come from the library's export table; another MPI
/// defines them differently, which is why this binds OpenMPI only.
/// </summary>
internal static unsafe class MpiNative
{
    public const string LibraryName = "libmpi.so.40";
    public const int Success = 0;
    public const int ThreadSerialized = 2; // MPI_THREAD_SERIALIZED in OpenMPI's mpi.h

    /// <summary>MPI_IN_PLACE is <c>(void*)1</c> in OpenMPI.</summary>
    public static readonly void* InPlace = (void*)1;

    private static readonly Lock Gate = new();
    private static IntPtr library;

    public static IntPtr CommWorld { get; private set; }
    public static IntPtr Float { get; private set; }
    public static IntPtr UInt16 { get; private set; }
    public static IntPtr OpSum { get; private set; }

    public static delegate* unmanaged<int*, int> Initialized;
    public static delegate* unmanaged<int*, int> Finalized;
    public static delegate* unmanaged<int*, byte***, int, int*, int> InitThread;
    public static delegate* unmanaged<int> Finalize;
    public static delegate* unmanaged<IntPtr, int, int> Abort;
    public static delegate* unmanaged<IntPtr, int*, int> CommRank;
    public static delegate* unmanaged<IntPtr, int*, int> CommSize;
    public static delegate* unmanaged<void*, int, IntPtr, void*, int, IntPtr, IntPtr, int> Allgather;
    public static delegate* unmanaged<void*, int, IntPtr, void*, int, IntPtr, IntPtr, IntPtr*, int> Iallgather;
    public static delegate* unmanaged<IntPtr*, void*, int> Wait;
    public static delegate* unmanaged<int, IntPtr*, int*, void*, int> Testall;
    public static delegate* unmanaged<void*, void*, int, IntPtr, IntPtr, IntPtr, IntPtr*, int> Iallreduce;
    public static delegate* unmanaged<void*, int, IntPtr, int, IntPtr, IntPtr*, int> Ibcast;
    public static delegate* unmanaged<IntPtr, IntPtr*, int> Ibarrier;
    public static delegate* unmanaged<void*, int, IntPtr, int, int, IntPtr, IntPtr*, int> Isend;
    public static delegate* unmanaged<void*, int, IntPtr, int, int, IntPtr, IntPtr*, int> Irecv;
    public static delegate* unmanaged<void*, void*, int, IntPtr, IntPtr, IntPtr, int> Allreduce;
    public static delegate* unmanaged<void*, int, IntPtr, int, IntPtr, int> Bcast;
    public static delegate* unmanaged<IntPtr, int> Barrier;
    public static delegate* unmanaged<void*, int, IntPtr, int, int, void*, int, IntPtr, int, int, IntPtr, void*, int> Sendrecv;
    public static delegate* unmanaged<int, IntPtr, IntPtr*, int> TypeContiguous;
    public static delegate* unmanaged<IntPtr, long, long, IntPtr*, int> TypeCreateResized;
    public static delegate* unmanaged<IntPtr*, int> TypeCommit;
    public static delegate* unmanaged<IntPtr*, int> TypeFree;
    public static delegate* unmanaged<int, byte*, int*, int> ErrorString;

    /// <summary>Loads the library and resolves every entry point once; throws a message naming the fix when it is absent.</summary>
    public static void Load(string name = LibraryName)
    {
        lock (Gate)
        {
            if (library != IntPtr.Zero)
            {
                return;
            }
            if (!NativeLibrary.TryLoad(name, out var handle))
            {
                throw new InvalidOperationException(
                    $"OpenMPI's {name} could not be loaded: install openmpi-bin (apt-get install openmpi-bin, or run tools/setup.sh)");
            }
            IntPtr Get(string symbol) => NativeLibrary.TryGetExport(handle, symbol, out var address)
                ? address
                : throw new InvalidOperationException($"{name} has no symbol {symbol}: FrugalLM binds OpenMPI 4 (Debian's openmpi-bin)");
            CommWorld = Get("ompi_mpi_comm_world");
            Float = Get("ompi_mpi_float");
            UInt16 = Get("ompi_mpi_uint16_t");
            OpSum = Get("ompi_mpi_op_sum");
            Initialized = (delegate* unmanaged<int*, int>)Get("MPI_Initialized");
            Finalized = (delegate* unmanaged<int*, int>)Get("MPI_Finalized");
            InitThread = (delegate* unmanaged<int*, byte***, int, int*, int>)Get("MPI_Init_thread");
            Finalize = (delegate* unmanaged<int>)Get("MPI_Finalize");
            Abort = (delegate* unmanaged<IntPtr, int, int>)Get("MPI_Abort");
            CommRank = (delegate* unmanaged<IntPtr, int*, int>)Get("MPI_Comm_rank");
            CommSize = (delegate* unmanaged<IntPtr, int*, int>)Get("MPI_Comm_size");
            Allgather = (delegate* unmanaged<void*, int, IntPtr, void*, int, IntPtr, IntPtr, int>)Get("MPI_Allgather");
            Iallgather = (delegate* unmanaged<void*, int, IntPtr, void*, int, IntPtr, IntPtr, IntPtr*, int>)Get("MPI_Iallgather");
            Wait = (delegate* unmanaged<IntPtr*, void*, int>)Get("MPI_Wait");
            Testall = (delegate* unmanaged<int, IntPtr*, int*, void*, int>)Get("MPI_Testall");
            Iallreduce = (delegate* unmanaged<void*, void*, int, IntPtr, IntPtr, IntPtr, IntPtr*, int>)Get("MPI_Iallreduce");
            Ibcast = (delegate* unmanaged<void*, int, IntPtr, int, IntPtr, IntPtr*, int>)Get("MPI_Ibcast");
            Ibarrier = (delegate* unmanaged<IntPtr, IntPtr*, int>)Get("MPI_Ibarrier");
            Isend = (delegate* unmanaged<void*, int, IntPtr, int, int, IntPtr, IntPtr*, int>)Get("MPI_Isend");
            Irecv = (delegate* unmanaged<void*, int, IntPtr, int, int, IntPtr, IntPtr*, int>)Get("MPI_Irecv");
            Allreduce = (delegate* unmanaged<void*, void*, int, IntPtr, IntPtr, IntPtr, int>)Get("MPI_Allreduce");
            Bcast = (delegate* unmanaged<void*, int, IntPtr, int, IntPtr, int>)Get("MPI_Bcast");
            Barrier = (delegate* unmanaged<IntPtr, int>)Get("MPI_Barrier");
            Sendrecv = (delegate* unmanaged<void*, int, IntPtr, int, int, void*, int, IntPtr, int, int, IntPtr, void*, int>)Get("MPI_Sendrecv");
            TypeContiguous = (delegate* unmanaged<int, IntPtr, IntPtr*, int>)Get("MPI_Type_contiguous");
            TypeCreateResized = (delegate* unmanaged<IntPtr, long, long, IntPtr*, int>)Get("MPI_Type_create_resized");
            TypeCommit = (delegate* unmanaged<IntPtr*, int>)Get("MPI_Type_commit");
            TypeFree = (delegate* unmanaged<IntPtr*, int>)Get("MPI_Type_free");
            ErrorString = (delegate* unmanaged<int, byte*, int*, int>)Get("MPI_Error_string");
            library = handle;
        }
    }

    /// <summary>Throws when an MPI call failed (only reached if the job set MPI_ERRORS_RETURN; the default aborts).</summary>
    public static void Check(int code, string call)
    {
        if (code == Success)
        {
            return;
        }
        var text = new byte[512];
        int length = 0;
        fixed (byte* p = text)
        {
            _ = ErrorString(code, p, &length);
        }
        throw new InvalidOperationException($"{call} failed with MPI error {code}: {System.Text.Encoding.ASCII.GetString(text, 0, Math.Clamp(length, 0, text.Length))}");
    }
}
