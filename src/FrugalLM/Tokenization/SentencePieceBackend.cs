using Microsoft.ML.Tokenizers;

namespace FrugalLM.Tokenization;

/// <summary>
/// <c>tokenizer.model</c> (SentencePiece, as LLaMA-1/2 and Mistral ship it) through Microsoft.ML.Tokenizers.
/// </summary>
/// <remarks>
/// <see cref="SentencePieceTokenizer.Create(Stream, bool, bool, IReadOnlyDictionary{string, int}?)"/> reads
/// BPE and Unigram models with any normalizer the model carries (identity, nmt_nfkc); LlamaTokenizer is
/// the same class restricted to BPE with identity normalisation, so the general one serves both.
/// </remarks>
internal sealed class SentencePieceBackend : ITokenizerBackend
{
    private const char WordBoundary = '\u2581';

    private readonly SentencePieceTokenizer _tokenizer;
    private readonly IReadOnlyDictionary<string, int> _addedTokens;
    private readonly HashSet<int> _specialIds;
    private readonly HashSet<int> _byteIds = [];
    private readonly HashSet<int> _ordinaryIds = [];
    private readonly Dictionary<int, string> _pieces = [];

    private SentencePieceBackend(SentencePieceTokenizer tokenizer, IReadOnlyDictionary<string, int> addedTokens, HashSet<int> specialIds)
    {
        _tokenizer = tokenizer;
        _addedTokens = addedTokens;
        _specialIds = specialIds;
        foreach (var (piece, id) in tokenizer.Vocabulary)
        {
            _pieces[id] = piece;
            if (piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece.EndsWith('>'))
            {
                _byteIds.Add(id);
            }
            else if (id != tokenizer.UnknownId && !addedTokens.ContainsKey(piece)
                && piece != tokenizer.BeginningOfSentenceToken && piece != tokenizer.EndOfSentenceToken)
            {
                _ordinaryIds.Add(id);
            }
        }
        int max = tokenizer.Vocabulary.Count == 0 ? -1 : tokenizer.Vocabulary.Values.Max();
        VocabSize = Math.Max(max, addedTokens.Count == 0 ? -1 : addedTokens.Values.Max()) + 1;
    }

    public int VocabSize { get; }

    /// <summary>transformers' LlamaTokenizer adds BOS unless told otherwise.</summary>
    public bool AddsBosByDefault => true;

    // The library reports id 0 for a model trained without BOS/EOS (bos_id = -1); looking the piece up
    // tells a real one from that.
    public int? ModelBosId => TokenToId(_tokenizer.BeginningOfSentenceToken);

    public int? ModelEosId => TokenToId(_tokenizer.EndOfSentenceToken);

    public IReadOnlySet<int> SpecialTokenIds => _specialIds;

    /// <param name="path">The tokenizer.model file.</param>
    /// <param name="declared">Tokens the folder's config declares; they are matched whole in the input.</param>
    public static SentencePieceBackend Load(string path, IReadOnlyList<DeclaredToken> declared)
    {
        try
        {
            var plain = Create(path, null);
            var (added, specialIds) = DeclaredToken.Resolve(declared, t => plain.Vocabulary.TryGetValue(t, out int id) ? id : null);
            // The special tokens can only be given at creation, and their ids may come from the model's
            // own vocabulary, so a folder that declares any needs the model read a second time.
            var tokenizer = added.Count == 0 ? plain : Create(path, added);
            return new SentencePieceBackend(tokenizer, added, specialIds);
        }
        // A damaged protobuf can fail anywhere inside the library, with any exception type.
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new TokenizerException($"{path}: cannot read a SentencePiece model: {e.Message}", e);
        }
    }

    private static SentencePieceTokenizer Create(string path, IReadOnlyDictionary<string, int>? specialTokens)
    {
        using var stream = File.OpenRead(path);
        return SentencePieceTokenizer.Create(stream, addBeginningOfSentence: false, addEndOfSentence: false, specialTokens);
    }

    public int? TokenToId(string token) =>
        _addedTokens.TryGetValue(token, out int added) ? added
        : _tokenizer.Vocabulary.TryGetValue(token, out int id) ? id
        : null;

    public IReadOnlyList<int> Encode(string text)
    {
        var ids = _tokenizer.EncodeToIds(text, addBeginningOfSentence: false, addEndOfSentence: false);
        // SentencePiece (and transformers' converted tokenizers, fuse_unk) emit one <unk> for a run of
        // unknown characters; Microsoft.ML.Tokenizers emits one per character, so the runs are fused here.
        int unk = _tokenizer.UnknownId;
        if (!ids.Contains(unk))
        {
            return ids;
        }
        var fused = new List<int>(ids.Count);
        foreach (int id in ids)
        {
            if (id != unk || fused.Count == 0 || fused[^1] != unk)
            {
                fused.Add(id);
            }
        }
        return fused;
    }

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens)
    {
        // Microsoft.ML.Tokenizers drops the dummy-prefix space of the first ordinary piece even when byte
        // tokens come before it (SentencePiece drops it only at the very start), so "<0xE8>… ▁and"
        // loses its space: common in streamed windows of non-English text. Such a sequence is decoded in
        // two parts, and the space put back.
        int first = 0;
        bool sawByte = false;
        while (first < ids.Count && (_byteIds.Contains(ids[first]) || !_ordinaryIds.Contains(ids[first])))
        {
            sawByte |= _byteIds.Contains(ids[first]);
            first++;
        }
        if (!sawByte || first == ids.Count || !_tokenizer.AddDummyPrefix || _tokenizer.TreatWhitespaceAsSuffix)
        {
            return _tokenizer.Decode(ids, considerSpecialTokens: !skipSpecialTokens);
        }
        string space = _pieces[ids[first]].StartsWith(WordBoundary) ? " " : "";
        return _tokenizer.Decode(ids.Take(first), considerSpecialTokens: !skipSpecialTokens) + space
            + _tokenizer.Decode(ids.Skip(first), considerSpecialTokens: !skipSpecialTokens);
    }
}
