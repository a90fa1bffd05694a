namespace FrugalLM.Sharding;

/// <summary>
/// Runs the next layer's all-gathers on a background thread while the current layer computes. OpenMPI progresses a
/// non-blocking collective only inside MPI calls (there is no progress thread here), so an <c>MPI_Iallgather</c>
/// started before a layer's compute would mostly move its data at the <c>MPI_Wait</c> after it; a blocking gather on
/// another thread moves it during the compute. MPI runs at <c>MPI_THREAD_SERIALIZED</c> and the backend locks around
/// each call, but every rank must still issue its collectives in one order: so gathers queued here run one after
/// another, and the layer thread <see cref="Drain"/>s the queue before any collective of its own.
/// </summary>
internal sealed class PrefetchQueue
{
    private Task? pending;

    /// <summary>Queues <paramref name="gather"/> after whatever is queued.</summary>
    public void Enqueue(Action gather)
    {
        var previous = pending;
        pending = previous is null
            ? Task.Run(gather)
            : previous.ContinueWith(t =>
            {
                t.GetAwaiter().GetResult(); // a failed gather fails every one queued after it
                gather();
            }, CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    /// <summary>Waits until every queued gather has finished; rethrows the first failure.</summary>
    public void Drain()
    {
        var task = pending;
        if (task is null)
        {
            return;
        }
        pending = null;
        task.GetAwaiter().GetResult();
    }
}
