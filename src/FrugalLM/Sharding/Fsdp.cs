using FrugalLM.Distributed;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Training;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Sharding;

/// <summary>
/// Fully sharded data parallelism (FSDP, ZeRO) over <see cref="ICollectives"/>: each decoder layer's trainable parameters
/// become flat vectors sharded across ranks (one unit per layer, plus a root unit for the embeddings, final norm and
/// head), each rank keeps only its fp32 shards (the masters the optimizer steps), and a layer is all-gathered when it
/// runs. Under FULL_SHARD a decoder layer's frozen float parameters (a LoRA run's base) are sharded too, in vectors of
/// their own that keep the compute dtype and are gathered and freed with the layer, but have no masters, gradients or
/// optimizer states; only trainable parameters' gradients are reduced. SHARD_GRAD_OP keeps the frozen base whole: it holds
/// every layer gathered from forward until that layer's backward, so shards would only add to the peak. Int8 weights (buffers) and frozen parameters of the root unit (a LoRA
/// run's embeddings, final norm and head) stay whole on every rank: the root is kept gathered anyway.
/// </summary>
public static class Fsdp
{
    /// <summary>
    /// Shards <paramref name="model"/>'s trainable parameters (and under FULL_SHARD its decoder layers' frozen float
    /// parameters) in place and wraps its decoder layers. Every rank must call
    /// it with the same model (same seed or the same folder). Apply it last, after LoRA and precision.
    /// </summary>
    /// <param name="model">The model, every other technique applied.</param>
    /// <param name="collectives">The ranks.</param>
    /// <param name="strategy"><see cref="ShardingStrategy.FullShard"/> or <see cref="ShardingStrategy.ShardGradOp"/>.</param>
    /// <param name="precision">The model's mixed precision, when it computes in 16 bits with fp32 masters: FSDP takes the
    /// masters over (<see cref="MixedPrecision.TakeMasters"/>), keeps its fp32 shard of them, gathers layers in 16 bits
    /// and reduces gradients in fp32. Without it, trainable parameters must be fp32 (or carry no masters).</param>
    public static ShardedModel Wrap(CausalLM model, ICollectives collectives, ShardingStrategy strategy, MixedPrecision? precision = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(collectives);
        if (strategy == ShardingStrategy.None)
        {
            throw new ArgumentException("FSDP needs a strategy: full or grad-op", nameof(strategy));
        }
        if (model.DecoderLayers.Any(l => l is FsdpLayer))
        {
            throw new InvalidOperationException("FSDP is already applied to this model");
        }
        // Activation checkpointing becomes FSDP's own recomputation: FULL_SHARD recomputes every layer in backward anyway
        // (checkpointing inside it would recompute twice), and SHARD_GRAD_OP then runs each layer without a graph and
        // recomputes it in backward from its kept, still gathered weights. Either way per layer, whatever the interval.
        bool checkpointed = false;
        var decoderLayers = model.DecoderLayers;
        for (int i = 0; i < decoderLayers.Count; i++)
        {
            if (decoderLayers[i] is Checkpointing.CheckpointedLayer wrapped)
            {
                ModuleTree.Replace(model, model.DecoderLayersPath + "." + i.ToString(System.Globalization.CultureInfo.InvariantCulture), wrapped.Inner);
                checkpointed = true;
            }
        }
        if (precision?.Mode == Planning.Precision.Bf16Pure)
        {
            throw new NotSupportedException("FSDP keeps fp32 shard masters: use --precision bf16 (not bf16-pure)");
        }
        var masters = precision?.TakeMasters() ?? [];
        try
        {
            return new ShardedModel(model, collectives, strategy, masters.ToDictionary(m => m.Name, m => m.Master, StringComparer.Ordinal), checkpointed);
        }
        finally
        {
            // The full fp32 masters go now: each rank keeps only its shard of them.
            foreach (var (_, master) in masters)
            {
                master.grad?.Dispose();
                master.Dispose();
            }
        }
    }
}

/// <summary>
/// A model whose trainable parameters (and, under FULL_SHARD, decoder layers' frozen float parameters) are sharded by <see cref="Fsdp.Wrap"/>. The trainer drives it: the optimizer steps
/// <see cref="OptimizerGroups"/> (the shards), <see cref="FinishBackward"/> reduces the root unit's gradients after
/// backward (the layers' are reduced during backward), <see cref="GradientNorm"/> is global over ranks, and
/// <see cref="SyncWeights"/> refreshes the gathered root after a step.
/// </summary>
/// <remarks>
/// The root unit (embeddings, final norm, untied head) stays gathered for the whole run: the embedding runs first in
/// forward and its gradient arrives last in backward, and the head is used at both ends too, so as in PyTorch's FSDP
/// the root is not resharded between forward and backward; here it is not resharded between steps either (it is
/// re-gathered in place after each optimizer step). Its gradients, masters and optimizer states are sharded.
/// </remarks>
public sealed class ShardedModel : IDisposable
{
    private readonly List<FlatParameter> root;
    private readonly List<FsdpLayer> layers = [];
    private readonly System.Diagnostics.Stopwatch communication = new();
    private readonly BufferPool pool = new();
    private readonly PrefetchQueue prefetch = new();

    internal ShardedModel(CausalLM model, ICollectives collectives, ShardingStrategy strategy, IReadOnlyDictionary<string, Tensor> masters, bool checkpointed = false)
    {
        Collectives = collectives;
        Strategy = strategy;
        var embeddings = Trainer.EmbeddingParameterNames(model);
        var layerPath = model.DecoderLayersPath + ".";
        var decoder = model.DecoderLayers;
        var inLayers = new HashSet<string>(StringComparer.Ordinal);
        for (int i = 0; i < decoder.Count; i++)
        {
            string path = layerPath + i.ToString(System.Globalization.CultureInfo.InvariantCulture);
            var named = decoder[i].named_parameters().Where(p => p.parameter.requires_grad).Select(p => (path + "." + p.name, p.parameter)).ToList();
            inLayers.UnionWith(named.Select(n => n.Item1));
            // SHARD_GRAD_OP gathers every layer by the end of forward and keeps it through backward: a sharded frozen base
            // would be the whole base plus its shards at the peak (measured +145 MiB per rank on llama-100m LoRA r16).
            var frozen = strategy != ShardingStrategy.FullShard ? []
                : decoder[i].named_parameters().Where(p => !p.parameter.requires_grad && p.parameter.is_floating_point())
                    .Select(p => (path + "." + p.name, p.parameter)).ToList();
            var flats = Flats(path, named, embeddings, collectives, communication, pool, masters, prefetch);
            flats.AddRange(FrozenFlats(path, frozen, collectives, communication, pool, prefetch));
            var layer = new FsdpLayer(decoder[i], flats, strategy, recomputes: strategy == ShardingStrategy.FullShard || checkpointed);
            ModuleTree.Replace(model, path, layer);
            // FRUGAL_FSDP_PREFETCH=0 turns prefetching off, to measure what it hides. One rank has nothing to hide: its
            // gathers are copies, and a libtorch copy on the queue's thread starts a second OpenMP team with its own
            // malloc arenas (measured: +230 MiB peak for llama-100m at one rank).
            if (layers.Count > 0 && collectives.WorldSize > 1 && Environment.GetEnvironmentVariable("FRUGAL_FSDP_PREFETCH") != "0")
            {
                layers[^1].Next = layer;
                layer.Previous = layers[^1];
            }
            layers.Add(layer);
        }
        var rest = model.named_parameters().Where(p => p.parameter.requires_grad && !inLayers.Contains(p.name)).Select(p => (p.name, p.parameter)).ToList();
        // The root is never prefetched, but its collectives wait for queued gathers like every other (one order on all ranks).
        root = Flats("root", rest, embeddings, collectives, communication, null, masters, prefetch);
        foreach (var flat in root)
        {
            flat.Gather();
        }
    }

    /// <summary>The ranks.</summary>
    public ICollectives Collectives { get; }

    /// <summary>The sharding strategy.</summary>
    public ShardingStrategy Strategy { get; }

    /// <summary>Every trainable flat vector, the root unit's first, then the layers' in order (what a sharded checkpoint
    /// stores: frozen vectors are not saved, a resumed run loads its base from the model folder again).</summary>
    internal IReadOnlyList<FlatParameter> Vectors => AllFlats.ToList();

    /// <summary>The decoder layers' frozen flat vectors, in order.</summary>
    internal IReadOnlyList<FlatParameter> FrozenVectors => layers.SelectMany(l => l.Flats).Where(f => !f.Trainable).ToList();

    // The trainable vectors: what the optimizer, the gradient norm, checkpoints and CollectFullState see.
    private IEnumerable<FlatParameter> AllFlats => root.Concat(layers.SelectMany(l => l.Flats).Where(f => f.Trainable));

    // Trainable and frozen, in the model's unit order.
    private IEnumerable<FlatParameter> EveryFlat => root.Concat(layers.SelectMany(l => l.Flats));

    /// <summary>What the optimizer steps: this rank's fp32 shards, by flat vector name (decay groups are separate vectors).</summary>
    public IReadOnlyList<ParameterGroup> OptimizerGroups(double weightDecay) =>
    [
        new ParameterGroup(AllFlats.Where(f => !f.Name.EndsWith(NoDecay, StringComparison.Ordinal)).Select(f => (f.Name, f.Shard)).ToList(), weightDecay),
        new ParameterGroup(AllFlats.Where(f => f.Name.EndsWith(NoDecay, StringComparison.Ordinal)).Select(f => (f.Name, f.Shard)).ToList(), 0.0),
    ];

    /// <summary>Names of the flat vectors that hold embedding tables (8-bit AdamW keeps their moments in fp32).</summary>
    public IReadOnlySet<string> EmbeddingFlats => AllFlats.Where(f => f.Name.EndsWith(Embedding, StringComparison.Ordinal)).Select(f => f.Name).ToHashSet(StringComparer.Ordinal);

    /// <summary>Time this rank has spent in collectives since wrapping (gathers, reduce-scatters, the norm's and losses' all-reduces).</summary>
    public TimeSpan CommunicationTime => communication.Elapsed;

    /// <summary>Trainable parameters (without padding) across all ranks.</summary>
    public long TrainableCount => AllFlats.Sum(f => f.Count);

    /// <summary>Bytes this rank holds in fp32 master shards.</summary>
    public long ShardBytes => AllFlats.Sum(f => f.ShardSize * 4);

    /// <summary>Frozen parameters (without padding) sharded across all ranks: the decoder layers' frozen float weights.</summary>
    public long FrozenCount => FrozenVectors.Sum(f => f.Count);

    /// <summary>Bytes this rank holds in frozen shards (in their compute dtype).</summary>
    public long FrozenShardBytes => FrozenVectors.Sum(f => f.ShardSize * f.Shard.element_size());

    /// <summary>After the last micro-batch's backward: reduce-scatters the root unit's gradients (the layers' already are).</summary>
    public void FinishBackward()
    {
        foreach (var flat in root)
        {
            flat.ReduceGradients();
        }
    }

    /// <summary>
    /// The global L2 norm of the shard gradients, times <paramref name="scale"/>: each rank's sum of squares, gathered and
    /// added in double.
    /// Padding contributes zeros, so this equals the norm of the unsharded gradients up to summation order.
    /// </summary>
    public double GradientNorm(double scale = 1.0)
    {
        using var scope = NewDisposeScope();
        // Each shard's sum of squares as MixedPrecision.GradientNorm takes it, so a rank and the plain trainer round alike.
        double sum = 0;
        foreach (var flat in AllFlats)
        {
            if (flat.Shard.grad is Tensor g)
            {
                sum += SumOfSquares.Of(g);
            }
        }
        // The rank's sum travels as two floats (hi + lo keep ~48 bits of the double); every rank gathers all of them and
        // adds them in double in rank order, so every rank gets the same total, and a single rank the unsharded
        // trainer's. An fp32 all-reduce rounded the total to 24 bits: the clipping factor moved by ~1e-7, which fp16
        // compute weights amplified past 1e-4 in the embedding against the plain trainer.
        float high = (float)sum;
        using var mine = tensor(new[] { high, (float)(sum - high) });
        using var all = zeros(2L * Collectives.WorldSize);
        communication.Start();
        Collectives.AllGather(mine, all);
        communication.Stop();
        var parts = all.data<float>().ToArray();
        double total = 0;
        for (int r = 0; r < parts.Length; r += 2)
        {
            total += (double)parts[r] + parts[r + 1];
        }
        return Math.Sqrt(total) * scale;
    }

    /// <summary>Sums <paramref name="value"/> over ranks (losses and token counts; fp32, exact for integers below 2^24).</summary>
    public double SumOverRanks(double value)
    {
        using var t = tensor(new[] { (float)value });
        communication.Start();
        Collectives.AllReduce(t, ReduceOp.Sum);
        communication.Stop();
        return t.item<float>();
    }

    /// <summary>After an optimizer step: gathers the updated shards into the root unit's full parameters.</summary>
    public void SyncWeights()
    {
        foreach (var flat in root)
        {
            flat.Refresh();
        }
    }

    /// <summary>Releases the shards' gradients.</summary>
    public void ZeroGradients()
    {
        foreach (var flat in AllFlats)
        {
            flat.Shard.grad = null;
        }
    }

    /// <summary>
    /// Every trainable parameter's full fp32 value by name, gathered unit by unit, on rank 0 (an empty list on the other
    /// ranks). Every rank must call it (it runs collectives). Rank 0 ends up holding one full copy of the trainable
    /// parameters for as long as it keeps the list (a save then streams them out).
    /// </summary>
    public List<(string Name, Tensor Value)> CollectFullState() => AllFlats.SelectMany(f => f.Collect()).ToList();

    /// <summary>
    /// Every flat parameter's full value (trainable and frozen) as a <see cref="WeightStream"/> for <see cref="HfCheckpoint.SaveStreamed"/> (on
    /// rank 0) and <see cref="HfCheckpoint.FetchStream"/> (on the others): each flat vector is one group, gathered from
    /// the fp32 shards when fetched and freed when the fetch returns, so no rank holds more than one vector of the model
    /// beyond what training holds. The values reach the callback on rank 0 only.
    /// </summary>
    public WeightStream FullStateStream()
    {
        var flats = EveryFlat.ToDictionary(f => f.Name, StringComparer.Ordinal);
        var tensors = EveryFlat.SelectMany(f => f.Layout.Select(p => (p.Name, p.Shape, f.Name))).ToList();
        return new WeightStream(tensors, (group, use) => flats[group].Collect(use));
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var flat in EveryFlat)
        {
            flat.Dispose();
        }
        pool.Dispose();
    }

    internal const string Decay = "/decay";
    internal const string NoDecay = "/no-decay";
    internal const string Embedding = "/embedding";
    internal const string Frozen = "/frozen";

    // AdamW's decay groups (matrices decay, vectors do not) and 8-bit AdamW's fp32 embeddings need separate vectors:
    // one flat vector has one weight decay and one moment format.
    private static List<FlatParameter> Flats(string unit, List<(string Name, Parameter Parameter)> parameters, IReadOnlySet<string> embeddings, ICollectives collectives,
        System.Diagnostics.Stopwatch communication, BufferPool? pool, IReadOnlyDictionary<string, Tensor> masters, PrefetchQueue prefetch)
    {
        var groups = new (string Suffix, Func<(string Name, Parameter Parameter), bool> Member)[]
        {
            (Embedding, p => embeddings.Contains(p.Name)),
            (Decay, p => !embeddings.Contains(p.Name) && p.Parameter.dim() >= 2),
            (NoDecay, p => p.Parameter.dim() < 2),
        };
        // Members are chosen before any vector is built: building one releases its parameters (their shapes become [0]).
        var members = groups.Select(g => (g.Suffix, Members: parameters.Where(g.Member).ToList())).Where(g => g.Members.Count > 0).ToList();
        return members.Select(g => new FlatParameter(unit + g.Suffix, g.Members, collectives, communication, pool, masters, prefetch)).ToList();
    }

    // A layer's frozen float parameters: one vector per dtype (one vector gathers in one dtype), named unit/frozen, or
    // unit/frozen-<dtype> when a layer's frozen parameters come in several dtypes.
    private static List<FlatParameter> FrozenFlats(string unit, List<(string Name, Parameter Parameter)> parameters, ICollectives collectives,
        System.Diagnostics.Stopwatch communication, BufferPool pool, PrefetchQueue prefetch)
    {
        var byDtype = parameters.GroupBy(p => p.Parameter.dtype).Select(g => (g.Key, Members: g.ToList())).ToList();
        return byDtype.Select(g => new FlatParameter(unit + Frozen + (byDtype.Count > 1 ? "-" + HfCheckpoint.DtypeName(g.Key) : ""), g.Members,
            collectives, communication, pool, null, prefetch)).ToList();
    }
}
