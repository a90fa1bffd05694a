using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Checkpointing;

/// <summary>
/// Gradient (activation) checkpointing of decoder layers: the stack is cut into segments of
/// <c>every</c> consecutive layers; forward keeps only each segment's input, and backward recomputes the
/// segment before differentiating it. Memory for activations drops from all layers' intermediates to the
/// segment inputs plus one segment's intermediates, for about one extra forward pass.
/// </summary>
public static class ActivationCheckpointing
{
    /// <summary>Wraps the decoder layers of <paramref name="model"/>; returns the number of segments.</summary>
    public static int Apply(CausalLM model, int every = 1)
    {
        if (every < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(every), every, "checkpoint every k layers needs k >= 1");
        }
        var layers = model.DecoderLayers;
        if (layers.Any(l => l is CheckpointedLayer))
        {
            throw new InvalidOperationException("checkpointing is already applied to this model");
        }
        int segments = 0;
        for (int start = 0; start < layers.Count; start += every)
        {
            var segment = new Segment(Enumerable.Range(start, Math.Min(every, layers.Count - start)).Select(i => layers[i]).ToArray());
            for (int i = 0; i < segment.Layers.Length; i++)
            {
                ModuleTree.Replace(model, $"{model.DecoderLayersPath}.{start + i}", new CheckpointedLayer(segment, i));
            }
            segments++;
        }
        return segments;
    }

    /// <summary>
    /// The backward of a recomputing autograd function: reruns <paramref name="run"/> with gradients on from the saved
    /// input (<paramref name="saved"/>[0]) and context tensors ([1..3]), replaying the forward's RNG state (saved as bytes
    /// under "rng"), and differentiates it by <paramref name="gradOutput"/>; parameter gradients accumulate in their grad
    /// slots. Returns the input whose <c>grad</c> is the input gradient (in the caller's dispose scope).
    /// </summary>
    internal static Tensor RecomputeBackward(autograd.AutogradContext ctx, IList<Tensor> saved, Tensor gradOutput, Func<Tensor, DecoderContext, Tensor> run)
    {
        var current = get_rng_state();
        set_rng_state(tensor((byte[])ctx.get_data("rng")));
        Tensor output;
        Tensor input;
        using (enable_grad())
        {
            input = saved[0].detach().requires_grad_(true);
            output = run(input, DecoderContext.FromInputs(saved[1], saved[2], saved[3]));
        }
        set_rng_state(current);
        output.backward([gradOutput]);
        return input;
    }

    /// <summary>Consecutive layers recomputed together.</summary>
    internal sealed class Segment(nn.Module<Tensor, DecoderContext, Tensor>[] layers)
    {
        public nn.Module<Tensor, DecoderContext, Tensor>[] Layers { get; } = layers;

        public Tensor Run(Tensor hidden, DecoderContext context)
        {
            foreach (var layer in Layers)
            {
                hidden = DecoderStack.RunLayer(layer, hidden, context);
            }
            return hidden;
        }

        /// <summary>Parameters of the segment that get gradients (passed to the autograd function as inputs).</summary>
        public Tensor[] Trainable() => Layers.SelectMany(l => l.parameters()).Where(p => p.requires_grad).Cast<Tensor>().ToArray();
    }
}

/// <summary>
/// Stands where a decoder layer stood. The first layer of a segment runs the whole segment through the
/// checkpoint function; the segment's other layers pass their input through (the segment already applied
/// them). The wrapped layer's children are registered as this module's own, so parameter names are
/// unchanged (<c>model.layers.0.self_attn.q_proj.weight</c>) and checkpoints keep their HF keys.
/// </summary>
public sealed class CheckpointedLayer : nn.Module<Tensor, DecoderContext, Tensor>, ITransparentWrapper
{
    private readonly ActivationCheckpointing.Segment segment;
    private readonly int position;

    internal CheckpointedLayer(ActivationCheckpointing.Segment segment, int position) : base(nameof(CheckpointedLayer))
    {
        this.segment = segment;
        this.position = position;
        foreach (var (name, child) in Inner.named_children())
        {
            register_module(name, child);
        }
    }

    /// <inheritdoc />
    public nn.Module Inner => segment.Layers[position];

    /// <inheritdoc />
    public override Tensor forward(Tensor hidden, DecoderContext context)
    {
        if (position > 0)
        {
            return hidden.alias();
        }
        if (!is_grad_enabled())
        {
            return segment.Run(hidden, context);
        }
        var (cos, sin, mask) = context.AsInputs();
        var inputs = new List<object> { hidden, cos, sin, segment, mask };
        inputs.AddRange(segment.Trainable());
        return CheckpointFunction.apply([.. inputs]);
    }

    /// <summary>
    /// Forward without keeping intermediates; backward recomputes the segment with gradients on, restoring the
    /// RNG state of the forward (for dropout), and differentiates it. Trainable parameters are passed as extra
    /// inputs so that a node exists even when the hidden states do not require grad (a frozen embedding
    /// under LoRA): transformers' "element 0 of tensors does not require grad" trap cannot happen here.
    /// </summary>
    private sealed class CheckpointFunction : autograd.SingleTensorFunction<CheckpointFunction>
    {
        public override string Name => nameof(CheckpointFunction);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var hidden = (Tensor)vars[0];
            var (cos, sin, mask) = ((Tensor)vars[1], (Tensor)vars[2], (Tensor)vars[4]);
            var segment = (ActivationCheckpointing.Segment)vars[3];
            ctx.save_for_backward([hidden, cos, sin, mask]);
            ctx.save_data("segment", segment);
            // Kept as bytes: TorchSharp's context stores tensors only through save_for_backward. The state is the
            // process-wide CPU generator's (dropout takes no generator in TorchSharp), so the replayed masks equal the
            // first ones only while no other thread draws from it between forward and backward.
            using (var rng = get_rng_state())
            {
                ctx.save_data("rng", rng.data<byte>().ToArray());
            }
            ctx.save_data("parameters", vars.Length - 5);
            using var noGrad = no_grad();
            return segment.Run(hidden, DecoderContext.FromInputs(cos, sin, mask));
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            // The recomputed intermediates, and the handles of the saved inputs, live in this scope and go when it ends.
            // Parameter gradients are accumulated into .grad by a nested backward (as PyTorch's reentrant checkpoint
            // does) instead of being returned: a returned tensor's C# handle would stay alive in the caller's scope until
            // the step ends, holding a second copy of every checkpointed parameter's gradient.
            AutogradHandles.BeginBackward();
            using var scope = NewDisposeScope();
            var saved = ctx.get_saved_variables();
            var segment = (ActivationCheckpointing.Segment)ctx.get_data("segment");
            var parameters = segment.Trainable();
            var input = ActivationCheckpointing.RecomputeBackward(ctx, saved, gradOutput, segment.Run);
            var inputGrad = input.grad?.MoveToOuterDisposeScope();
            var result = new List<Tensor> { inputGrad!, null!, null!, null!, null! };
            result.AddRange(parameters.Select(_ => (Tensor)null!));
            return AutogradHandles.EndBackward(gradOutput, result);
        }
    }
}
