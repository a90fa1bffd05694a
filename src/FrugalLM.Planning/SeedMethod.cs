namespace FrugalLM.Planning;

/// <summary>The inputs of the article's estimate.</summary>
/// <param name="Parameters">Parameter count (the article rounds LLaMA-7B to "6B").</param>
/// <param name="BytesPerValue">Bytes of each weight, gradient and activation value (fp32 4, fp16 2, int8 1).</param>
/// <param name="OptimizerBytesPerParameter">Optimizer bytes per parameter (AdamW: 2 values; int8 LLaMA: 2 B).</param>
/// <param name="HiddenSize">hidden_size.</param>
/// <param name="IntermediateSize">intermediate_size.</param>
/// <param name="Layers">num_hidden_layers.</param>
/// <param name="ContextLength">Tokens per training sequence.</param>
/// <param name="CudaContextBytes">The CUDA kernels' memory (the article: about 1.3 GB).</param>
public sealed record SeedInputs(
    long Parameters,
    double BytesPerValue,
    double OptimizerBytesPerParameter,
    int HiddenSize,
    int IntermediateSize,
    int Layers,
    int ContextLength,
    long CudaContextBytes = FrameworkOverhead.DefaultCudaContextBytes);

/// <summary>The article's estimate, in bytes (print them in decimal GB, as the article does).</summary>
/// <param name="Inputs">What was estimated.</param>
/// <param name="ParameterBytes">Parameters x bytes per value.</param>
/// <param name="GradientBytes">Parameters x bytes per value.</param>
/// <param name="OptimizerBytes">Parameters x optimizer bytes per parameter.</param>
/// <param name="CudaContextBytes">The CUDA context.</param>
/// <param name="ActivationBytesPerSequence">(hidden + intermediate) x layers x context x bytes per value.</param>
public sealed record SeedEstimate(
    SeedInputs Inputs,
    long ParameterBytes,
    long GradientBytes,
    long OptimizerBytes,
    long CudaContextBytes,
    long ActivationBytesPerSequence)
{
    /// <summary>The "model part": parameters + gradients + optimizer + CUDA context.</summary>
    public long ModelBytes => ParameterBytes + GradientBytes + OptimizerBytes + CudaContextBytes;

    /// <summary>Model part plus the activations of <paramref name="batch"/> sequences.</summary>
    public long TotalBytes(int batch) => ModelBytes + batch * ActivationBytesPerSequence;

    /// <summary>floor((budget - model part) / activations per sequence), or 0 when the model part does not fit.</summary>
    public int MaxBatch(long budgetBytes) => budgetBytes <= ModelBytes
        ? 0
        : (int)Math.Min(int.MaxValue, (budgetBytes - ModelBytes) / ActivationBytesPerSequence);
}

/// <summary>
/// The article's own ("seed") method, kept apart from <see cref="MemoryEstimator"/>: memory = parameters +
/// gradients + optimizer states + 1.3 GB of CUDA context, all at one bytes-per-value, plus per sequence
/// (hidden_size + intermediate_size) x num_hidden_layers x context_length x bytes. For "LLaMA-6B" in int8 with an
/// 8-bit AdamW it gives 6 + 6 + 12 + 1.3 = 25.3 GB and on an 80 GB A100 a batch of about 55. It ignores the LM
/// head's logits, attention, norms, master weights, LoRA, checkpointing and everything else the detailed method
/// counts.
/// </summary>
public static class SeedMethod
{
    /// <summary>Applies the article's formula.</summary>
    public static SeedEstimate Estimate(SeedInputs inputs)
    {
        ArgumentNullException.ThrowIfNull(inputs);
        if (inputs.Parameters <= 0 || inputs.BytesPerValue <= 0 || inputs.OptimizerBytesPerParameter < 0
            || inputs.HiddenSize <= 0 || inputs.IntermediateSize <= 0 || inputs.Layers <= 0 || inputs.ContextLength <= 0
            || inputs.CudaContextBytes < 0)
        {
            throw new PlanException("the seed method needs positive sizes");
        }
        long values = inputs.Parameters;
        return new SeedEstimate(
            inputs,
            (long)Math.Round(values * inputs.BytesPerValue),
            (long)Math.Round(values * inputs.BytesPerValue),
            (long)Math.Round(values * inputs.OptimizerBytesPerParameter),
            inputs.CudaContextBytes,
            (long)Math.Round((double)(inputs.HiddenSize + inputs.IntermediateSize) * inputs.Layers * inputs.ContextLength * inputs.BytesPerValue));
    }

    /// <summary>
    /// The seed inputs for a plan: one bytes-per-value from the base quantization (int8 1, NF4 0.5) or else the
    /// precision (fp32 4, 16-bit 2); optimizer bytes = values per parameter (AdamW 2, SGD 1) x that width, except
    /// the 8-bit AdamW's 2 x 1 B. <paramref name="parameters"/> overrides the model's count (the article's "6B").
    /// </summary>
    public static SeedInputs InputsFor(RunPlan plan, long? parameters = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        double width = plan.Quantization.Kind switch
        {
            QuantizationKind.Int8 => 1,
            QuantizationKind.Nf4 => 0.5,
            _ => plan.ComputeBytes,
        };
        double optimizer = plan.Optimizer switch
        {
            OptimizerKind.AdamW => 2 * width,
            OptimizerKind.AdamW8bit => 2,
            OptimizerKind.SgdMomentum => width,
            _ => 0,
        };
        var m = plan.Model;
        return new SeedInputs(parameters ?? m.ParameterCount, width, optimizer, m.HiddenSize, m.IntermediateSize,
            m.NumHiddenLayers, plan.SequenceLength, plan.Overhead.ContextBytes);
    }
}
