using static TorchSharp.torch;

namespace FrugalLM.Native;

/// <summary>
/// Releases the C# handles of tensors that cross a custom autograd function's backward. TorchSharp wraps each incoming
/// gradient in a new <see cref="Tensor"/> and reads the handles of the returned gradients, and both handles belong to
/// the dispose scope that is current while backward runs: the training step's. Each one keeps its tensor alive until
/// the step ends, although autograd has its own references and drops them as soon as the gradient has moved on. For a
/// layer's weight gradient that is a second copy of every gradient through the whole backward pass; for a
/// checkpointed layer, its input gradient. Every custom backward calls <see cref="BeginBackward"/> first and hands
/// its incoming and returned gradients to <see cref="EndBackward"/>: incoming ones are released at once (only
/// this function used them), returned ones at the next custom backward on this thread, by which time autograd has
/// taken them (it reads the returned handles as soon as the function returns), or with the step's scope.
/// </summary>
public static class AutogradHandles
{
    [ThreadStatic]
    private static List<Tensor>? returned;

    /// <summary>Releases the gradients earlier custom backward calls on this thread returned to autograd.</summary>
    public static void BeginBackward()
    {
        if (returned is null)
        {
            return;
        }
        foreach (var t in returned)
        {
            t.Dispose();
        }
        returned.Clear();
    }

    /// <summary>
    /// Releases <paramref name="gradOutput"/> now and marks <paramref name="gradients"/> (what the backward returns;
    /// nulls allowed) for release at the next <see cref="BeginBackward"/>; returns <paramref name="gradients"/>.
    /// </summary>
    public static List<Tensor> EndBackward(Tensor gradOutput, List<Tensor> gradients)
    {
        gradOutput.Dispose();
        returned ??= [];
        returned.AddRange(gradients.Where(g => g is not null));
        return gradients;
    }
}
