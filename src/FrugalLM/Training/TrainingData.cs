using System.Text.Json;

namespace FrugalLM.Training;

/// <summary>
/// A micro-batch: token ids and their next-token labels, both [rows, columns] row-major; a label of
/// <see cref="IgnoreLabel"/> takes no loss (prompt tokens, padding).
/// </summary>
/// <param name="Inputs">Token ids.</param>
/// <param name="Labels">The token each position should predict, or <see cref="IgnoreLabel"/>.</param>
/// <param name="Rows">Sequences.</param>
/// <param name="Columns">Tokens per sequence.</param>
public sealed record TrainingBatch(long[] Inputs, long[] Labels, int Rows, int Columns)
{
    /// <summary>The label that takes no loss (PyTorch's cross-entropy default ignore_index).</summary>
    public const long IgnoreLabel = -100;

    /// <summary>Positions that take a loss.</summary>
    public long LabelCount => Labels.LongCount(l => l != IgnoreLabel);
}

/// <summary>Training data cut into batches: packed text (<see cref="TokenCorpus"/>) or prompt/completion pairs.</summary>
public interface ITrainingData
{
    /// <summary>Tokens per sequence.</summary>
    int Sequence { get; }

    /// <summary>Training sequences per epoch.</summary>
    int TrainSequences { get; }

    /// <summary>Held-out sequences.</summary>
    int EvalSequences { get; }

    /// <summary>Tokens read.</summary>
    long TokenCount { get; }

    /// <summary>A one-line description for logs.</summary>
    string Describe();

    /// <summary>Training batches of one epoch, in an order fixed by <paramref name="seed"/> and <paramref name="epoch"/>.</summary>
    IEnumerable<TrainingBatch> TrainBatches(int batch, int seed, int epoch);

    /// <summary>Held-out batches, all of them, in order (the last may be smaller).</summary>
    IEnumerable<TrainingBatch> EvalBatches(int batch);

    /// <summary>Every sequence, training and held-out, in file order (for evaluating a whole test file).</summary>
    IEnumerable<TrainingBatch> AllBatches(int batch);
}

/// <summary>Reads training data, choosing the form from the files.</summary>
public static class TrainingData
{
    /// <summary>
    /// Loads <paramref name="path"/> (a file or a folder): JSONL whose records have <c>prompt</c> and
    /// <c>completion</c> becomes <see cref="PromptCompletionData"/> (loss on completions only, right-padded);
    /// anything else (plain text, JSONL with <c>text</c>) is packed by <see cref="TokenCorpus"/>.
    /// </summary>
    public static ITrainingData Load(string path, Func<string, IReadOnlyList<int>> encode, int eosTokenId, int padTokenId, int sequence, IProgress<double>? progress = null) =>
        IsPromptCompletion(path)
            ? PromptCompletionData.Load(path, encode, eosTokenId, padTokenId, sequence, progress)
            : TokenCorpus.Load(path, encode, eosTokenId, sequence, progress);

    /// <summary>
    /// The seed of one epoch's shuffle. Deterministic across processes (HashCode.Combine is randomized per
    /// process, so a resumed run would see another order).
    /// </summary>
    public static int EpochSeed(int seed, int epoch) => unchecked((seed * 1_000_003) ^ (epoch * 7919) ^ 0x5bd1e995);

    /// <summary>The files of a path: the file itself, or a folder's files (hidden ones skipped) in name order.</summary>
    public static string[] Files(string path)
    {
        string[] files = Directory.Exists(path)
            ? Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories).Where(f => !Path.GetFileName(f).StartsWith('.')).Order(StringComparer.Ordinal).ToArray()
            : File.Exists(path) ? [path] : throw new DataException($"{path}: no such file or folder");
        return files.Length > 0 ? files : throw new DataException($"{path}: the folder has no files");
    }

    /// <summary>The JSON objects of a JSONL file, with their line numbers; malformed lines are errors naming the line.</summary>
    public static IEnumerable<(int Line, JsonElement Record)> JsonLines(string file)
    {
        int lineNumber = 0;
        foreach (var line in File.ReadLines(file))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }
            JsonElement record;
            try
            {
                using var json = JsonDocument.Parse(line);
                record = json.RootElement.Clone();
            }
            catch (JsonException e)
            {
                throw new DataException($"{file}:{lineNumber}: not valid JSON ({e.Message})", e);
            }
            if (record.ValueKind != JsonValueKind.Object)
            {
                throw new DataException($"{file}:{lineNumber}: expected a JSON object");
            }
            yield return (lineNumber, record);
        }
    }

    /// <summary>A string field of a JSONL record, or an error naming the file and line.</summary>
    public static string Field(JsonElement record, string name, string file, int line) =>
        record.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.String
            ? value.GetString()!
            : throw new DataException($"{file}:{line}: expected a string \"{name}\" field");

    private static bool IsPromptCompletion(string path)
    {
        var first = Files(path).FirstOrDefault(f => f.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase));
        if (first is null)
        {
            return false;
        }
        foreach (var (_, record) in JsonLines(first))
        {
            return record.TryGetProperty("prompt", out _) && record.TryGetProperty("completion", out _);
        }
        return false;
    }
}
