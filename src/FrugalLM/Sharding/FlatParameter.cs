using FrugalLM.Distributed;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Sharding;

/// <summary>
/// Several parameters of one unit flattened into one vector, padded to a multiple of the world size and split into
/// equal shards: rank r keeps elements [r x S, (r + 1) x S) as an fp32 master (<see cref="Shard"/>), which is what the
/// optimizer steps. Frozen parameters (a LoRA run's base) form vectors of their own, whose shards keep the compute dtype
/// (there is nothing to step, so no fp32 master) and never receive or reduce gradients. While the unit runs, <see cref="Gather"/> all-gathers the shards into one full buffer and points
/// every parameter at its slice of it (<c>Tensor.set_</c>, so modules keep their own Parameter objects and names);
/// <see cref="Free"/> points them at an empty tensor again, which drops the last reference to the buffer.
/// </summary>
internal sealed class FlatParameter : IDisposable
{
    private static readonly Tensor Released = empty(0).DetachFromDisposeScope();
    private readonly ICollectives collectives;
    private readonly System.Diagnostics.Stopwatch communication;
    private readonly BufferPool? pool;
    private readonly (Parameter Parameter, long[] Shape, long Offset, long Count)[] entries;
    private readonly PrefetchQueue? prefetch;
    private Tensor? full;
    private Tensor? prefetched;

    /// <summary>Flattens <paramref name="parameters"/> (their current values become the shards) and releases their memory.</summary>
    /// <param name="name">The vector's name.</param>
    /// <param name="parameters">The parameters, in order: all trainable (requiring grad), or all frozen.</param>
    /// <param name="collectives">The ranks.</param>
    /// <param name="communication">Runs while this vector's collectives run (the time spent communicating).</param>
    /// <param name="pool">Where gathered and unsharded-gradient buffers are reused between layers (null: allocate each time,
    /// for the root unit, whose buffers no other unit shares).</param>
    /// <param name="masters">fp32 values of parameters that compute in 16 bits (mixed precision's masters), by name; a
    /// parameter without one is widened from its own value.</param>
    /// <param name="prefetch">Where <see cref="Prefetch"/> queues background gathers (null: this vector is never prefetched).</param>
    public FlatParameter(string name, IReadOnlyList<(string Name, Parameter Parameter)> parameters, ICollectives collectives, System.Diagnostics.Stopwatch communication,
        BufferPool? pool = null, IReadOnlyDictionary<string, Tensor>? masters = null, PrefetchQueue? prefetch = null)
    {
        this.pool = pool;
        this.prefetch = prefetch;
        Name = name;
        this.collectives = collectives;
        this.communication = communication;
        long offset = 0;
        ParameterNames = parameters.Select(p => p.Name).ToArray();
        entries = new (Parameter, long[], long, long)[parameters.Count];
        for (int i = 0; i < parameters.Count; i++)
        {
            var p = parameters[i].Parameter;
            if (i == 0)
            {
                ComputeDtype = p.dtype;
            }
            if (p.dtype != ComputeDtype || !p.is_floating_point())
            {
                throw new NotSupportedException($"FSDP flattens floating parameters of one dtype per vector; {parameters[i].Name} is {p.dtype}, {parameters[0].Name} {ComputeDtype}");
            }
            if (p.requires_grad != parameters[0].Parameter.requires_grad)
            {
                throw new ArgumentException($"FSDP flattens trainable and frozen parameters into separate vectors; {parameters[i].Name} and {parameters[0].Name} differ", nameof(parameters));
            }
            entries[i] = (p, p.shape, offset, p.numel());
            offset += p.numel();
        }
        Count = offset;
        Trainable = parameters.Count > 0 && parameters[0].Parameter.requires_grad;
        int world = collectives.WorldSize;
        ShardSize = (Count + world - 1) / world;
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        // Every rank holds the same full values here (same seed or the same folder), so each cuts out its own shard.
        // Trainable shards are fp32 masters; frozen ones keep the values exactly as they compute.
        var whole = zeros(ShardSize * world, Trainable ? ScalarType.Float32 : ComputeDtype);
        for (int i = 0; i < entries.Length; i++)
        {
            var (parameter, _, start, count) = entries[i];
            var value = masters?.GetValueOrDefault(ParameterNames[i]) ?? parameter.detach();
            whole.narrow(0, start, count).copy_(value.reshape(-1));
            parameter.set_(Released);
        }
        Shard = whole.narrow(0, collectives.Rank * ShardSize, ShardSize).clone().requires_grad_(Trainable).DetachFromDisposeScope();
    }

    /// <summary>A name for the optimizer's state (<c>model.layers.3/decay</c>).</summary>
    public string Name { get; }

    /// <summary>Names of the parameters in the flat vector, in order.</summary>
    public IReadOnlyList<string> ParameterNames { get; }

    /// <summary>Where each parameter lies in the flat vector: name, shape, first element and element count.</summary>
    public IReadOnlyList<(string Name, long[] Shape, long Offset, long Count)> Layout =>
        entries.Select((e, i) => (ParameterNames[i], e.Shape, e.Offset, e.Count)).ToList();

    /// <summary>The dtype the parameters compute in (and are gathered in): fp32, or bf16/fp16 under mixed precision.</summary>
    public ScalarType ComputeDtype { get; }

    /// <summary>Elements of the parameters (without padding).</summary>
    public long Count { get; }

    /// <summary>Elements of each rank's shard.</summary>
    public long ShardSize { get; }

    /// <summary>True for trainable parameters (fp32 master shard, gradients reduced), false for a frozen vector.</summary>
    public bool Trainable { get; }

    /// <summary>This rank's fp32 master shard, whose <c>grad</c> receives the reduce-scattered gradients; for a frozen vector,
    /// its shard in the compute dtype (no gradient).</summary>
    public Tensor Shard { get; }

    /// <summary>True while the full parameters are gathered.</summary>
    public bool Gathered => full is not null;

    /// <summary>All-gathers the full parameters and points the modules' parameters at them (no-op when gathered).</summary>
    public void Gather()
    {
        if (full is not null)
        {
            return;
        }
        using var noGrad = no_grad();
        // Every view handle must go with this scope: a stray one (the narrow before the view) keeps the whole buffer's
        // storage alive until the .NET GC finalizes it, and Free would then release nothing.
        using var scope = NewDisposeScope();
        if (prefetched is not null)
        {
            // Started while the previous layer computed; what is left to wait for is the communication not hidden.
            communication.Start();
            prefetch!.Drain();
            communication.Stop();
            full = prefetched;
            prefetched = null;
        }
        else
        {
            full = Rent(ComputeDtype);
            AllGather(full);
        }
        foreach (var (parameter, shape, start, count) in entries)
        {
            parameter.set_(full.narrow(0, start, count).view(shape));
        }
    }

    /// <summary>
    /// Starts gathering the full parameters on the prefetch queue's thread, into a buffer that the next
    /// <see cref="Gather"/> adopts (no-op when gathered, already prefetching, or built without a queue).
    /// </summary>
    public void Prefetch()
    {
        if (prefetch is null || full is not null || prefetched is not null)
        {
            return;
        }
        var buffer = Rent(ComputeDtype);
        // The 16-bit copy of the shard is made here, on the layer thread; the queue's thread only moves memory.
        Tensor shard;
        using (no_grad())
        {
            shard = (Shard.dtype == ComputeDtype ? Shard.detach() : Shard.detach().to(ComputeDtype)).DetachFromDisposeScope();
        }
        prefetched = buffer;
        prefetch.Enqueue(() =>
        {
            using (shard)
            {
                collectives.AllGather(shard, buffer);
            }
        });
    }

    /// <summary>Gathers the updated shards into the already gathered parameters (after an optimizer step).</summary>
    public void Refresh()
    {
        if (full is null)
        {
            return;
        }
        using var noGrad = no_grad();
        AllGather(full);
    }

    // Gathers in the output's dtype: 16-bit compute sends the shard rounded to 16 bits (half the bytes of fp32); a frozen
    // 16-bit shard is widened exactly when collected in fp32.
    private void AllGather(Tensor output)
    {
        using var shard = output.dtype == Shard.dtype ? Shard.detach() : Shard.detach().to(output.dtype);
        communication.Start();
        prefetch?.Drain();
        collectives.AllGather(shard, output);
        communication.Stop();
    }

    /// <summary>Releases the full parameters; the modules' parameters become empty until the next <see cref="Gather"/>.</summary>
    public void Free()
    {
        if (full is null)
        {
            return;
        }
        using (no_grad())
        {
            foreach (var (parameter, _, _, _) in entries)
            {
                parameter.set_(Released);
            }
        }
        Return(full);
        full = null;
    }

    /// <summary>
    /// Moves the parameters' gradients (of the gathered, full parameters) into one padded vector, releases them, and
    /// reduce-scatters (sums) it over ranks into <see cref="Shard"/>'s gradient, adding to what earlier micro-batches
    /// left there. A sum, not an average: the trainer normalizes every rank's loss by the step's global token count.
    /// A frozen vector has no gradients and reduces nothing.
    /// </summary>
    public void ReduceGradients()
    {
        if (!Trainable)
        {
            return;
        }
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var unsharded = Rent(ScalarType.Float32);
        unsharded.zero_(); // a reused buffer holds the previous layer's gradients
        foreach (var (parameter, _, start, count) in entries)
        {
            if (parameter.grad is Tensor g)
            {
                unsharded.narrow(0, start, count).copy_(g.reshape(-1));
                parameter.grad = null;
                g.Dispose();
            }
        }
        var mine = empty(ShardSize, ScalarType.Float32);
        communication.Start();
        prefetch?.Drain();
        collectives.ReduceScatter(unsharded, mine, ReduceOp.Sum);
        communication.Stop();
        Return(unsharded);
        if (Shard.grad is Tensor accumulated)
        {
            accumulated.add_(mine);
        }
        else
        {
            Shard.grad = mine;
        }
    }

    private Tensor Rent(ScalarType dtype) =>
        pool?.Rent(ShardSize * collectives.WorldSize, dtype) ?? empty(ShardSize * collectives.WorldSize, dtype).DetachFromDisposeScope();

    private void Return(Tensor buffer)
    {
        if (pool is null)
        {
            buffer.Dispose();
        }
        else
        {
            pool.Return(buffer);
        }
    }

    /// <summary>
    /// The full fp32 value (the masters; a frozen vector's values widened) of every parameter, in order, as new tensors on rank 0 (an empty list elsewhere);
    /// every rank must call it. Gathers the fp32 shards into a temporary vector; the modules' parameters are not touched.
    /// </summary>
    public List<(string Name, Tensor Value)> Collect()
    {
        var result = new List<(string, Tensor)>();
        Collect((name, value) => result.Add((name, value.clone().DetachFromDisposeScope())));
        return result;
    }

    /// <summary>
    /// Gathers the full fp32 value (the masters; a frozen vector's values widened) of every parameter into a temporary vector and, on rank 0 only, hands
    /// each to <paramref name="use"/> in order as a view of that vector, valid only during the call (nothing is copied:
    /// a streaming save writes it out at once). Every rank must call it; the modules' parameters are not touched.
    /// </summary>
    public void Collect(Action<string, Tensor> use)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope(); // the views go with it, and with them the last reference to the buffer
        var whole = empty(ShardSize * collectives.WorldSize, ScalarType.Float32);
        AllGather(whole);
        if (collectives.Rank == 0)
        {
            for (int i = 0; i < entries.Length; i++)
            {
                var (_, shape, start, count) = entries[i];
                use(ParameterNames[i], whole.narrow(0, start, count).view(shape));
            }
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (prefetched is not null)
        {
            prefetch!.Drain();
            Return(prefetched);
            prefetched = null;
        }
        Free();
        Shard.grad?.Dispose();
        Shard.Dispose();
    }
}
