using FrugalLM.Checkpointing;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Offload;

/// <summary>
/// Stands where a decoder layer stood and streams its frozen weights (from disk, or from the host tier) around each use; the wrapped layer's
/// children are registered as this module's own, so parameter names keep their HF keys.
/// </summary>
/// <remarks>
/// Without gradients (generation, evaluation) it acquires the layer, runs it and releases it. Training (LoRA adapters
/// on the frozen base) has the shape of FSDP's FULL_SHARD: a custom autograd function runs the layer without a graph in
/// forward and releases it, keeping only the layer's input; backward acquires it again, recomputes it with gradients
/// and differentiates it, so the adapters' gradients accumulate and the input gradient flows on. A graph kept from
/// forward would hold the weights as saved tensors (TorchSharp 0.107 has no tensor hooks to swap them out), so the
/// recomputation is the price of not keeping them, as with activation checkpointing, which it replaces.
/// </remarks>
public sealed class OffloadedLayer : nn.Module<Tensor, DecoderContext, Tensor>, ITransparentWrapper
{
    private readonly nn.Module<Tensor, DecoderContext, Tensor> inner;
    private readonly LayerStreamer streamer;
    private readonly int index;

    internal OffloadedLayer(nn.Module<Tensor, DecoderContext, Tensor> inner, LayerStreamer streamer, int index) : base(nameof(OffloadedLayer))
    {
        this.inner = inner;
        this.streamer = streamer;
        this.index = index;
        foreach (var (name, child) in inner.named_children())
        {
            register_module(name, child);
        }
    }

    /// <inheritdoc />
    public nn.Module Inner => inner;

    private Tensor[] Trainable() => inner.parameters().Where(p => p.requires_grad).Cast<Tensor>().ToArray();

    private Tensor Run(Tensor hidden, DecoderContext context, StreamDirection direction)
    {
        var slot = streamer.Acquire(index, direction);
        try
        {
            return inner.forward(hidden, context);
        }
        finally
        {
            streamer.Release(index, slot);
        }
    }

    /// <inheritdoc />
    public override Tensor forward(Tensor hidden, DecoderContext context)
    {
        var trainable = is_grad_enabled() ? Trainable() : [];
        if (!is_grad_enabled() || (!hidden.requires_grad && trainable.Length == 0))
        {
            return Run(hidden, context, StreamDirection.Cyclic);
        }
        var (cos, sin, mask) = context.AsInputs();
        // Trainable parameters are inputs so that a node exists even when the hidden states do not require grad (a frozen
        // embedding under LoRA).
        var inputs = new List<object> { hidden, cos, sin, this, mask };
        inputs.AddRange(trainable);
        return StreamFunction.apply([.. inputs]);
    }

    private sealed class StreamFunction : autograd.SingleTensorFunction<StreamFunction>
    {
        public override string Name => nameof(StreamFunction);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var hidden = (Tensor)vars[0];
            var (cos, sin, mask) = ((Tensor)vars[1], (Tensor)vars[2], (Tensor)vars[4]);
            var layer = (OffloadedLayer)vars[3];
            ctx.save_for_backward([hidden, cos, sin, mask]);
            ctx.save_data("layer", layer);
            ctx.save_data("inputs", vars.Length);
            // The CPU generator's state, replayed by the recomputation (LoRA dropout), as checkpointing does.
            using (var rng = get_rng_state())
            {
                ctx.save_data("rng", rng.data<byte>().ToArray());
            }
            using var noGrad = no_grad();
            return layer.Run(hidden, DecoderContext.FromInputs(cos, sin, mask), StreamDirection.ForwardThenBackward);
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            using var scope = NewDisposeScope();
            var layer = (OffloadedLayer)ctx.get_data("layer");
            int inputs = (int)ctx.get_data("inputs");
            var saved = ctx.get_saved_variables();
            var slot = layer.streamer.Acquire(layer.index, StreamDirection.Backward);
            Tensor input;
            try
            {
                // Marked where the layer really runs with a graph, so the host optimizer (--offload all) steps its adapters
                // as soon as backward is through it, as in a checkpointed segment.
                input = ActivationCheckpointing.RecomputeBackward(ctx, saved, gradOutput, (h, c) => layer.inner.forward(LayerBackward.Mark(h, layer.inner), c));
            }
            finally
            {
                layer.streamer.Release(layer.index, slot);
            }
            var inputGrad = input.grad?.MoveToOuterDisposeScope();
            var result = new List<Tensor> { inputGrad!, null!, null!, null!, null! };
            result.AddRange(Enumerable.Repeat((Tensor)null!, inputs - 5));
            return AutogradHandles.EndBackward(gradOutput, result);
        }
    }
}
