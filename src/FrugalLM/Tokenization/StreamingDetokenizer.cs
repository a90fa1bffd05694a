namespace FrugalLM.Tokenization;

/// <summary>
/// Turns generated token ids, fed one at a time, into text as soon as it is complete: the pieces returned
/// by <see cref="Push"/> and then <see cref="Flush"/> concatenate to the full decode of all the ids.
/// </summary>
/// <remarks>
/// A byte-level BPE or byte-fallback token can end in the middle of a multi-byte UTF-8 character, and a
/// token's text can depend on the one before it (SentencePiece drops the leading space of the first
/// piece). So each step decodes a short window (the ids since the last emitted text plus the ones before
/// it, for context), emits only what the window adds beyond the text already emitted, and holds back while
/// the decode ends in U+FFFD (an incomplete character), the scheme of Hugging Face's text-generation-inference.
/// </remarks>
public sealed class StreamingDetokenizer
{
    private const char Replacement = '\uFFFD';

    private readonly HfTokenizer _tokenizer;
    private readonly bool _skipSpecialTokens;
    private readonly List<int> _ids = [];
    private int _prefixStart;
    private int _readStart;

    /// <summary>Creates a detokenizer for ids of <paramref name="tokenizer"/>.</summary>
    /// <param name="tokenizer">The tokenizer the ids come from.</param>
    /// <param name="skipSpecialTokens">Leave special tokens (BOS, EOS, …) out of the text.</param>
    public StreamingDetokenizer(HfTokenizer tokenizer, bool skipSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        _tokenizer = tokenizer;
        _skipSpecialTokens = skipSpecialTokens;
    }

    /// <summary>Adds one token id; returns the text it completes (possibly empty).</summary>
    public string Push(int tokenId)
    {
        _ids.Add(tokenId);
        string prefix = DecodeRange(_prefixStart, _readStart);
        string current = DecodeRange(_prefixStart, _ids.Count);
        if (current.Length <= prefix.Length || current[^1] == Replacement)
        {
            return "";
        }
        // The ids before the new prefix window are no longer needed.
        _ids.RemoveRange(0, _readStart);
        _prefixStart = 0;
        _readStart = _ids.Count;
        return current[prefix.Length..];
    }

    /// <summary>
    /// Returns the text held back (an incomplete character at the end becomes U+FFFD, as in a full decode)
    /// and starts over.
    /// </summary>
    public string Flush()
    {
        string prefix = DecodeRange(_prefixStart, _readStart);
        string current = DecodeRange(_prefixStart, _ids.Count);
        _ids.Clear();
        _prefixStart = _readStart = 0;
        return current.Length > prefix.Length ? current[prefix.Length..] : "";
    }

    private string DecodeRange(int start, int end) =>
        start == end ? "" : _tokenizer.Decode(_ids.GetRange(start, end - start), _skipSpecialTokens);
}
