namespace FrugalLM.Training;

/// <summary>
/// Prompt/completion pairs (JSONL records with <c>prompt</c> and <c>completion</c>): each example is
/// prompt + completion + EOS, cut to the sequence length and right-padded; only completion and EOS tokens
/// take a loss. Right padding needs no attention mask: under causal attention no real token sees a pad.
/// Every 20th example is held out.
/// </summary>
public sealed class PromptCompletionData : ITrainingData
{
    /// <summary>One example in this many is held out.</summary>
    public const int HoldOutEvery = 20;

    private readonly (long[] Inputs, long[] Labels)[] train;
    private readonly (long[] Inputs, long[] Labels)[] eval;
    private readonly (long[] Inputs, long[] Labels)[] allExamples;

    private PromptCompletionData(List<(long[], long[])> examples, List<(string, string)> texts, int sequence, long tokens, int truncated)
    {
        Sequence = sequence;
        TokenCount = tokens;
        Truncated = truncated;
        train = examples.Where((_, i) => i % HoldOutEvery != HoldOutEvery - 1).ToArray();
        eval = examples.Where((_, i) => i % HoldOutEvery == HoldOutEvery - 1).ToArray();
        allExamples = examples.ToArray();
        HeldOutTexts = texts.Where((_, i) => i % HoldOutEvery == HoldOutEvery - 1).ToArray();
        AllTexts = texts;
        if (train.Length == 0)
        {
            throw new DataException("no training examples");
        }
        if (eval.Length == 0)
        {
            eval = [train[^1]];
        }
    }

    /// <inheritdoc />
    public int Sequence { get; }

    /// <inheritdoc />
    public int TrainSequences => train.Length;

    /// <inheritdoc />
    public int EvalSequences => eval.Length;

    /// <inheritdoc />
    public long TokenCount { get; }

    /// <summary>Examples longer than the sequence that were cut.</summary>
    public int Truncated { get; }

    /// <summary>The held-out examples as text, for accuracy by generation.</summary>
    public IReadOnlyList<(string Prompt, string Completion)> HeldOutTexts { get; }

    /// <summary>Every example as text.</summary>
    public IReadOnlyList<(string Prompt, string Completion)> AllTexts { get; }

    /// <summary>Reads prompt/completion JSONL files.</summary>
    public static PromptCompletionData Load(string path, Func<string, IReadOnlyList<int>> encode, int eosTokenId, int padTokenId, int sequence, IProgress<double>? progress = null)
    {
        if (sequence < 2)
        {
            throw new DataException($"sequence length must be at least 2 (got {sequence})");
        }
        var files = TrainingData.Files(path);
        var examples = new List<(long[], long[])>();
        var texts = new List<(string, string)>();
        long tokens = 0;
        int truncated = 0;
        for (int f = 0; f < files.Length; f++)
        {
            foreach (var (line, record) in TrainingData.JsonLines(files[f]))
            {
                var promptText = TrainingData.Field(record, "prompt", files[f], line);
                var completionText = TrainingData.Field(record, "completion", files[f], line);
                var prompt = encode(promptText);
                var completion = encode(completionText);
                var ids = prompt.Concat(completion).Append(eosTokenId).Select(t => (long)t).ToList();
                tokens += ids.Count;
                // Position i predicts token i + 1; it takes a loss when that token belongs to the completion.
                var inputs = new long[sequence];
                var labels = new long[sequence];
                Array.Fill(inputs, padTokenId);
                Array.Fill(labels, TrainingBatch.IgnoreLabel);
                int used = Math.Min(ids.Count - 1, sequence);
                if (ids.Count - 1 > sequence)
                {
                    truncated++;
                }
                for (int i = 0; i < used; i++)
                {
                    inputs[i] = ids[i];
                    labels[i] = i + 1 >= prompt.Count ? ids[i + 1] : TrainingBatch.IgnoreLabel;
                }
                if (labels.Any(l => l != TrainingBatch.IgnoreLabel))
                {
                    examples.Add((inputs, labels));
                    texts.Add((promptText, completionText));
                }
            }
            progress?.Report((f + 1.0) / files.Length);
        }
        return new PromptCompletionData(examples, texts, sequence, tokens, truncated);
    }

    /// <inheritdoc />
    public string Describe() =>
        $"{train.Length + eval.Length:N0} prompt/completion examples ({TokenCount:N0} tokens, {Truncated} cut to {Sequence}), {train.Length} training and {eval.Length} held-out";

    /// <inheritdoc />
    public IEnumerable<TrainingBatch> TrainBatches(int batch, int seed, int epoch)
    {
        var order = Enumerable.Range(0, train.Length).ToArray();
        new Random(TrainingData.EpochSeed(seed, epoch)).Shuffle(order);
        for (int i = 0; i + batch <= order.Length; i += batch)
        {
            yield return Gather(train, order.AsSpan(i, batch));
        }
    }

    /// <inheritdoc />
    public IEnumerable<TrainingBatch> AllBatches(int batch)
    {
        var all = allExamples;
        var order = Enumerable.Range(0, all.Length).ToArray();
        for (int i = 0; i < all.Length; i += batch)
        {
            yield return Gather(all, order.AsSpan(i, Math.Min(batch, all.Length - i)));
        }
    }

    /// <inheritdoc />
    public IEnumerable<TrainingBatch> EvalBatches(int batch)
    {
        var order = Enumerable.Range(0, eval.Length).ToArray();
        for (int i = 0; i < eval.Length; i += batch)
        {
            yield return Gather(eval, order.AsSpan(i, Math.Min(batch, eval.Length - i)));
        }
    }

    private TrainingBatch Gather((long[] Inputs, long[] Labels)[] source, ReadOnlySpan<int> picks)
    {
        var inputs = new long[picks.Length * Sequence];
        var labels = new long[picks.Length * Sequence];
        for (int r = 0; r < picks.Length; r++)
        {
            source[picks[r]].Inputs.CopyTo(inputs, r * Sequence);
            source[picks[r]].Labels.CopyTo(labels, r * Sequence);
        }
        return new TrainingBatch(inputs, labels, picks.Length, Sequence);
    }
}
