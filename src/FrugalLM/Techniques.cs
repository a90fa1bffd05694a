using FrugalLM.Checkpointing;
using FrugalLM.IO;
using FrugalLM.Lora;
using FrugalLM.Models;
using FrugalLM.Offload;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Quantization;

namespace FrugalLM;

/// <summary>What <see cref="Techniques.Apply"/> set up on a model.</summary>
/// <param name="Precision">The precision policy the trainer drives.</param>
/// <param name="Lora">The LoRA adapters, when the plan has them.</param>
/// <param name="Offload">The streamed decoder layers, when the plan offloads weights to disk or to the host tier.</param>
public sealed record AppliedTechniques(MixedPrecision Precision, LoraModel? Lora, OffloadedModel? Offload = null) : IDisposable
{
    /// <inheritdoc />
    public void Dispose()
    {
        Offload?.Dispose();
        Precision.Dispose();
    }
}

/// <summary>
/// Applies a plan's techniques to a loaded model in the one fixed order they compose in: quantize the base,
/// add LoRA adapters, set the precision (with fp32 norms and head when the plan keeps them,
/// <see cref="KbitTraining"/>), wrap layers for checkpointing or, under disk offload, stream them (sharding comes last).
/// Each step is a module replacement or wrapper that knows nothing of the others.
/// </summary>
public static class Techniques
{
    /// <summary>Prepares <paramref name="model"/> to train or generate as <paramref name="plan"/> says.</summary>
    /// <param name="model">The loaded model.</param>
    /// <param name="plan">The plan.</param>
    /// <param name="seed">Seed of new adapters' initialization.</param>
    /// <param name="adapter">Loads existing adapters in the LoRA step instead of creating the plan's (generation
    /// and evaluation with a saved adapter).</param>
    /// <param name="weights">The folder the model was created from, for a plan that streams weights from disk (create the
    /// model with <see cref="DiskOffload.Streamed"/> deferred, in the compute dtype, so those weights are never loaded).</param>
    public static AppliedTechniques Apply(CausalLM model, RunPlan plan, long seed = 0, Func<CausalLM, LoraModel>? adapter = null, HfCheckpoint? weights = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        if (plan.StreamsWeights && weights is null)
        {
            throw new ArgumentException("disk offload streams weights from the model folder: pass the checkpoint", nameof(weights));
        }
        if (plan.StreamsFromHost && plan.Trains && plan.Lora is null)
        {
            throw new NotSupportedException("params offload streams frozen weights from the host tier: train LoRA adapters on it; streaming trainable weights (ZeRO-3 offload) is not implemented (--fsdp full keeps fp32 shards and gathers each layer, --offload optimizer moves the step to the host)");
        }
        if (plan.StreamsFromHost && plan.Sharding.Strategy != ShardingStrategy.None)
        {
            throw new NotSupportedException("params offload does not compose with FSDP");
        }
        if (!plan.Trains)
        {
            foreach (var p in model.parameters())
            {
                p.requires_grad_(false);
            }
        }
        switch (plan.Quantization.Kind)
        {
            case QuantizationKind.Int8:
                // A folder saved 8-bit already has int8 layers; only remaining float linears are quantized.
                Int8Quantization.Apply(model, new Int8Options { Threshold = plan.Quantization.OutlierThreshold, Skip = plan.Quantization.SkipModules });
                break;
            case QuantizationKind.Nf4:
                throw new NotSupportedException("NF4 is estimated by the planner but the runtime does not implement it yet; use int8");
        }
        LoraModel? lora = adapter?.Invoke(model);
        if (lora is null && plan.Lora is LoraSettings settings)
        {
            var targets = settings.TargetModules is [LoraSettings.AllLinear]
                ? LoraTargets.AllLinear
                : LoraTargets.FromNames(settings.TargetModules);
            lora = LoraModel.Apply(model, new LoraConfig { Rank = settings.Rank, Alpha = settings.Alpha, Dropout = settings.Dropout, Targets = targets }, seed: seed);
        }
        if (!plan.Trains)
        {
            foreach (var p in model.parameters())
            {
                p.requires_grad_(false); // loaded adapters arrive trainable
            }
        }
        // After quantization (an int8 head stays int8) and LoRA (adapters follow the compute precision).
        var fp32 = plan.Trains && plan.Fp32NormsAndHead ? Fp32NormsAndHead.Apply(model) : [];
        var precision = MixedPrecision.Apply(model, plan.Precision, plan.GradientAccumulationSteps, fp32Modules: fp32);
        // Streaming (from disk or from the host) recomputes every streamed layer in backward itself, so it takes
        // checkpointing's place.
        if (plan.Trains && plan.Checkpointing.Enabled && !plan.StreamsWeights && !plan.StreamsFromHost)
        {
            ActivationCheckpointing.Apply(model, plan.Checkpointing.Interval);
        }
        var offload = plan.StreamsWeights ? DiskOffload.Apply(model, weights!, new DiskOffloadOptions { ResidentLayers = plan.Offload.ResidentLayers })
            : plan.StreamsFromHost ? HostOffload.Apply(model)
            : null;
        // Replacing parameters (precision, quantization, LoRA, streaming) leaves C# wrappers of the replaced tensors that
        // only their finalizers release; until a collection runs, their native storage stays. Measured on llama-100m in
        // bf16 mixed precision: the fp32 weights as loaded (382 MiB) outlived the first training step, whose peak they
        // raised by as much (1962 MiB above the baseline against 1584 with this collection).
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        return new AppliedTechniques(precision, lora, offload);
    }
}
