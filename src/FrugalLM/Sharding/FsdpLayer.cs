using FrugalLM.Checkpointing;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using FrugalLM.Planning;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Sharding;

/// <summary>
/// Stands where a decoder layer stood and gathers the layer's sharded parameters around it. The wrapped layer's children
/// are registered as this module's own, so parameter names keep their HF keys.
/// </summary>
/// <remarks>
/// TorchSharp 0.107 has no tensor hooks, so the gather before backward and the reduce-scatter after it happen inside a
/// custom autograd function per layer (as <see cref="ActivationCheckpointing"/> recomputes a layer).
/// FULL_SHARD (ZeRO-3) runs the layer without a graph in forward, frees the gathered parameters, and in backward gathers
/// them again and recomputes the layer before differentiating it. The recomputation is the honest price of freeing:
/// a graph built in forward would hold the gathered weights as saved tensors, and TorchSharp cannot free a saved
/// tensor's storage in place (PyTorch's FSDP resizes the storage to zero; <c>THSStorage_set_nbytes</c> only rewrites
/// the recorded size). So FULL_SHARD costs one extra forward per layer, like activation checkpointing, and keeps only
/// each layer's input between forward and backward. SHARD_GRAD_OP (ZeRO-2) builds the graph in forward and keeps the
/// gathered parameters until this layer's backward has run: no recomputation, full weights alive through backward.
/// </remarks>
public sealed class FsdpLayer : nn.Module<Tensor, DecoderContext, Tensor>, ITransparentWrapper
{
    private readonly nn.Module<Tensor, DecoderContext, Tensor> inner;

    internal FsdpLayer(nn.Module<Tensor, DecoderContext, Tensor> inner, List<FlatParameter> flats, ShardingStrategy strategy, bool recomputes) : base(nameof(FsdpLayer))
    {
        this.inner = inner;
        Flats = flats;
        Strategy = strategy;
        Recomputes = recomputes;
        foreach (var (name, child) in inner.named_children())
        {
            register_module(name, child);
        }
    }

    /// <inheritdoc />
    public nn.Module Inner => inner;

    internal List<FlatParameter> Flats { get; }

    internal ShardingStrategy Strategy { get; }

    /// <summary>
    /// Runs without a graph in forward and recomputes in backward: always under FULL_SHARD (its weights are freed in
    /// between), and under SHARD_GRAD_OP with activation checkpointing (its weights stay gathered).
    /// </summary>
    internal bool Recomputes { get; }

    /// <summary>The layer that runs after this one in forward (null for the last): prefetched while this one computes.</summary>
    internal FsdpLayer? Next { get; set; }

    /// <summary>The layer that runs before this one in forward (null for the first): prefetched during this one's backward.</summary>
    internal FsdpLayer? Previous { get; set; }

    internal void Prefetch()
    {
        foreach (var flat in Flats)
        {
            flat.Prefetch();
        }
    }

    internal void Gather()
    {
        foreach (var flat in Flats)
        {
            flat.Gather();
        }
    }

    internal void Free()
    {
        foreach (var flat in Flats)
        {
            flat.Free();
        }
    }

    internal void ReduceGradients()
    {
        foreach (var flat in Flats)
        {
            flat.ReduceGradients();
        }
    }

    internal Tensor RunInner(Tensor hidden, DecoderContext context) => inner.forward(hidden, context);

    /// <inheritdoc />
    public override Tensor forward(Tensor hidden, DecoderContext context)
    {
        if (Flats.Count == 0)
        {
            return inner.forward(hidden, context); // nothing sharded (no float parameters)
        }
        // Backward needs this layer when its parameters train or when its input's gradient is wanted (a frozen layer
        // above an adapted one, whose sharded frozen weights must be gathered again for it).
        if (!is_grad_enabled() || (!hidden.requires_grad && !Flats.Any(f => f.Trainable)))
        {
            // Evaluation and generation, or nothing to differentiate: gather, run without a graph, free.
            Gather();
            try
            {
                using var noGrad = no_grad();
                return inner.forward(hidden, context);
            }
            finally
            {
                Free();
            }
        }
        var (cos, sin, mask) = context.AsInputs();
        // The shards are inputs so that a node exists even when the hidden states do not require grad (a frozen embedding under LoRA).
        var inputs = new List<object> { hidden, cos, sin, this, mask };
        inputs.AddRange(Flats.Where(f => f.Trainable).Select(f => f.Shard));
        return FsdpFunction.apply([.. inputs]);
    }

    /// <summary>The layer's graph kept from forward to backward under SHARD_GRAD_OP.</summary>
    private sealed class KeptGraph(Tensor input, Tensor output)
    {
        public Tensor Input { get; } = input;

        public Tensor Output { get; } = output;
    }

    private sealed class FsdpFunction : autograd.SingleTensorFunction<FsdpFunction>
    {
        public override string Name => nameof(FsdpFunction);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var hidden = (Tensor)vars[0];
            var (cos, sin, mask) = ((Tensor)vars[1], (Tensor)vars[2], (Tensor)vars[4]);
            var layer = (FsdpLayer)vars[3];
            ctx.save_data("layer", layer);
            ctx.save_data("inputs", vars.Length);
            layer.Gather();
            layer.Next?.Prefetch();
            if (!layer.Recomputes)
            {
                Tensor input, output;
                using (enable_grad())
                {
                    input = hidden.detach().requires_grad_(true);
                    output = layer.RunInner(input, DecoderContext.FromInputs(cos, sin, mask));
                }
                // The handles outlive the layer's dispose scope: backward needs them and disposes them.
                ctx.save_data("graph", new KeptGraph(input.DetachFromDisposeScope(), output.DetachFromDisposeScope()));
                return output.detach();
            }
            ctx.save_for_backward([hidden, cos, sin, mask]);
            // The CPU generator's state, replayed by the recomputation (dropout in LoRA adapters), as checkpointing does.
            using (var rng = get_rng_state())
            {
                ctx.save_data("rng", rng.data<byte>().ToArray());
            }
            try
            {
                using var noGrad = no_grad();
                return layer.RunInner(hidden, DecoderContext.FromInputs(cos, sin, mask));
            }
            finally
            {
                if (layer.Strategy == ShardingStrategy.FullShard)
                {
                    layer.Free();
                }
            }
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            using var scope = NewDisposeScope();
            var layer = (FsdpLayer)ctx.get_data("layer");
            int inputs = (int)ctx.get_data("inputs");
            Tensor input;
            if (!layer.Recomputes)
            {
                var graph = (KeptGraph)ctx.get_data("graph");
                graph.Output.backward([gradOutput]);
                input = graph.Input;
                graph.Output.Dispose();
            }
            else
            {
                var saved = ctx.get_saved_variables();
                layer.Gather();
                layer.Previous?.Prefetch();
                input = ActivationCheckpointing.RecomputeBackward(ctx, saved, gradOutput, layer.RunInner);
            }
            // Parameter gradients went to the gathered parameters' grad slots; they leave as this rank's shard of the sum.
            layer.ReduceGradients();
            layer.Free();
            var inputGrad = input.grad?.MoveToOuterDisposeScope();
            input.Dispose();
            var result = new List<Tensor> { inputGrad!, null!, null!, null!, null! };
            result.AddRange(Enumerable.Repeat((Tensor)null!, inputs - 5));
            return AutogradHandles.EndBackward(gradOutput, result);
        }
    }
}
