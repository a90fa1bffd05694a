using FrugalLM.Distributed;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Sharding;

/// <summary>
/// Several parameters of one unit flattened into one vector, padded to a multiple of the world size and split into
/// equal shards: rank r keeps elements [r x S, (r + 1) x S) as an fp32 master (<see cref="Shard"/>), which is what the
/// optimizer steps. While the unit runs, <see cref="Gather"/> all-gathers the shards into one full buffer and points
/// every parameter at its slice of it (<c>Tensor.set_</c>, so modules keep their own Parameter objects and names);
/// <see cref="Free"/> points them at an empty tensor again, which drops the last reference to the buffer.
/// </summary>
internal sealed class FlatParameter : IDisposable
{
    private static readonly Tensor Released = empty(0).DetachFromDisposeScope();
    private readonly ICollectives collectives;
    private readonly System.Diagnostics.Stopwatch communication;
    private readonly (Parameter Parameter, long[] Shape, long Offset, long Count)[] entries;
    private Tensor? full;

    /// <summary>Flattens <paramref name="parameters"/> (their current values become the shards) and releases their memory.</summary>
    /// <param name="name">The vector's name.</param>
    /// <param name="parameters">The parameters, in order.</param>
    /// <param name="collectives">The ranks.</param>
    /// <param name="communication">Runs while this vector's collectives run (the time spent communicating).</param>
    public FlatParameter(string name, IReadOnlyList<(string Name, Parameter Parameter)> parameters, ICollectives collectives, System.Diagnostics.Stopwatch communication)
    {
        Name = name;
        this.collectives = collectives;
        this.communication = communication;
        long offset = 0;
        entries = new (Parameter, long[], long, long)[parameters.Count];
        for (int i = 0; i < parameters.Count; i++)
        {
            var p = parameters[i].Parameter;
            if (p.dtype != ScalarType.Float32)
            {
                throw new NotSupportedException($"FSDP shards fp32 parameters; {parameters[i].Name} is {p.dtype} (16-bit compute under FSDP is not implemented yet)");
            }
            entries[i] = (p, p.shape, offset, p.numel());
            offset += p.numel();
        }
        ParameterNames = parameters.Select(p => p.Name).ToArray();
        Count = offset;
        int world = collectives.WorldSize;
        ShardSize = (Count + world - 1) / world;
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        // Every rank holds the same full values here (same seed or the same folder), so each cuts out its own shard.
        var whole = zeros(ShardSize * world, ScalarType.Float32);
        foreach (var (parameter, _, start, count) in entries)
        {
            whole.narrow(0, start, count).copy_(parameter.detach().reshape(-1));
            parameter.set_(Released);
        }
        Shard = whole.narrow(0, collectives.Rank * ShardSize, ShardSize).clone().requires_grad_(true).DetachFromDisposeScope();
    }

    /// <summary>A name for the optimizer's state (<c>model.layers.3/decay</c>).</summary>
    public string Name { get; }

    /// <summary>Names of the parameters in the flat vector, in order.</summary>
    public IReadOnlyList<string> ParameterNames { get; }

    /// <summary>Elements of the parameters (without padding).</summary>
    public long Count { get; }

    /// <summary>Elements of each rank's shard.</summary>
    public long ShardSize { get; }

    /// <summary>This rank's fp32 master shard; its <c>grad</c> receives the reduce-scattered gradients.</summary>
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
        full = empty(ShardSize * collectives.WorldSize, ScalarType.Float32).DetachFromDisposeScope();
        AllGather(full);
        foreach (var (parameter, shape, start, count) in entries)
        {
            using var view = full.narrow(0, start, count).view(shape);
            parameter.set_(view);
        }
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

    private void AllGather(Tensor output)
    {
        communication.Start();
        using var shard = Shard.detach();
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
        full.Dispose();
        full = null;
    }

    /// <summary>
    /// Moves the parameters' gradients (of the gathered, full parameters) into one padded vector, releases them, and
    /// reduce-scatters (sums) it over ranks into <see cref="Shard"/>'s gradient, adding to what earlier micro-batches
    /// left there. A sum, not an average: the trainer normalizes every rank's loss by the step's global token count.
    /// </summary>
    public void ReduceGradients()
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var unsharded = zeros(ShardSize * collectives.WorldSize, ScalarType.Float32);
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
        collectives.ReduceScatter(unsharded, mine, ReduceOp.Sum);
        communication.Stop();
        if (Shard.grad is Tensor accumulated)
        {
            accumulated.add_(mine);
        }
        else
        {
            Shard.grad = mine;
        }
    }

    /// <summary>
    /// The full value of every parameter, in order, as new fp32 tensors on rank 0 (empty list elsewhere); every rank must
    /// call it. Gathers this flat vector if needed and frees it again afterwards unless it was gathered before.
    /// </summary>
    public List<(string Name, Tensor Value)> Collect()
    {
        bool wasGathered = Gathered;
        Gather();
        var result = new List<(string, Tensor)>();
        if (collectives.Rank == 0)
        {
            using var noGrad = no_grad();
            for (int i = 0; i < entries.Length; i++)
            {
                result.Add((ParameterNames[i], entries[i].Parameter.detach().clone().DetachFromDisposeScope()));
            }
        }
        if (!wasGathered)
        {
            Free();
        }
        return result;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        Free();
        Shard.grad?.Dispose();
        Shard.Dispose();
    }
}
