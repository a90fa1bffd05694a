namespace FrugalLM.Training;

/// <summary>Thrown when training data cannot be read.</summary>
public sealed class DataException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A tokenized text corpus packed into fixed-length blocks: documents are tokenized, joined with an EOS
/// token between them, and cut into blocks of <c>sequence + 1</c> tokens (inputs and next-token labels).
/// Every 50th block is held out for evaluation, so the held-out set samples the whole corpus.
/// </summary>
public sealed class TokenCorpus : ITrainingData
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

    /// <inheritdoc />
    public int Sequence { get; }

    /// <summary>Documents read.</summary>
    public int Documents { get; }

    /// <inheritdoc />
    public long TokenCount => tokens.Length;

    /// <inheritdoc />
    public int TrainSequences => trainBlocks.Length;

    /// <inheritdoc />
    public int EvalSequences => evalBlocks.Length;

    /// <inheritdoc />
    public string Describe() =>
        $"{Documents} documents, {TokenCount:N0} tokens packed into {TrainSequences} training and {EvalSequences} held-out sequences of {Sequence}";

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
        var files = TrainingData.Files(path);
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

    /// <inheritdoc />
    public IEnumerable<TrainingBatch> TrainBatches(int batch, int seed, int epoch)
    {
        var order = (int[])trainBlocks.Clone();
        new Random(TrainingData.EpochSeed(seed, epoch)).Shuffle(order);
        for (int i = 0; i + batch <= order.Length; i += batch)
        {
            yield return Gather(order.AsSpan(i, batch));
        }
    }

    /// <inheritdoc />
    public IEnumerable<TrainingBatch> AllBatches(int batch)
    {
        var all = Enumerable.Range(0, tokens.Length / (Sequence + 1)).ToArray();
        for (int i = 0; i < all.Length; i += batch)
        {
            yield return Gather(all.AsSpan(i, Math.Min(batch, all.Length - i)));
        }
    }

    /// <inheritdoc />
    public IEnumerable<TrainingBatch> EvalBatches(int batch)
    {
        for (int i = 0; i < evalBlocks.Length; i += batch)
        {
            yield return Gather(evalBlocks.AsSpan(i, Math.Min(batch, evalBlocks.Length - i)));
        }
    }

    // A block of sequence + 1 tokens gives the inputs (all but the last) and their labels (all but the first).
    private TrainingBatch Gather(ReadOnlySpan<int> blocks)
    {
        int width = Sequence + 1;
        var inputs = new long[blocks.Length * Sequence];
        var labels = new long[blocks.Length * Sequence];
        for (int r = 0; r < blocks.Length; r++)
        {
            for (int c = 0; c < Sequence; c++)
            {
                inputs[r * Sequence + c] = tokens[blocks[r] * width + c];
                labels[r * Sequence + c] = tokens[blocks[r] * width + c + 1];
            }
        }
        return new TrainingBatch(inputs, labels, blocks.Length, Sequence);
    }

    private static IEnumerable<string> ReadDocuments(string file)
    {
        if (!file.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase))
        {
            yield return File.ReadAllText(file);
            yield break;
        }
        foreach (var (line, record) in TrainingData.JsonLines(file))
        {
            yield return TrainingData.Field(record, "text", file, line);
        }
    }
}
