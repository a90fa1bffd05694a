using FrugalLM.Models;
using FrugalLM.Native;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Quantization;

/// <summary>Settings of <see cref="Int8Quantization.Apply"/>.</summary>
public sealed record Int8Options
{
    /// <summary>Outlier threshold on |x| (LLM.int8()'s 6.0); 0 disables the float32 outlier split.</summary>
    public double Threshold { get; init; } = 6.0;

    /// <summary>
    /// Linear layers left in their float dtype: an entry matches a module path equal to it or ending in
    /// <c>.</c> + entry (<c>lm_head</c>, <c>down_proj</c>, <c>model.layers.0.mlp.down_proj</c>). By default the
    /// output layer, as bitsandbytes' and the article's flow keep it.
    /// </summary>
    public IReadOnlyList<string> Skip { get; init; } = ["lm_head"];
}

/// <summary>Quantizes a model's linear layers to <see cref="Int8Linear"/> in place.</summary>
public static class Int8Quantization
{
    /// <summary>
    /// Replaces every <see cref="Linear"/> under <paramref name="root"/> except the skipped ones by an
    /// <see cref="Int8Linear"/> at the same path (so parameter names keep their HF keys), then frees the float
    /// weights it replaced. Embeddings and norms are not linear layers and stay as they are.
    /// </summary>
    /// <returns>The paths that were quantized, in module order.</returns>
    public static IReadOnlyList<string> Apply(nn.Module root, Int8Options? options = null)
    {
        ArgumentNullException.ThrowIfNull(root);
        options ??= new Int8Options();
        var targets = ModuleTree.Find(root, (path, module) => module is Linear && !IsSkipped(path, options.Skip));
        var replaced = new List<string>(targets.Count);
        foreach (var (path, module) in targets)
        {
            var linear = (Linear)module;
            var layer = Int8Linear.FromLinear(linear, options.Threshold);
            ModuleTree.Replace(root, path, layer);
            replaced.Add(path);
            if (!SharesParameters(root, linear))
            {
                linear.Dispose();
            }
        }
        return replaced;
    }

    /// <summary>Whether <paramref name="path"/> is one of the skipped modules (by path or by name).</summary>
    public static bool IsSkipped(string path, IReadOnlyList<string> skip) =>
        skip.Any(s => path == s || path.EndsWith("." + s, StringComparison.Ordinal));

    /// <summary>
    /// Whether a parameter of <paramref name="linear"/> is still in use elsewhere under the root (tied weights).
    /// Memory it cannot locate (not a contiguous CPU tensor) counts as shared, so it is never freed early.
    /// </summary>
    private static bool SharesParameters(nn.Module root, Linear linear)
    {
        var own = linear.parameters().Select(Address).ToHashSet();
        return own.Contains(0) || root.parameters().Any(p => own.Contains(Address(p)));
    }

    private static unsafe nint Address(Tensor t) =>
        t.device_type == DeviceType.CPU && t.is_contiguous() ? (nint)TensorMemory.Pointer(t) : 0;
}
