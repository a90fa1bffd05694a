namespace FrugalLM.Tokenization;

/// <summary>
/// One way of reading a tokenizer file. Backends never add BOS/EOS themselves: <see cref="HfTokenizer"/>
/// decides that from the folder's configuration, the same way for every backend.
/// </summary>
internal interface ITokenizerBackend
{
    /// <summary>The highest token id the tokenizer knows, plus one.</summary>
    int VocabSize { get; }

    /// <summary>What <c>add_bos_token</c> defaults to for this kind of tokenizer when the config says nothing.</summary>
    bool AddsBosByDefault { get; }

    /// <summary>
    /// The BOS id the tokenizer file itself defines (SentencePiece's bos_id, the token a tokenizer.json
    /// post-processor puts first), used when no config names one.
    /// </summary>
    int? ModelBosId { get; }

    /// <summary>The EOS id the tokenizer file itself defines (SentencePiece's eos_id), used when no config names one.</summary>
    int? ModelEosId { get; }

    /// <summary>Ids of the added tokens marked special (skipped by a decode that skips special tokens).</summary>
    IReadOnlySet<int> SpecialTokenIds { get; }

    /// <summary>The id of a token given by its text, or null when the vocabulary lacks it.</summary>
    int? TokenToId(string token);

    /// <summary>Token ids of <paramref name="text"/>, with no special tokens added around it.</summary>
    IReadOnlyList<int> Encode(string text);

    /// <summary>Text of <paramref name="ids"/>; invalid UTF-8 byte runs become U+FFFD.</summary>
    string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens);
}
