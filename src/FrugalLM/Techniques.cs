using FrugalLM.Checkpointing;
using FrugalLM.Models.Llama;
using FrugalLM.Planning;
using FrugalLM.Precision;

namespace FrugalLM;

/// <summary>
/// Applies a plan's techniques to a loaded model in the one fixed order they compose in: quantize the base,
/// add LoRA adapters, set the precision, wrap layers for checkpointing (sharding and offloading come last).
/// Each step is a module replacement or wrapper that knows nothing of the others.
/// </summary>
public static class Techniques
{
    /// <summary>Prepares <paramref name="model"/> to train or generate as <paramref name="plan"/> says.</summary>
    /// <returns>The precision policy the trainer drives.</returns>
    public static MixedPrecision Apply(LlamaForCausalLM model, RunPlan plan)
    {
        if (!plan.Trains)
        {
            foreach (var p in model.parameters())
            {
                p.requires_grad_(false);
            }
        }
        var precision = MixedPrecision.Apply(model, plan.Precision, plan.GradientAccumulationSteps);
        if (plan.Trains && plan.Checkpointing.Enabled)
        {
            ActivationCheckpointing.Apply(model, plan.Checkpointing.Interval);
        }
        return precision;
    }
}
