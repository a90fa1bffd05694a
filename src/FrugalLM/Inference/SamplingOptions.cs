namespace FrugalLM.Inference;

/// <summary>How the next token is chosen, and when generation stops.</summary>
public sealed record SamplingOptions
{
    /// <summary>Tokens to generate at most.</summary>
    public int MaxNewTokens { get; init; } = 64;

    /// <summary>Softmax temperature; 0 means greedy (argmax).</summary>
    public double Temperature { get; init; } = 1.0;

    /// <summary>Keep only the k most likely tokens; 0 keeps all.</summary>
    public int TopK { get; init; }

    /// <summary>Nucleus sampling: keep the smallest set of tokens whose probability reaches p; 1 keeps all.</summary>
    public double TopP { get; init; } = 1.0;

    /// <summary>Seed of the sampling generator: the same seed gives the same tokens.</summary>
    public long Seed { get; init; }

    /// <summary>Token ids that end generation (EOS); they are not emitted.</summary>
    public IReadOnlyList<int> StopTokenIds { get; init; } = [];

    /// <summary>True when sampling reduces to argmax.</summary>
    public bool IsGreedy => Temperature <= 0 || TopK == 1;

    /// <summary>Checks the values; throws <see cref="ArgumentException"/> naming the bad one.</summary>
    public void Validate()
    {
        if (MaxNewTokens < 0)
        {
            throw new ArgumentException($"max new tokens must be >= 0 (got {MaxNewTokens})");
        }
        if (Temperature < 0 || double.IsNaN(Temperature))
        {
            throw new ArgumentException($"temperature must be >= 0 (got {Temperature})");
        }
        if (TopK < 0)
        {
            throw new ArgumentException($"top-k must be >= 0 (got {TopK})");
        }
        if (!(TopP > 0 && TopP <= 1))
        {
            throw new ArgumentException($"top-p must be in (0, 1] (got {TopP})");
        }
    }
}
