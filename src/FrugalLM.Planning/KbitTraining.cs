namespace FrugalLM.Planning;

/// <summary>
/// "Prepare for int8 training", as PEFT's <c>prepare_model_for_kbit_training</c>: norms and the output layer in fp32,
/// activation checkpointing on, the base frozen under LoRA. Without PEFT's memory blow-up: PEFT casts every
/// parameter that is not int8 to fp32, which doubles the embedding (and, with them, the activations that then
/// run in fp32); here the embedding and every other frozen 16-bit weight keep the compute precision, and only the
/// tensors whose precision matters for the loss (norm scales, the LM head and its logits) are widened.
/// </summary>
public static class KbitTraining
{
    /// <summary>
    /// <paramref name="plan"/> with <see cref="RunPlan.Fp32NormsAndHead"/> set and checkpointing on (every layer,
    /// unless the plan already checkpoints). The runtime (<c>Techniques.Apply</c>) and the estimator both read
    /// the result, so the estimate is of the prepared run.
    /// </summary>
    public static RunPlan Prepare(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        return plan with
        {
            Fp32NormsAndHead = true,
            Checkpointing = plan.Checkpointing.Enabled ? plan.Checkpointing : Checkpointing.EveryLayer,
        };
    }
}
