using System.Text.Json.Nodes;

namespace FrugalLM.Tokenization;

/// <summary>
/// The tokenizer of a Hugging Face model folder, with its BOS/EOS/PAD tokens taken from the folder's
/// configuration.
/// </summary>
/// <remarks>
/// Sources, in order of preference: <c>tokenizer.json</c> (Hugging Face's Rust tokenizers through
/// Tokenizers.DotNet), <c>tokenizer.model</c> (SentencePiece through Microsoft.ML.Tokenizers),
/// <c>vocab.json</c> + <c>merges.txt</c> (GPT-2 byte-level BPE through Microsoft.ML.Tokenizers).
/// Special tokens: <c>tokenizer_config.json</c>, then <c>special_tokens_map.json</c>, then the ids in
/// <c>generation_config.json</c> and <c>config.json</c>, then (BOS/EOS) the tokenizer file's own (the
/// SentencePiece model's bos_id/eos_id, the token a tokenizer.json post-processor puts first).
/// </remarks>
public sealed class HfTokenizer
{
    private const string TokenizerJsonFile = "tokenizer.json";
    private const string SentencePieceFile = "tokenizer.model";
    private const string VocabFile = "vocab.json";
    private const string MergesFile = "merges.txt";

    private readonly ITokenizerBackend _backend;
    private readonly HashSet<int> _skippedIds;

    private HfTokenizer(ITokenizerBackend backend, string source, int? bos, IReadOnlyList<int> eos, int? pad, bool addBos)
    {
        _backend = backend;
        Source = source;
        BosTokenId = bos;
        EosTokenIds = eos;
        PadTokenId = pad;
        AddBosToken = addBos;
        _skippedIds = [.. backend.SpecialTokenIds, .. eos];
        if (bos is int b)
        {
            _skippedIds.Add(b);
        }
        if (pad is int p)
        {
            _skippedIds.Add(p);
        }
    }

    /// <summary>The beginning-of-sequence token, if the folder names one.</summary>
    public int? BosTokenId { get; }

    /// <summary>
    /// The end-of-sequence tokens: first the tokenizer's own EOS (the one to append to a document), then
    /// any further stop ids from <c>generation_config.json</c> and <c>config.json</c>, without repeats.
    /// Empty if the folder names none.
    /// </summary>
    public IReadOnlyList<int> EosTokenIds { get; }

    /// <summary>The padding token, if the folder names one.</summary>
    public int? PadTokenId { get; }

    /// <summary>The highest token id this tokenizer can produce or decode, plus one.</summary>
    public int VocabSize => _backend.VocabSize;

    /// <summary>
    /// Whether <see cref="Encode"/> starts a sequence with BOS: <c>add_bos_token</c> from
    /// <c>tokenizer_config.json</c>; when absent, whether the <c>tokenizer.json</c> post-processor puts a
    /// special token first, true for a SentencePiece model (as transformers' LlamaTokenizer), false for
    /// GPT-2-style vocab.json + merges.txt.
    /// </summary>
    public bool AddBosToken { get; }

    /// <summary>The full path of the file the vocabulary came from.</summary>
    public string Source { get; }

    /// <summary>Loads the tokenizer of the Hugging Face folder <paramref name="modelDir"/>.</summary>
    /// <exception cref="TokenizerException">
    /// The folder does not exist, has no tokenizer file, or a file is unreadable or names a token the
    /// vocabulary lacks; the message names the folder or file and what was expected.
    /// </exception>
    public static HfTokenizer Load(string modelDir)
    {
        ArgumentException.ThrowIfNullOrEmpty(modelDir);
        var dir = Path.GetFullPath(modelDir);
        if (!Directory.Exists(dir))
        {
            throw new TokenizerException($"Tokenizer folder '{dir}' does not exist.");
        }
        var config = FolderConfig.Read(dir);

        ITokenizerBackend backend;
        string source;
        if (File.Exists(source = Path.Combine(dir, TokenizerJsonFile)))
        {
            backend = HfJsonBackend.Load(source);
        }
        else if (File.Exists(source = Path.Combine(dir, SentencePieceFile)))
        {
            backend = SentencePieceBackend.Load(source, config.DeclaredTokens());
        }
        else if (File.Exists(source = Path.Combine(dir, VocabFile)))
        {
            var merges = Path.Combine(dir, MergesFile);
            if (!File.Exists(merges))
            {
                throw new TokenizerException($"Tokenizer folder '{dir}' has {VocabFile} but no {MergesFile}; a byte-level BPE tokenizer needs both.");
            }
            backend = ByteLevelBpeBackend.Load(source, merges, config.DeclaredTokens());
        }
        else
        {
            throw new TokenizerException(
                $"Tokenizer folder '{dir}' has no tokenizer: expected {TokenizerJsonFile}, {SentencePieceFile} (SentencePiece), or {VocabFile} with {MergesFile}.");
        }

        var resolver = new SpecialTokenResolver(config, backend);
        int? bos = resolver.Single("bos_token", "bos_token_id") ?? backend.ModelBosId;
        var eos = resolver.EndOfSequence();
        if (eos.Count == 0 && backend.ModelEosId is int modelEos)
        {
            eos.Add(modelEos);
        }
        int? pad = resolver.Single("pad_token", "pad_token_id");
        bool addBos = resolver.AddBosToken() ?? backend.AddsBosByDefault;
        if (addBos && bos is null)
        {
            throw new TokenizerException($"Tokenizer folder '{dir}' asks for a BOS token (add_bos_token) but names none (bos_token / bos_token_id).");
        }
        return new HfTokenizer(backend, source, bos, eos, pad, addBos);
    }

    /// <summary>
    /// Token ids of <paramref name="text"/>. Special-token text in the input (for example
    /// <c>&lt;|endoftext|&gt;</c>) becomes that token, as in transformers.
    /// </summary>
    /// <param name="text">The text.</param>
    /// <param name="addBos">
    /// Start with BOS when the tokenizer does (<see cref="AddBosToken"/>), as transformers'
    /// <c>add_special_tokens=True</c>; false never adds it (for text that continues a sequence).
    /// </param>
    public IReadOnlyList<int> Encode(string text, bool addBos = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = _backend.Encode(text);
        if (!addBos || !AddBosToken)
        {
            return ids;
        }
        var withBos = new int[ids.Count + 1];
        withBos[0] = BosTokenId!.Value;
        for (int i = 0; i < ids.Count; i++)
        {
            withBos[i + 1] = ids[i];
        }
        return withBos;
    }

    /// <summary>Text of <paramref name="ids"/>. Incomplete UTF-8 byte sequences decode to U+FFFD.</summary>
    /// <param name="ids">Token ids, each in [0, <see cref="VocabSize"/>).</param>
    /// <param name="skipSpecialTokens">Leave out BOS, EOS, PAD and the other special tokens.</param>
    /// <exception cref="ArgumentOutOfRangeException">An id is outside the vocabulary.</exception>
    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(ids);
        List<int>? kept = skipSpecialTokens ? new List<int>(ids.Count) : null;
        foreach (int id in ids)
        {
            if ((uint)id >= (uint)VocabSize)
            {
                throw new ArgumentOutOfRangeException(nameof(ids), id, $"Token id {id} is outside the vocabulary of {Source} (size {VocabSize}).");
            }
            if (kept is not null && !_skippedIds.Contains(id))
            {
                kept.Add(id);
            }
        }
        return _backend.Decode(kept ?? ids, skipSpecialTokens);
    }

    /// <summary>Resolves BOS/EOS/PAD from the folder's files in their order of preference.</summary>
    private sealed class SpecialTokenResolver(FolderConfig config, ITokenizerBackend backend)
    {
        /// <summary>A token named in the tokenizer files, else an id in generation_config.json / config.json.</summary>
        public int? Single(string tokenKey, string idKey)
        {
            if (FromTokenizerFiles(tokenKey) is int id)
            {
                return id;
            }
            foreach (var (json, file) in IdFiles())
            {
                if (Ids(json, file, idKey).FirstOrDefault(-1) is int fromIds and >= 0)
                {
                    return fromIds;
                }
            }
            return null;
        }

        public List<int> EndOfSequence()
        {
            var eos = new List<int>();
            if (FromTokenizerFiles("eos_token") is int primary)
            {
                eos.Add(primary);
            }
            foreach (var (json, file) in IdFiles())
            {
                foreach (int id in Ids(json, file, "eos_token_id"))
                {
                    if (!eos.Contains(id))
                    {
                        eos.Add(id);
                    }
                }
            }
            return eos;
        }

        public bool? AddBosToken()
        {
            if (config.TokenizerConfig?["add_bos_token"] is not JsonNode node)
            {
                return null;
            }
            return node is JsonValue v && v.TryGetValue(out bool flag)
                ? flag
                : throw config.Malformed(FolderConfig.TokenizerConfigFile, "add_bos_token", "true or false");
        }

        private int? FromTokenizerFiles(string key)
        {
            foreach (var (json, file) in new[] { (config.TokenizerConfig, FolderConfig.TokenizerConfigFile), (config.SpecialTokensMap, FolderConfig.SpecialTokensMapFile) })
            {
                if (json is not null && config.TokenText(json, key, file) is string text)
                {
                    return backend.TokenToId(text) ?? throw new TokenizerException(
                        $"{Path.Combine(config.Dir, file)}: {key} '{text}' is not in the tokenizer's vocabulary.");
                }
            }
            return null;
        }

        private IEnumerable<(JsonObject Json, string File)> IdFiles()
        {
            if (config.GenerationConfig is not null)
            {
                yield return (config.GenerationConfig, FolderConfig.GenerationConfigFile);
            }
            if (config.ModelConfig is not null)
            {
                yield return (config.ModelConfig, FolderConfig.ModelConfigFile);
            }
        }

        /// <summary>An id field that may be absent, null, an integer or a list of integers; negative ids mean none.</summary>
        private List<int> Ids(JsonObject json, string file, string key)
        {
            var ids = new List<int>();
            switch (json[key])
            {
                case null:
                    break;
                case JsonValue v when v.TryGetValue(out int id):
                    ids.Add(id);
                    break;
                case JsonArray list:
                    foreach (var item in list)
                    {
                        ids.Add(item is JsonValue e && e.TryGetValue(out int element)
                            ? element
                            : throw config.Malformed(file, key, "an integer or a list of integers"));
                    }
                    break;
                default:
                    throw config.Malformed(file, key, "an integer or a list of integers");
            }
            ids.RemoveAll(id => id < 0);
            foreach (int id in ids)
            {
                if (id >= backend.VocabSize)
                {
                    throw new TokenizerException(
                        $"{Path.Combine(config.Dir, file)}: {key} {id} is outside the tokenizer's vocabulary (size {backend.VocabSize}).");
                }
            }
            return ids;
        }
    }
}
