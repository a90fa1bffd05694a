using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace FrugalLM.Tokenization;

/// <summary>
/// <c>vocab.json</c> + <c>merges.txt</c> (GPT-2 style byte-level BPE) through Microsoft.ML.Tokenizers'
/// <see cref="BpeTokenizer"/> in byte-level mode.
/// </summary>
/// <remarks>
/// CodeGenTokenizer.Create, the library's ready-made GPT-2-like tokenizer, also matches CodeGen's
/// whitespace-run tokens (ids 50257 onwards), so "  " would become an id GPT-2 does not have; a
/// BpeTokenizer given GPT-2's pre-tokenizer regex and only the folder's own added tokens reproduces GPT-2.
/// </remarks>
internal sealed partial class ByteLevelBpeBackend : ITokenizerBackend
{
    private readonly BpeTokenizer _tokenizer;
    private readonly IReadOnlyDictionary<string, int> _addedTokens;
    private readonly HashSet<int> _specialIds;

    private ByteLevelBpeBackend(BpeTokenizer tokenizer, IReadOnlyDictionary<string, int> addedTokens, HashSet<int> specialIds)
    {
        _tokenizer = tokenizer;
        _addedTokens = addedTokens;
        _specialIds = specialIds;
        int max = tokenizer.Vocabulary.Count == 0 ? -1 : tokenizer.Vocabulary.Values.Max();
        VocabSize = Math.Max(max, addedTokens.Count == 0 ? -1 : addedTokens.Values.Max()) + 1;
    }

    public int VocabSize { get; }

    /// <summary>GPT-2 was trained without BOS; transformers' GPT2Tokenizer defaults add_bos_token to false.</summary>
    public bool AddsBosByDefault => false;

    public int? ModelBosId => null;

    public int? ModelEosId => null;

    public IReadOnlySet<int> SpecialTokenIds => _specialIds;

    /// <param name="vocabPath">vocab.json.</param>
    /// <param name="mergesPath">merges.txt.</param>
    /// <param name="declared">Tokens the folder's config declares; they are matched whole in the input before BPE.</param>
    public static ByteLevelBpeBackend Load(string vocabPath, string mergesPath, IReadOnlyList<DeclaredToken> declared)
    {
        try
        {
            var options = new BpeOptions(vocabPath, mergesPath) { ByteLevel = true };
            var vocabulary = options.Vocabulary as IReadOnlyDictionary<string, int> ?? options.Vocabulary.ToDictionary();
            var (added, specialIds) = DeclaredToken.Resolve(declared, t => vocabulary.TryGetValue(t, out int id) ? id : null);
            var special = added.Count == 0 ? null : added;
            options.PreTokenizer = new RegexPreTokenizer(Gpt2Split(), special);
            options.SpecialTokens = special;
            return new ByteLevelBpeBackend(BpeTokenizer.Create(options), added, specialIds);
        }
        // Damaged files can fail anywhere inside the library, with any exception type.
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new TokenizerException($"{vocabPath} + {Path.GetFileName(mergesPath)}: cannot read a byte-level BPE vocabulary and merge list: {e.Message}", e);
        }
    }

    public int? TokenToId(string token) =>
        _addedTokens.TryGetValue(token, out int added) ? added
        : _tokenizer.Vocabulary.TryGetValue(token, out int id) ? id
        : null;

    public IReadOnlyList<int> Encode(string text) => _tokenizer.EncodeToIds(text);

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens) => _tokenizer.Decode(ids, considerSpecialTokens: !skipSpecialTokens);

    /// <summary>GPT-2's pre-tokenizer split (Hugging Face ByteLevel with use_regex, tiktoken's gpt2/p50k pattern).</summary>
    [GeneratedRegex(@"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", RegexOptions.None)]
    private static partial Regex Gpt2Split();
}
