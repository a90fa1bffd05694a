using FrugalLM.Models.Llama;
using static TorchSharp.torch;

namespace FrugalLM.Models;

/// <summary>What every decoder stack (LLaMA's, OPT's, a checkpointed segment) does with each of its layers.</summary>
public static class DecoderStack
{
    /// <summary>
    /// Runs one decoder layer in its own dispose scope and returns only its output. The layer's intermediates
    /// lose their C# handles when it ends: autograd keeps what backward needs through its own references, and the
    /// rest (everything, under no_grad) is freed now instead of when the whole forward pass ends. Without this a
    /// checkpointed (no_grad) forward kept every layer's intermediates alive until the last layer ran, and
    /// checkpointing saved almost nothing.
    /// </summary>
    public static Tensor RunLayer(nn.Module<Tensor, DecoderContext, Tensor> layer, Tensor hidden, DecoderContext context)
    {
        using var scope = NewDisposeScope();
        // A wrapper (a checkpointed segment) runs its real layers through here again where they compute with a graph.
        if (layer is not ITransparentWrapper)
        {
            hidden = FrugalLM.Native.LayerBackward.Mark(hidden, layer);
        }
        return FrugalLM.Native.MemoryTrace.MarkInBackward(layer.forward(hidden, context), "bwd-layer").MoveToOuterDisposeScope();
    }
}
