using TorchSharp;

namespace FrugalLM.Distributed;

/// <summary>
/// The world of one process: every collective is the identity (a gather or scatter copies, a reduction of one
/// contribution is that contribution). Lets the same training code run unchanged without <c>mpirun</c>, and
/// checks arguments exactly as the MPI backend does.
/// </summary>
public sealed unsafe class SingleProcessCollectives : ICollectives
{
    /// <inheritdoc/>
    public int Rank => 0;

    /// <inheritdoc/>
    public int WorldSize => 1;

    /// <inheritdoc/>
    public string Backend => "single-process";

    /// <inheritdoc/>
    public void AllGather(torch.Tensor input, torch.Tensor output)
    {
        CollectiveChecks.AllGather(input, output, 1);
        CopyUnlessSame(input, output, "all-gather");
    }

    /// <inheritdoc/>
    public ICollectiveRequest AllGatherAsync(torch.Tensor input, torch.Tensor output)
    {
        AllGather(input, output);
        return CompletedRequest.Instance;
    }

    /// <inheritdoc/>
    public void ReduceScatter(torch.Tensor input, torch.Tensor output, ReduceOp op)
    {
        CollectiveChecks.ReduceScatter(input, output, 1);
        // Sum and average of one contribution are both the contribution itself (x / 1 == x exactly).
        CopyUnlessSame(output, input, "reduce-scatter");
    }

    /// <inheritdoc/>
    public void AllReduce(torch.Tensor tensor, ReduceOp op) => CollectiveChecks.Tensor(tensor, nameof(tensor), "all-reduce");

    /// <inheritdoc/>
    public void Broadcast(torch.Tensor tensor, int root)
    {
        CollectiveChecks.Tensor(tensor, nameof(tensor), "broadcast", moveOnly: true);
        CollectiveChecks.Root(root, 1);
    }

    /// <inheritdoc/>
    public void Barrier()
    {
    }

    /// <inheritdoc/>
    public void Dispose()
    {
    }

    private static void CopyUnlessSame(torch.Tensor part, torch.Tensor whole, string collective)
    {
        if (part.numel() == 0 || CollectiveChecks.IsOwnSlot(part, whole, 0, collective))
        {
            return;
        }
        if (collective == "all-gather")
        {
            whole.view(-1).copy_(part.view(-1));
        }
        else
        {
            part.view(-1).copy_(whole.view(-1));
        }
    }
}

/// <summary>A request that finished when it was made.</summary>
internal sealed class CompletedRequest : ICollectiveRequest
{
    public static readonly CompletedRequest Instance = new();

    public bool IsCompleted => true;

    public void Wait()
    {
    }

    public void Dispose()
    {
    }
}
