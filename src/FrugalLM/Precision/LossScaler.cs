namespace FrugalLM.Precision;

/// <summary>
/// Dynamic loss scaling for fp16 training with PyTorch GradScaler's semantics and defaults: the loss is
/// multiplied by the scale before backward so small gradients survive fp16; a step whose gradients hold an
/// inf or NaN is skipped and the scale halved; after <see cref="GrowthInterval"/> clean steps in a row the
/// scale doubles.
/// </summary>
public sealed class LossScaler
{
    /// <summary>Creates a scaler (defaults: 2^16, x2 after 2000 clean steps, x0.5 on overflow).</summary>
    public LossScaler(double initialScale = 65536.0, double growthFactor = 2.0, double backoffFactor = 0.5, int growthInterval = 2000)
    {
        if (initialScale <= 0 || growthFactor <= 1 || backoffFactor <= 0 || backoffFactor >= 1 || growthInterval < 1)
        {
            throw new ArgumentException("loss scaler: initial scale > 0, growth factor > 1, 0 < backoff < 1, growth interval >= 1");
        }
        Scale = initialScale;
        GrowthFactor = growthFactor;
        BackoffFactor = backoffFactor;
        GrowthInterval = growthInterval;
    }

    /// <summary>The current scale.</summary>
    public double Scale { get; private set; }

    /// <summary>Multiplier after <see cref="GrowthInterval"/> clean steps.</summary>
    public double GrowthFactor { get; }

    /// <summary>Multiplier after an overflow.</summary>
    public double BackoffFactor { get; }

    /// <summary>Clean steps before the scale grows.</summary>
    public int GrowthInterval { get; }

    /// <summary>Clean steps since the last change of scale (GradScaler's growth tracker).</summary>
    public int CleanSteps { get; private set; }

    /// <summary>Steps skipped because of overflow.</summary>
    public long SkippedSteps { get; private set; }

    /// <summary>Records the outcome of a step: halve on overflow (the step was skipped), grow after enough clean steps.</summary>
    public void Update(bool foundInfOrNaN)
    {
        if (foundInfOrNaN)
        {
            Scale *= BackoffFactor;
            CleanSteps = 0;
            SkippedSteps++;
            return;
        }
        if (++CleanSteps == GrowthInterval)
        {
            Scale *= GrowthFactor;
            CleanSteps = 0;
        }
    }

    /// <summary>Restores a checkpointed state.</summary>
    public void Restore(double scale, int cleanSteps, long skippedSteps)
    {
        Scale = scale;
        CleanSteps = cleanSteps;
        SkippedSteps = skippedSteps;
    }
}
