using FrugalLM.IO;
using FrugalLM.Lora;
using FrugalLM.Models;
using FrugalLM.Offload;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using FrugalLM.Tokenization;
using static TorchSharp.torch;

namespace FrugalLM.Cli;

/// <summary>
/// A model folder (and optionally a LoRA adapter) loaded for generation or evaluation at a precision: the
/// plan of the run is estimated before the weights are read, so the command can print predicted against
/// measured memory.
/// </summary>
internal sealed class InferenceModel : IDisposable
{
    private readonly HfCheckpoint checkpoint;
    private readonly AppliedTechniques applied;

    private InferenceModel(HfCheckpoint checkpoint, HfTokenizer tokenizer, CausalLM model, MemoryReport report, AppliedTechniques applied)
    {
        this.checkpoint = checkpoint;
        Tokenizer = tokenizer;
        Model = model;
        Report = report;
        this.applied = applied;
    }

    public CausalLM Model { get; }

    public HfTokenizer Tokenizer { get; }

    public MemoryReport Report { get; }

    public GenerationConfig? Generation => checkpoint.Generation;

    /// <summary>The streamed decoder layers, when the run offloads weights to disk.</summary>
    public OffloadedModel? Offload => applied.Offload;

    /// <summary>Loads <paramref name="folder"/> (plus <paramref name="adapter"/>) at <paramref name="precision"/>.</summary>
    /// <param name="folder">HF model folder.</param>
    /// <param name="adapter">PEFT LoRA adapter folder, or null.</param>
    /// <param name="precision">fp32, bf16 or fp16 (fp16 is a storage format on this CPU).</param>
    /// <param name="batch">Sequences processed together.</param>
    /// <param name="sequence">Tokens per sequence, from the tokenizer (prompt plus new tokens, or the eval length).</param>
    /// <param name="quantization">Base weights' quantization (a folder saved 8-bit is int8 whatever this says).</param>
    /// <param name="offload">--offload (null, none or disk).</param>
    /// <param name="budgetBytes">--memory-budget above the runtime baseline, or null.</param>
    /// <param name="evaluationChunk">Tokens per chunk of an evaluation's held-out loss (frugal eval), 0 when not evaluating.</param>
    public static InferenceModel Open(string folder, string? adapter, Planning.Precision precision, int batch, Func<HfTokenizer, int> sequence,
        Planning.Quantization? quantization = null, string? offload = null, long? budgetBytes = null, int evaluationChunk = 0)
    {
        if (precision == Planning.Precision.Bf16Pure)
        {
            throw new ArgumentException("--precision for inference is fp32, bf16 or fp16");
        }
        var tokenizer = HfTokenizer.Load(folder);
        var checkpoint = HfCheckpoint.Open(folder);
        try
        {
            var adapterInfo = adapter is null ? null : LoraAdapter.ReadConfig(adapter);
            var spec = checkpoint.Spec();
            var plan = new RunPlan
            {
                Model = spec,
                Mode = RunMode.Generate,
                Precision = precision,
                Quantization = Int8Checkpoint.Options(checkpoint) is { } saved
                    ? new Planning.Quantization(QuantizationKind.Int8, OutlierThreshold: saved.Threshold) { SkipModules = saved.Skip }
                    : quantization ?? Planning.Quantization.None,
                Optimizer = OptimizerKind.None,
                Lora = adapterInfo is null ? null : new LoraSettings(adapterInfo.Config.Rank, adapterInfo.Config.Alpha,
                    // Names map one to one; a regex is estimated as every linear layer (an upper bound).
                    adapterInfo.Config.Targets.Kind == LoraTargetKind.Names ? adapterInfo.Config.Targets.Names : [LoraSettings.AllLinear], 0),
                MicroBatchSize = batch,
                SequenceLength = Math.Min(spec.MaxPositionEmbeddings, sequence(tokenizer)),
                Device = ComputeDevice.Cpu,
                // Evaluation's held-out loss runs the head chunk by chunk (the estimator's evaluation term).
                Loss = evaluationChunk > 0 ? new LossComputation(true, evaluationChunk) : LossComputation.Full,
            };
            var report = MemoryReport.Predict(plan);
            if (offload is not null || budgetBytes is not null)
            {
                report = report.Place(offload, budgetBytes, DiskOffload.Policy(checkpoint));
                plan = report.Plan;
                CliRunner.Status(report.PlacementLine(budgetBytes));
            }
            // Weights are read straight into the plan's dtype; the plan's techniques do the rest in their order
            // (quantize, then the saved adapter in the LoRA step, then the precision, then disk offload). Streamed
            // layers are never loaded here: the offload reads them as they run.
            var model = checkpoint.CreateModel(WeightDtype(precision), plan.Quantization.Kind == QuantizationKind.Int8
                ? new Int8Options { Threshold = plan.Quantization.OutlierThreshold, Skip = plan.Quantization.SkipModules }
                : null, plan.StreamsWeights ? DiskOffload.Streamed(plan.Offload.ResidentLayers) : null);
            var applied = Techniques.Apply(model, plan, adapter: adapter is null ? null : m => LoraAdapter.Load(adapter, m), weights: checkpoint);
            if (applied.Lora is { } lora && precision == Planning.Precision.Fp32 && plan.Quantization.Kind == QuantizationKind.None && !plan.StreamsWeights && !plan.StreamsFromHost)
            {
                lora.MergeAndUnload(); // exact in fp32, and as fast as the base (a streamed base is not in its layers to merge into)
            }
            model.eval();
            return new InferenceModel(checkpoint, tokenizer, model, report, applied);
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The dtype a training run creates its model in: the compute dtype when no fp32 master of a loaded weight is needed
    /// (a streamed base, or a LoRA base of float weights in 16 bits: its frozen weights only ever exist in the compute
    /// dtype), fp32 otherwise (masters keep the file's fp32 values). Loading a 16-bit LoRA base in fp32 and converting it
    /// after peaked at the fp32 model plus the converted tensors (measured on llama-100m, bf16 LoRA: 438 MiB above the
    /// baseline while loading against 296 for the training steps).
    /// </summary>
    public static ScalarType TrainingLoadDtype(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        bool frozenBase = plan.Lora is not null && plan.Quantization.Kind == QuantizationKind.None;
        return (plan.StreamsWeights || frozenBase) && plan.ComputeBytes == 2 ? WeightDtype(plan.Precision) : ScalarType.Float32;
    }

    /// <summary>The dtype inference weights are read in for <paramref name="precision"/>.</summary>
    public static ScalarType WeightDtype(Planning.Precision precision) => precision switch
    {
        Planning.Precision.Bf16 => ScalarType.BFloat16,
        Planning.Precision.Fp16 => ScalarType.Float16,
        _ => ScalarType.Float32,
    };

    public void Dispose()
    {
        applied.Dispose();
        Model.Dispose();
        checkpoint.Dispose();
    }
}
