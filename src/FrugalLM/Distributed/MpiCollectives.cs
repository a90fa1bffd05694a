using System.Diagnostics;
using System.Numerics;
using FrugalLM.Native;
using TorchSharp;

namespace FrugalLM.Distributed;

/// <summary>
/// Collectives over OpenMPI (Debian's <c>openmpi-bin</c>, <c>libmpi.so.40</c>), called through P/Invoke on the
/// tensors' own memory, with no copies for fp32 and for moving bf16. One instance per process: MPI can be
/// initialized once, and disposing finalizes it.
/// </summary>
/// <remarks>
/// Reduce-scatter is a ring of <c>MPI_Sendrecv</c> rather than <c>MPI_Reduce_scatter_block</c>, which OpenMPI 4
/// implements slowly (measured on 2 ranks, 64 MiB fp32: 55-74 ms against 17-18 ms for the ring). The ring sums
/// each element in a rank-dependent order, so results match a single-process sum within fp32 reduction-order
/// rounding, and every rank's slice is computed by one rank only. OpenMPI progresses non-blocking collectives
/// only inside MPI calls (no progress thread by default), so an <see cref="AllGatherAsync"/> mostly moves data
/// when it is waited on unless the transport (shared memory between local ranks) completes it eagerly.
/// </remarks>
public sealed unsafe class MpiCollectives : ICollectives
{
    private const int RingTag = 0x4652; // "FR": keeps the ring's messages apart from any other point-to-point use
    private static readonly Lock InitGate = new();
    private static bool initializedOnce;
    private readonly Lock gate = new();
    private long calls;
    private torch.Tensor? scratch;
    private bool disposed;

    private MpiCollectives(int rank, int worldSize)
    {
        Rank = rank;
        WorldSize = worldSize;
    }

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int WorldSize { get; }

    /// <inheritdoc/>
    public string Backend => "openmpi";

    /// <summary>
    /// The most elements one MPI call moves; larger tensors are split into several calls. MPI counts are 32-bit,
    /// hence <see cref="int.MaxValue"/>; tests lower it to run the split paths on small tensors.
    /// </summary>
    public int MaxElementsPerCall { get; set; } = int.MaxValue;

    /// <summary>
    /// Largest piece, in elements, that a reduction works on through scratch memory (the ring's receive and
    /// accumulation buffers, the fp32 copies of bf16 data): bounds the extra memory a reduction needs to a few
    /// times 64 MiB while keeping each message large enough that latency does not matter.
    /// </summary>
    public int ScratchElements { get; set; } = 1 << 24;

    /// <summary>
    /// How long one collective may wait for the other ranks before the job is aborted (<see cref="Timeout.InfiniteTimeSpan"/>:
    /// wait forever, as plain MPI does). A rank that hangs while alive (a deadlock, a stuck file system, a stopped
    /// process) is not noticed by mpirun, which only sees ranks that exit; without a deadline the others would block in
    /// their next collective forever. It must exceed the longest time ranks legitimately spend apart between two
    /// collectives: rank 0 writing a save while the others wait in a barrier, or a slow first step.
    /// </summary>
    public TimeSpan Timeout { get; set; } = DefaultTimeout;

    /// <summary>The default <see cref="Timeout"/>: five minutes.</summary>
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromMinutes(5);

    /// <summary>
    /// What happens when a collective times out, given the message: by default it is printed to stderr and
    /// <c>MPI_Abort</c> ends every rank (mpirun returns exit code 1). A collective cannot be cancelled in MPI, so this
    /// process cannot go on communicating either; tests replace it to observe the message.
    /// </summary>
    public Action<string> OnTimeout { get; set; } = DefaultOnTimeout;

    /// <summary>Collectives started by this process so far (the number in a timeout's message).</summary>
    public long CallCount => calls;

    /// <summary>
    /// Initializes MPI (serialized threading: calls may come from any thread, one at a time) and returns this
    /// process's collectives. Throws when OpenMPI is not installed or MPI was already initialized here.
    /// </summary>
    public static MpiCollectives Initialize()
    {
        lock (InitGate)
        {
            if (initializedOnce)
            {
                throw new InvalidOperationException("MPI was already initialized in this process; share the one MpiCollectives instance");
            }
            MpiNative.Load();
            int provided = 0, rank = 0, size = 0;
            MpiNative.Check(MpiNative.InitThread(null, null, MpiNative.ThreadSerialized, &provided), "MPI_Init_thread");
            initializedOnce = true;
            if (provided < MpiNative.ThreadSerialized)
            {
                throw new InvalidOperationException($"MPI_Init_thread gave thread level {provided}; FrugalLM needs MPI_THREAD_SERIALIZED (2)");
            }
            MpiNative.Check(MpiNative.CommRank(MpiNative.CommWorld, &rank), "MPI_Comm_rank");
            MpiNative.Check(MpiNative.CommSize(MpiNative.CommWorld, &size), "MPI_Comm_size");
            return new MpiCollectives(rank, size);
        }
    }

    /// <summary>
    /// Ends every rank of the job with <paramref name="exitCode"/>: what a rank does after an error it cannot
    /// share with the others, which would otherwise wait forever in their next collective.
    /// </summary>
    public void Abort(int exitCode) => _ = MpiNative.Abort(MpiNative.CommWorld, exitCode);

    /// <inheritdoc/>
    public void AllGather(torch.Tensor input, torch.Tensor output)
    {
        CollectiveChecks.AllGather(input, output, WorldSize);
        lock (gate)
        {
            foreach (var call in GatherCalls(input, output))
            {
                IntPtr request;
                MpiNative.Check(MpiNative.Iallgather((void*)call.Send, call.Count, call.Type, (void*)call.Receive, 1, call.ReceiveType, MpiNative.CommWorld, &request), "MPI_Iallgather");
                FreeType(call.ReceiveType);
                Complete(&request, 1, "all-gather", call.Count, null);
            }
        }
    }

    /// <inheritdoc/>
    public ICollectiveRequest AllGatherAsync(torch.Tensor input, torch.Tensor output)
    {
        CollectiveChecks.AllGather(input, output, WorldSize);
        var requests = new List<IntPtr>();
        lock (gate)
        {
            foreach (var call in GatherCalls(input, output))
            {
                IntPtr request;
                MpiNative.Check(MpiNative.Iallgather((void*)call.Send, call.Count, call.Type, (void*)call.Receive, 1, call.ReceiveType, MpiNative.CommWorld, &request), "MPI_Iallgather");
                // MPI lets a datatype be freed while operations using it are pending; they complete normally.
                FreeType(call.ReceiveType);
                requests.Add(request);
            }
        }
        return new Request(this, requests);
    }

    /// <inheritdoc/>
    public void ReduceScatter(torch.Tensor input, torch.Tensor output, ReduceOp op)
    {
        CollectiveChecks.ReduceScatter(input, output, WorldSize);
        // In place (output = this rank's slot of input) is safe: the ring writes the output only in its last step,
        // after its last read of that slot. Any other overlap is refused here.
        _ = CollectiveChecks.IsOwnSlot(output, input, Rank, "reduce-scatter");
        long n = output.numel();
        if (n == 0)
        {
            return;
        }
        lock (gate)
        {
            if (input.dtype == torch.ScalarType.Float32)
            {
                int piece = PieceLength(n, 2);
                var s = (float*)TensorMemory.Pointer(Scratch(2L * piece));
                var src = (float*)TensorMemory.Pointer(input);
                var dst = (float*)TensorMemory.Pointer(output);
                for (long p = 0; p < n; p += piece)
                {
                    int m = (int)Math.Min(piece, n - p);
                    Ring(src + p, n, dst + p, m, s, s + piece, op);
                }
            }
            else
            {
                // bf16: widen each piece of every rank's chunk to fp32, run the fp32 ring on it, round once to bf16.
                int piece = PieceLength(n, WorldSize + 3);
                var scratch = Scratch((WorldSize + 3L) * piece);
                using var wideFlat = scratch.narrow(0, 0, WorldSize * (long)piece);
                using var wide = wideFlat.view(WorldSize, piece);
                using var sum = scratch.narrow(0, WorldSize * (long)piece, piece);
                var s = (float*)TensorMemory.Pointer(sum) + piece;
                using var chunks = input.view(WorldSize, n);
                using var flatOut = output.view(-1);
                for (long p = 0; p < n; p += piece)
                {
                    int m = (int)Math.Min(piece, n - p);
                    using var w = wide.narrow(1, 0, m);
                    using (var part = chunks.narrow(1, p, m))
                    {
                        w.copy_(part);
                    }
                    // The narrowed view is strided by 'piece' between ranks; the ring reads chunk k at k x piece.
                    Ring((float*)TensorMemory.Pointer(wide), piece, (float*)TensorMemory.Pointer(sum), m, s, s + piece, op);
                    using var got = sum.narrow(0, 0, m);
                    using var target = flatOut.narrow(0, p, m);
                    target.copy_(got);
                }
            }
        }
    }

    /// <summary>
    /// All-reduce as the ring reduce-scatter of the largest prefix that divides by the world size, done in place,
    /// then an in-place all-gather of the reduced slices; the remainder (fewer elements than ranks) goes through
    /// <c>MPI_Allreduce</c>. OpenMPI 4's own <c>MPI_Allreduce</c> took 0.9-1.4 s for 64 MiB fp32 at 2 ranks on this
    /// machine, against tens of ms for this. Every element is reduced by one rank and copied to the others, so all
    /// ranks hold the same bits, as replicated weights need.
    /// </summary>
    public void AllReduce(torch.Tensor tensor, ReduceOp op)
    {
        CollectiveChecks.Tensor(tensor, nameof(tensor), "all-reduce");
        long n = tensor.numel();
        if (n == 0)
        {
            return;
        }
        lock (gate)
        {
            using var flat = tensor.view(-1);
            long slice = n / WorldSize;
            if (slice > 0)
            {
                using var head = flat.narrow(0, 0, slice * WorldSize);
                using var own = flat.narrow(0, Rank * slice, slice);
                ReduceScatter(head, own, op);
                AllGather(own, head);
            }
            long rest = n - slice * WorldSize;
            if (rest > 0)
            {
                using var tail = flat.narrow(0, n - rest, rest);
                using var wide = Scratch(rest).narrow(0, 0, rest);
                wide.copy_(tail);
                var w = (float*)TensorMemory.Pointer(wide);
                IntPtr request;
                MpiNative.Check(MpiNative.Iallreduce(MpiNative.InPlace, w, (int)rest, MpiNative.Float, MpiNative.OpSum, MpiNative.CommWorld, &request), "MPI_Iallreduce");
                Complete(&request, 1, "all-reduce", rest, null);
                if (op == ReduceOp.Avg)
                {
                    Divide(w, rest, WorldSize);
                }
                tail.copy_(wide);
            }
        }
    }

    /// <inheritdoc/>
    public void Broadcast(torch.Tensor tensor, int root)
    {
        CollectiveChecks.Tensor(tensor, nameof(tensor), "broadcast", moveOnly: true);
        CollectiveChecks.Root(root, WorldSize);
        long n = tensor.numel();
        if (n == 0)
        {
            return;
        }
        var (type, size) = Element(tensor);
        var data = TensorMemory.Pointer(tensor);
        lock (gate)
        {
            for (long p = 0; p < n; p += MaxElementsPerCall)
            {
                int m = (int)Math.Min(MaxElementsPerCall, n - p);
                IntPtr request;
                MpiNative.Check(MpiNative.Ibcast(data + p * size, m, type, root, MpiNative.CommWorld, &request), "MPI_Ibcast");
                Complete(&request, 1, "broadcast", m, Rank == root ? null : root);
            }
        }
    }

    /// <summary>Frees the scratch memory reductions keep between calls (it is allocated again when next needed).</summary>
    public void ReleaseScratch()
    {
        lock (gate)
        {
            scratch?.Dispose();
            scratch = null;
        }
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        lock (gate)
        {
            IntPtr request;
            MpiNative.Check(MpiNative.Ibarrier(MpiNative.CommWorld, &request), "MPI_Ibarrier");
            Complete(&request, 1, "barrier", 0, null);
        }
    }

    /// <summary>Finalizes MPI; after this no collective can run in this process.</summary>
    public void Dispose()
    {
        lock (gate)
        {
            if (disposed)
            {
                return;
            }
            disposed = true;
            scratch?.Dispose();
            scratch = null;
            int finalized = 0;
            _ = MpiNative.Finalized(&finalized);
            if (finalized == 0)
            {
                MpiNative.Check(MpiNative.Finalize(), "MPI_Finalize");
            }
        }
    }

    private static (IntPtr Type, long Size) Element(torch.Tensor tensor) =>
        tensor.dtype == torch.ScalarType.Float32 ? (MpiNative.Float, 4L) : (MpiNative.UInt16, 2L); // bf16 and fp16 moved as raw 16-bit words

    /// <summary>
    /// One <c>MPI_Allgather</c> per piece of at most <see cref="MaxElementsPerCall"/> elements of each rank's input.
    /// The receive type is that piece resized to the extent of a whole rank's input, so MPI lays rank r's piece at
    /// r x input in the output directly: large gathers need no staging copy.
    /// </summary>
    private List<GatherCall> GatherCalls(torch.Tensor input, torch.Tensor output)
    {
        var calls = new List<GatherCall>();
        long n = input.numel();
        if (n == 0)
        {
            return calls;
        }
        var (type, size) = Element(input);
        bool inPlace = CollectiveChecks.IsOwnSlot(input, output, Rank, "all-gather");
        var send = TensorMemory.Pointer(input);
        var receive = TensorMemory.Pointer(output);
        for (long p = 0; p < n; p += MaxElementsPerCall)
        {
            int m = (int)Math.Min(MaxElementsPerCall, n - p);
            IntPtr piece, resized;
            MpiNative.Check(MpiNative.TypeContiguous(m, type, &piece), "MPI_Type_contiguous");
            MpiNative.Check(MpiNative.TypeCreateResized(piece, 0, n * size, &resized), "MPI_Type_create_resized");
            MpiNative.Check(MpiNative.TypeCommit(&resized), "MPI_Type_commit");
            FreeType(piece);
            calls.Add(new GatherCall((IntPtr)(inPlace ? MpiNative.InPlace : send + p * size), m, type, (IntPtr)(receive + p * size), resized));
        }
        return calls;
    }

    /// <summary>
    /// Waits for <paramref name="count"/> requests by polling <c>MPI_Testall</c> until <see cref="Timeout"/>, instead of a
    /// blocking MPI call that could wait forever. Polls continuously for the first 200 µs (small messages finish within
    /// that), then yields the core until 5 ms (ranks may share cores), then sleeps 1 ms between polls: OpenMPI makes
    /// progress only inside MPI calls, so a large transfer may lose up to a millisecond per protocol round to the sleep.
    /// </summary>
    private void Complete(IntPtr* requests, int count, string operation, long elements, int? waitingFor)
    {
        long call = ++calls;
        long start = Stopwatch.GetTimestamp();
        long limit = Timeout == System.Threading.Timeout.InfiniteTimeSpan ? long.MaxValue : (long)(Timeout.TotalSeconds * Stopwatch.Frequency);
        long spin = Stopwatch.Frequency / 5000, yieldUntil = Stopwatch.Frequency / 200;
        int flag = 0;
        for (; ;)
        {
            MpiNative.Check(MpiNative.Testall(count, requests, &flag, null), "MPI_Testall");
            if (flag != 0)
            {
                return;
            }
            long waited = Stopwatch.GetTimestamp() - start;
            if (waited > limit)
            {
                break;
            }
            if (waited < spin)
            {
                Thread.SpinWait(20);
            }
            else if (waited < yieldUntil)
            {
                Thread.Yield();
            }
            else
            {
                Thread.Sleep(1);
            }
        }
        string who = waitingFor is int r
            ? $"rank {r} never sent its part"
            : WorldSize == 2 ? $"rank {1 - Rank} did not arrive" : "one or more other ranks did not arrive (MPI does not say which)";
        OnTimeout(string.Create(System.Globalization.CultureInfo.InvariantCulture,
            $"collective timeout: {operation} (collective #{call} of this rank, {elements} elements) did not complete within {Timeout.TotalSeconds:0.###} s on rank {Rank} of {WorldSize}: {who}. A rank is hung (alive but not communicating) or stopped calling collectives in the same order; if ranks legitimately spend longer apart (a large save), raise --collective-timeout. Aborting the job."));
        throw new TimeoutException($"collective {operation} timed out on rank {Rank}");
    }

    private static void DefaultOnTimeout(string message)
    {
        Console.Out.Flush();
        Console.Error.WriteLine($"error: {message}");
        Console.Error.Flush();
        _ = MpiNative.Abort(MpiNative.CommWorld, 1);
        Environment.Exit(1); // MPI_Abort does not return in OpenMPI; this is the fallback
    }

    private static void FreeType(IntPtr type) => MpiNative.Check(MpiNative.TypeFree(&type), "MPI_Type_free");

    /// <summary>
    /// At least <paramref name="elements"/> fp32 of scratch, kept between calls: fresh pages cost a page fault each
    /// on first touch (measured here: 600 ms to zero a new 64 MiB tensor on a loaded 2-core VM, 3.5 ms to add
    /// two touched 32 MiB ones), and FSDP reduces every layer every step, so the buffer is reused.
    /// </summary>
    private torch.Tensor Scratch(long elements)
    {
        if (scratch is null || scratch.numel() < elements)
        {
            scratch?.Dispose();
            // Detached: a caller's dispose scope (FSDP reduces inside each layer's backward scope) would dispose it.
            scratch = torch.empty(elements, torch.ScalarType.Float32).DetachFromDisposeScope();
        }
        return scratch;
    }

    /// <summary>Elements per piece so that <paramref name="buffers"/> fp32 buffers of it stay within the scratch bound.</summary>
    private int PieceLength(long n, int buffers) =>
        (int)Math.Max(1, Math.Min(Math.Min(n, MaxElementsPerCall), Math.Max(1, ScratchElements / buffers)));

    /// <summary>
    /// Ring reduce-scatter of one piece of <paramref name="m"/> elements: rank k's contribution to chunk c starts at
    /// <c>input + c x stride</c>. In step s each rank sends its partial sum of chunk (rank - s - 1) to the right and
    /// adds the left neighbour's partial of chunk (rank - s - 2) to its own data; after WorldSize - 1 steps the
    /// partial it holds is the full sum of its own chunk, written to <paramref name="output"/> only then (so the
    /// output may be this rank's own chunk of the input).
    /// </summary>
    private void Ring(float* input, long stride, float* output, int m, float* accumulator, float* received, ReduceOp op)
    {
        int w = WorldSize, r = Rank;
        int right = (r + 1) % w, left = (r - 1 + w) % w;
        if (w == 1)
        {
            if (output != input)
            {
                Buffer.MemoryCopy(input, output, m * 4L, m * 4L);
            }
        }
        var requests = stackalloc IntPtr[2];
        for (int s = 0; s < w - 1; s++)
        {
            int sendChunk = ((r - s - 1) % w + w) % w;
            int receiveChunk = ((r - s - 2) % w + w) % w;
            float* send = s == 0 ? input + sendChunk * stride : accumulator;
            MpiNative.Check(MpiNative.Irecv(received, m, MpiNative.Float, left, RingTag, MpiNative.CommWorld, &requests[0]), "MPI_Irecv");
            MpiNative.Check(MpiNative.Isend(send, m, MpiNative.Float, right, RingTag, MpiNative.CommWorld, &requests[1]), "MPI_Isend");
            Complete(requests, 2, "reduce-scatter (ring step " + (s + 1) + " of " + (w - 1) + ")", m, left);
            Add(input + receiveChunk * stride, received, s == w - 2 ? output : accumulator, m);
        }
        if (op == ReduceOp.Avg)
        {
            Divide(output, m, w);
        }
    }

    private static void Add(float* a, float* b, float* sum, int n)
    {
        int i = 0;
        for (; i <= n - Vector<float>.Count; i += Vector<float>.Count)
        {
            Vector.Store(Vector.Load(a + i) + Vector.Load(b + i), sum + i);
        }
        for (; i < n; i++)
        {
            sum[i] = a[i] + b[i];
        }
    }

    /// <summary>Divides (not multiplies by the reciprocal) so an average is the sum's correctly rounded quotient.</summary>
    private static void Divide(float* data, long n, int divisor)
    {
        var d = new Vector<float>(divisor);
        long i = 0;
        for (; i <= n - Vector<float>.Count; i += Vector<float>.Count)
        {
            Vector.Store(Vector.Load(data + i) / d, data + i);
        }
        for (; i < n; i++)
        {
            data[i] /= divisor;
        }
    }

    private readonly record struct GatherCall(IntPtr Send, int Count, IntPtr Type, IntPtr Receive, IntPtr ReceiveType);

    /// <summary>Pending non-blocking gathers; disposing waits, so tensors are never freed under a running gather.</summary>
    private sealed class Request(MpiCollectives owner, List<IntPtr> requests) : ICollectiveRequest
    {
        public bool IsCompleted { get; private set; }

        public void Wait()
        {
            if (IsCompleted)
            {
                return;
            }
            lock (owner.gate)
            {
                for (int i = 0; i < requests.Count; i++)
                {
                    IntPtr request = requests[i];
                    owner.Complete(&request, 1, "all-gather (async)", 0, null);
                }
            }
            IsCompleted = true;
        }

        public void Dispose() => Wait();
    }
}
