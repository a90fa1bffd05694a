using TorchSharp;

namespace FrugalLM.Distributed;

/// <summary>How a reduction combines the ranks' values.</summary>
public enum ReduceOp
{
    /// <summary>The elementwise sum over ranks.</summary>
    Sum,

    /// <summary>The elementwise sum over ranks divided by the world size (gradient averaging).</summary>
    Avg,
}

/// <summary>
/// The communication primitives data-parallel training is built on, over contiguous fp32 or bf16 CPU tensors
/// treated as flat element arrays (shapes are ignored; only element counts matter). Every rank must call the
/// same collectives in the same order with matching sizes, as in MPI.
/// </summary>
/// <remarks>
/// bf16 reductions are carried out in fp32: MPI has no bf16 sum, and summing in bf16 would round after every
/// rank's contribution. The backends widen bf16 to fp32 in bounded pieces, reduce in fp32 and round once to
/// bf16, so a bf16 result equals the fp32 sum of the bf16 inputs rounded to bf16, up to fp32 reduction order.
/// This sends fp32 on the wire for bf16 reductions (twice the bytes); gathers and broadcasts of bf16 move
/// the 16-bit data as is. Element counts beyond MPI's 32-bit counts are split into several calls.
/// Implementations are not thread-safe for concurrent use of one instance from several threads.
/// </remarks>
public interface ICollectives : IDisposable
{
    /// <summary>This process's index, 0 to <see cref="WorldSize"/> - 1.</summary>
    int Rank { get; }

    /// <summary>The number of processes taking part.</summary>
    int WorldSize { get; }

    /// <summary>A short name of the backend ("single-process", "openmpi").</summary>
    string Backend { get; }

    /// <summary>
    /// Concatenates every rank's <paramref name="input"/> into <paramref name="output"/> in rank order:
    /// output holds WorldSize x input elements, rank r's at offset r x input.numel(). The input may be the
    /// output's own slot for this rank (a view of it); it is then gathered in place.
    /// </summary>
    void AllGather(torch.Tensor input, torch.Tensor output);

    /// <summary>
    /// Starts <see cref="AllGather"/> and returns at once, so a gather can overlap compute (FSDP's prefetch of
    /// the next layer). Neither tensor may be touched, nor freed, until <see cref="ICollectiveRequest.Wait"/>
    /// returned.
    /// </summary>
    ICollectiveRequest AllGatherAsync(torch.Tensor input, torch.Tensor output);

    /// <summary>
    /// Reduces <paramref name="input"/> (WorldSize x output elements) over ranks and leaves in
    /// <paramref name="output"/> this rank's slice: output = op over ranks of input[rank x n, (rank + 1) x n).
    /// </summary>
    void ReduceScatter(torch.Tensor input, torch.Tensor output, ReduceOp op);

    /// <summary>Reduces <paramref name="tensor"/> over ranks in place; every rank receives the same result.</summary>
    void AllReduce(torch.Tensor tensor, ReduceOp op);

    /// <summary>Copies rank <paramref name="root"/>'s <paramref name="tensor"/> into every other rank's, in place.</summary>
    void Broadcast(torch.Tensor tensor, int root);

    /// <summary>Returns once every rank has called it.</summary>
    void Barrier();
}

/// <summary>A collective started by an <c>...Async</c> call.</summary>
public interface ICollectiveRequest : IDisposable
{
    /// <summary>True once <see cref="Wait"/> has returned.</summary>
    bool IsCompleted { get; }

    /// <summary>Blocks until the collective has finished and its output may be read. Later calls return at once.</summary>
    void Wait();
}
