using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// Tells a listener when the backward pass has finished a decoder layer. TorchSharp 0.107 has no tensor hooks, so the
/// layer's input passes through an identity autograd function (as <see cref="MemoryTrace.MarkInBackward"/>) whose
/// backward runs once the gradient of that input is complete: by then every operation of the layer has been
/// differentiated and autograd, which runs a parameter's gradient accumulation as soon as it is ready (ahead of other
/// ready nodes), has written the layer's parameter gradients. The host optimizer steps the layer from there while
/// backward goes on to the layers below.
/// </summary>
public static class LayerBackward
{
    [ThreadStatic]
    private static Action<torch.nn.Module>? listener;

    /// <summary>
    /// Calls <paramref name="layerDone"/> (on the thread running backward) for each layer marked on this thread until the
    /// result is disposed. The listener must be set through the forward pass (marks are placed there) and the backward
    /// pass (recomputed layers place theirs then).
    /// </summary>
    public static IDisposable Listen(Action<torch.nn.Module> layerDone)
    {
        var previous = listener;
        listener = layerDone;
        return new Restore(previous);
    }

    /// <summary>
    /// Returns <paramref name="input"/> unchanged; while a listener is set and a graph is being built, through an
    /// identity function that reports <paramref name="layer"/> when backward reaches it. An input that needs no gradient
    /// (the first layer on a frozen embedding) gets no node: that layer is then reported never.
    /// </summary>
    public static torch.Tensor Mark(torch.Tensor input, torch.nn.Module layer) =>
        listener is { } current && input.requires_grad && torch.is_grad_enabled() ? BackwardHook.Apply(input, () => current(layer)) : input;

    private sealed class Restore(Action<torch.nn.Module>? previous) : IDisposable
    {
        public void Dispose() => listener = previous;
    }
}
