using static TorchSharp.torch;

namespace FrugalLM.Models;

/// <summary>
/// A module that stands in place of another and registers the wrapped module's children as its own, so
/// parameter names do not change (checkpointing's layer wrapper). <see cref="ModuleTree"/> replaces a
/// child of such a wrapper inside <see cref="Inner"/> too, so the wrapped forward uses the replacement.
/// </summary>
public interface ITransparentWrapper
{
    /// <summary>The wrapped module.</summary>
    nn.Module Inner { get; }
}
