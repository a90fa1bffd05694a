using System.Text.Json;

namespace FrugalLM.Training;

/// <summary>Thrown when training data cannot be read.</summary>
public sealed class DataException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A tokenized text corpus packed into fixed-length blocks: documents are tokenized, joined with an EOS
/// token between them, and cut into blocks of <c>sequence + 1</c> tokens (inputs and next-token labels).
/// Every 50th block is held out for evaluation, so the held-out set samples the whole corpus.
/// </summary>
public sealed class TokenCorpus
{
    /// <summary>One block in this many is held out.</summary>
    public const int HoldOutEvery = 50;

    private readonly int[] tokens;
    private readonly int[] trainBlocks;
    private readonly int[] evalBlocks;

    private TokenCorpus(int[] tokens, int sequence, int documents)
    {
        this.tokens = tokens;
        Sequence = sequence;
        Documents = documents;
        int blocks = tokens.Length / (sequence + 1);
        trainBlocks = Enumerable.Range(0, blocks).Where(b => b % HoldOutEvery != HoldOutEvery - 1).ToArray();
        evalBlocks = Enumerable.Range(0, blocks).Where(b => b % HoldOutEvery == HoldOutEvery - 1).ToArray();
        if (trainBlocks.Length == 0)
        {
            throw new DataException($"the corpus has {tokens.Length} tokens: too few for one block of {sequence + 1}");
        }
        if (evalBlocks.Length == 0)
        {
            // A tiny corpus still gets a held-out estimate, from its last block.
            evalBlocks = [trainBlocks[^1]];
        }
    }

    /// <summary>Tokens per training sequence.</summary>
    public int Sequence { get; }

    /// <summary>Documents read.</summary>
    public int Documents { get; }

    /// <summary>Tokens in the corpus.</summary>
    public long TokenCount => tokens.Length;

    /// <summary>Training blocks.</summary>
    public int TrainBlocks => trainBlocks.Length;

    /// <summary>Held-out blocks.</summary>
    public int EvalBlocks => evalBlocks.Length;

    /// <summary>
    /// Reads a corpus: a file or a folder of files. <c>.jsonl</c> files hold one JSON object per line with a
    /// <c>text</c> field (one document each); any other file is plain UTF-8 text (one document).
    /// </summary>
    /// <param name="path">File or folder.</param>
    /// <param name="encode">The tokenizer (no BOS).</param>
    /// <param name="eosTokenId">Separator between documents.</param>
    /// <param name="sequence">Tokens per training sequence.</param>
    /// <param name="progress">Receives the fraction of bytes read.</param>
    public static TokenCorpus Load(string path, Func<string, IReadOnlyList<int>> encode, int eosTokenId, int sequence, IProgress<double>? progress = null)
    {
        if (sequence < 1)
        {
            throw new DataException($"sequence length must be positive (got {sequence})");
        }
        string[] files = Directory.Exists(path)
            ? Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories).Where(f => !Path.GetFileName(f).StartsWith('.')).Order(StringComparer.Ordinal).ToArray()
            : File.Exists(path) ? [path] : throw new DataException($"{path}: no such file or folder");
        if (files.Length == 0)
        {
            throw new DataException($"{path}: the folder has no files");
        }
        long totalBytes = files.Sum(f => new FileInfo(f).Length), doneBytes = 0;
        var tokens = new List<int>();
        int documents = 0;
        foreach (var file in files)
        {
            foreach (var document in ReadDocuments(file))
            {
                // Lines are encoded one at a time (newline kept) so progress can be shown on large files;
                // byte-level BPE splits at newlines anyway, so the tokens are those of the whole text.
                foreach (var line in document.Split('\n').Select((l, i) => (l, i)))
                {
                    string piece = line.i == 0 ? line.l : "\n" + line.l;
                    if (piece.Length > 0)
                    {
                        tokens.AddRange(encode(piece));
                    }
                }
                tokens.Add(eosTokenId);
                documents++;
                doneBytes += document.Length;
                progress?.Report(Math.Min(1.0, (double)doneBytes / Math.Max(1, totalBytes)));
            }
        }
        return new TokenCorpus(tokens.ToArray(), sequence, documents);
    }

    /// <summary>A corpus made of given tokens (tests, synthetic data).</summary>
    public static TokenCorpus FromTokens(int[] tokens, int sequence) => new(tokens, sequence, 1);

    /// <summary>Training batches for one epoch, in an order fixed by <paramref name="seed"/> and <paramref name="epoch"/>.</summary>
    public IEnumerable<long[]> TrainBatches(int batch, int seed, int epoch)
    {
        var order = (int[])trainBlocks.Clone();
        new Random(HashCode.Combine(seed, epoch)).Shuffle(order);
        for (int i = 0; i + batch <= order.Length; i += batch)
        {
            yield return Gather(order.AsSpan(i, batch));
        }
    }

    /// <summary>Held-out batches (all of them, in order; the last may be smaller).</summary>
    public IEnumerable<long[]> EvalBatches(int batch)
    {
        for (int i = 0; i < evalBlocks.Length; i += batch)
        {
            yield return Gather(evalBlocks.AsSpan(i, Math.Min(batch, evalBlocks.Length - i)));
        }
    }

    // Rows of sequence + 1 tokens, flattened row-major.
    private long[] Gather(ReadOnlySpan<int> blocks)
    {
        int width = Sequence + 1;
        var result = new long[blocks.Length * width];
        for (int r = 0; r < blocks.Length; r++)
        {
            for (int c = 0; c < width; c++)
            {
                result[r * width + c] = tokens[blocks[r] * width + c];
            }
        }
        return result;
    }

    private static IEnumerable<string> ReadDocuments(string file)
    {
        if (!file.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase))
        {
            yield return File.ReadAllText(file);
            yield break;
        }
        int lineNumber = 0;
        foreach (var line in File.ReadLines(file))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line))
            {
                continue;
            }
            string? text;
            try
            {
                using var json = JsonDocument.Parse(line);
                text = json.RootElement.ValueKind == JsonValueKind.Object && json.RootElement.TryGetProperty("text", out var t) && t.ValueKind == JsonValueKind.String
                    ? t.GetString()
                    : null;
            }
            catch (JsonException e)
            {
                throw new DataException($"{file}:{lineNumber}: not valid JSON ({e.Message})", e);
            }
            yield return text ?? throw new DataException($"{file}:{lineNumber}: expected an object with a string \"text\" field");
        }
    }
}
