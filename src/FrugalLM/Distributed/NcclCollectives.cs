using TorchSharp;

namespace FrugalLM.Distributed;

/// <summary>
/// <see cref="ICollectives"/> over NCCL for CUDA tensors: one process per GPU, started by <c>mpirun</c>, with NCCL's
/// unique id made by rank 0 and broadcast through the OpenMPI backend (the bootstrap). Every call is enqueued on the
/// default CUDA stream and synchronized before it returns, except <see cref="AllGatherAsync"/>, whose request waits
/// on the stream. Counts are 64-bit in NCCL, so no chunking is needed. Where <c>libnccl.so.2</c> or the CUDA runtime
/// is absent, <see cref="Initialize"/> throws "NCCL not available" naming the missing library: nothing is emulated.
/// </summary>
public sealed unsafe class NcclCollectives : ICollectives
{
    private readonly ICollectives bootstrap;
    private IntPtr comm;

    private NcclCollectives(ICollectives bootstrap, IntPtr comm)
    {
        this.bootstrap = bootstrap;
        this.comm = comm;
    }

    /// <inheritdoc />
    public int Rank => bootstrap.Rank;

    /// <inheritdoc />
    public int WorldSize => bootstrap.WorldSize;

    /// <inheritdoc />
    public string Backend => "nccl";

    /// <summary>Whether NCCL and the CUDA runtime can be loaded here; <paramref name="reason"/> says why not.</summary>
    public static bool IsAvailable(out string reason) => NcclNative.TryLoad(out reason);

    /// <summary>
    /// Creates the NCCL communicator of all ranks of <paramref name="bootstrap"/> (which this instance owns and
    /// disposes), on GPU <paramref name="device"/> of this process (by default the rank modulo the GPUs per node,
    /// <c>OMPI_COMM_WORLD_LOCAL_RANK</c>).
    /// </summary>
    public static NcclCollectives Initialize(ICollectives bootstrap, int? device = null)
    {
        ArgumentNullException.ThrowIfNull(bootstrap);
        if (!IsAvailable(out var reason))
        {
            throw new BackendUnavailableException($"NCCL not available: {reason}. Use the OpenMPI backend (FRUGAL_COLLECTIVES=mpi, the default).");
        }
        int gpu = device ?? int.Parse(Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_LOCAL_RANK") ?? "0", System.Globalization.CultureInfo.InvariantCulture);
        NcclNative.CheckCuda(NcclNative.CudaSetDevice(gpu), $"cudaSetDevice({gpu})");
        NcclUniqueId id;
        if (bootstrap.Rank == 0)
        {
            NcclNative.Check(NcclNative.GetUniqueId(&id), "ncclGetUniqueId");
        }
        // The 128 id bytes travel as 64 bf16 words: the bootstrap moves bf16 as raw 16-bit words in broadcasts.
        using (var words = torch.zeros(64, dtype: torch.ScalarType.BFloat16))
        {
            var bytes = new Span<byte>(Native.TensorMemory.Pointer(words), 128);
            if (bootstrap.Rank == 0)
            {
                new ReadOnlySpan<byte>(id.Internal, 128).CopyTo(bytes);
            }
            bootstrap.Broadcast(words, root: 0);
            bytes.CopyTo(new Span<byte>(id.Internal, 128));
        }
        IntPtr communicator;
        NcclNative.Check(NcclNative.CommInitRank(&communicator, bootstrap.WorldSize, id, bootstrap.Rank), "ncclCommInitRank");
        return new NcclCollectives(bootstrap, communicator);
    }

    /// <inheritdoc />
    public void AllGather(torch.Tensor input, torch.Tensor output)
    {
        using var request = AllGatherAsync(input, output);
        request.Wait();
    }

    /// <inheritdoc />
    public ICollectiveRequest AllGatherAsync(torch.Tensor input, torch.Tensor output)
    {
        CollectiveChecks.AllGather(input, output, WorldSize, DeviceType.CUDA);
        NcclNative.Check(NcclNative.AllGather(Data(input), Data(output), (nuint)input.numel(), DataType(input), comm, IntPtr.Zero), "ncclAllGather");
        return new StreamRequest();
    }

    /// <inheritdoc />
    public void ReduceScatter(torch.Tensor input, torch.Tensor output, ReduceOp op)
    {
        CollectiveChecks.ReduceScatter(input, output, WorldSize, DeviceType.CUDA);
        NcclNative.Check(NcclNative.ReduceScatter(Data(input), Data(output), (nuint)output.numel(), DataType(input), Op(op), comm, IntPtr.Zero), "ncclReduceScatter");
        Synchronize();
    }

    /// <inheritdoc />
    public void AllReduce(torch.Tensor tensor, ReduceOp op)
    {
        CollectiveChecks.Tensor(tensor, nameof(tensor), "all-reduce", DeviceType.CUDA);
        NcclNative.Check(NcclNative.AllReduce(Data(tensor), Data(tensor), (nuint)tensor.numel(), DataType(tensor), Op(op), comm, IntPtr.Zero), "ncclAllReduce");
        Synchronize();
    }

    /// <inheritdoc />
    public void Broadcast(torch.Tensor tensor, int root)
    {
        CollectiveChecks.Tensor(tensor, nameof(tensor), "broadcast", DeviceType.CUDA, moveOnly: true);
        CollectiveChecks.Root(root, WorldSize);
        NcclNative.Check(NcclNative.Broadcast(Data(tensor), Data(tensor), (nuint)tensor.numel(), DataType(tensor), root, comm, IntPtr.Zero), "ncclBroadcast");
        Synchronize();
    }

    /// <inheritdoc />
    public void Barrier() => bootstrap.Barrier();

    /// <inheritdoc />
    public void Dispose()
    {
        if (comm != IntPtr.Zero)
        {
            _ = NcclNative.CommDestroy(comm);
            comm = IntPtr.Zero;
        }
        bootstrap.Dispose();
    }

    // THSTensor_data gives the device address of a CUDA tensor as well (TensorMemory.Pointer refuses non-CPU tensors).
    private static void* Data(torch.Tensor tensor) => (void*)THSTensor_data(tensor.Handle);

    private static int DataType(torch.Tensor tensor) => tensor.dtype switch
    {
        torch.ScalarType.BFloat16 => NcclNative.BFloat16,
        torch.ScalarType.Float16 => NcclNative.Float16,
        _ => NcclNative.Float32,
    };

    private static int Op(ReduceOp op) => op == ReduceOp.Avg ? NcclNative.OpAvg : NcclNative.OpSum;

    private static void Synchronize() => NcclNative.CheckCuda(NcclNative.CudaStreamSynchronize(IntPtr.Zero), "cudaStreamSynchronize");

    [System.Runtime.InteropServices.DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr handle);

    private sealed class StreamRequest : ICollectiveRequest
    {
        private bool done;

        // cudaStreamQuery: 0 when everything enqueued on the stream has finished, cudaErrorNotReady (600) while not.
        public bool IsCompleted => done || (done = NcclNative.CudaStreamQuery(IntPtr.Zero) == 0);

        public void Wait()
        {
            if (!done)
            {
                Synchronize();
                done = true;
            }
        }

        public void Dispose() => Wait();
    }
}
