using FrugalLM.Models;
using FrugalLM.Models.Llama;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Precision;

/// <summary>
/// The runtime half of <see cref="Planning.RunPlan.Fp32NormsAndHead"/> (PEFT's <c>prepare_model_for_kbit_training</c>
/// without its up-cast of every other weight): widens the weights of every RMSNorm and LayerNorm to fp32, and
/// replaces an untied LM head that is still a float <see cref="Linear"/> (not int8) by an <see cref="Fp32Linear"/>
/// that returns fp32 logits. Run before <see cref="MixedPrecision.Apply"/> and pass it the returned paths, so
/// that the rest of the model (embedding included) becomes 16-bit and these stay fp32. A norm keeps its
/// input's dtype at its output (see <see cref="RmsNorm"/>; libtorch's layer_norm takes fp32 parameters with
/// 16-bit inputs natively), so nothing after a norm is widened.
/// </summary>
public static class Fp32NormsAndHead
{
    /// <summary>The LM head's module path in both architectures (a tied head is the embedding and has none).</summary>
    public const string HeadPath = "lm_head";

    /// <summary>Widens the norms and the head of <paramref name="model"/> in place.</summary>
    /// <returns>The module paths whose parameters must stay fp32.</returns>
    public static IReadOnlyList<string> Apply(CausalLM model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var kept = new List<string>();
        using var noGrad = no_grad();
        foreach (var (path, norm) in ModuleTree.Find(model, (_, m) => m is RmsNorm or LayerNorm))
        {
            foreach (var (name, p) in norm.named_parameters(recurse: false).ToList())
            {
                if (p.is_floating_point() && p.dtype != ScalarType.Float32)
                {
                    ModuleTree.ReplaceParameter(norm, name, new Parameter(p.to(ScalarType.Float32), p.requires_grad));
                }
            }
            kept.Add(path);
        }
        // An int8 head (not skipped at quantization) stays int8: widening it would undo the quantization.
        if (ModuleTree.Find(model, (path, m) => path == HeadPath && m is Linear) is [var (headPath, head)])
        {
            ModuleTree.Replace(model, headPath, new Fp32Linear((Linear)head));
            head.Dispose();
            kept.Add(headPath);
        }
        return kept;
    }
}
