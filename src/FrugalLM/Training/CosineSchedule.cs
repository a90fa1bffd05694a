namespace FrugalLM.Training;

/// <summary>Linear warm-up to the peak learning rate, then cosine decay to a floor at the last step.</summary>
/// <param name="Peak">Learning rate after warm-up.</param>
/// <param name="Minimum">Learning rate at the last step.</param>
/// <param name="WarmupSteps">Steps of linear warm-up.</param>
/// <param name="TotalSteps">Steps in the run.</param>
public sealed record CosineSchedule(double Peak, double Minimum, int WarmupSteps, int TotalSteps)
{
    /// <summary>Learning rate of step <paramref name="step"/> (0-based).</summary>
    public double At(int step)
    {
        if (step < WarmupSteps)
        {
            return Peak * (step + 1) / WarmupSteps;
        }
        int decaySteps = Math.Max(1, TotalSteps - WarmupSteps - 1);
        double progress = Math.Min(1.0, (double)(step - WarmupSteps) / decaySteps);
        return Minimum + 0.5 * (Peak - Minimum) * (1 + Math.Cos(Math.PI * progress));
    }
}
