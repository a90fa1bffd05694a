using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// An identity autograd function that runs an action when the backward pass reaches it: TorchSharp 0.107 has no
/// tensor hooks. What backward passes through it is the gradient of its input, so at that moment everything computed
/// from the input (a decoder layer's parameter gradients, when the input is the layer's) is done.
/// </summary>
internal static class BackwardHook
{
    /// <summary>Returns an alias of <paramref name="input"/> whose backward runs <paramref name="reached"/> first.</summary>
    public static torch.Tensor Apply(torch.Tensor input, Action reached) => Hook.apply(input, reached);

    private sealed class Hook : torch.autograd.SingleTensorFunction<Hook>
    {
        public override string Name => nameof(BackwardHook);

        public override torch.Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            ctx.save_data("reached", vars[1]);
            return ((torch.Tensor)vars[0]).alias();
        }

        public override List<torch.Tensor> backward(torch.autograd.AutogradContext ctx, torch.Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            ((Action)ctx.get_data("reached"))();
            return AutogradHandles.EndBackward(gradOutput, [gradOutput.alias(), null!]);
        }
    }
}
