using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using NativeTokenizer = Tokenizers.DotNet.Tokenizer;

namespace FrugalLM.Tokenization;

/// <summary>
/// <c>tokenizer.json</c> (a Hugging Face fast tokenizer) through Hugging Face's own Rust library, wrapped
/// by Tokenizers.DotNet.
/// </summary>
/// <remarks>
/// Tokenizers.DotNet exposes only <c>encode(text, add_special_tokens: true)</c> and
/// <c>decode(ids, skip_special_tokens: true)</c>, and reads only a file. So the library is given copies
/// of the file adjusted for what it cannot be asked: for encoding, a copy whose post-processor adds no
/// special tokens (BOS is <see cref="HfTokenizer"/>'s decision, made from the folder's config); for a
/// decode that keeps special tokens, a copy whose added tokens are all marked non-special. The JSON is
/// read here as well, for what the library does not report (vocabulary, added tokens, post-processor).
/// </remarks>
internal sealed class HfJsonBackend : ITokenizerBackend
{
    private static readonly HashSet<string> s_specialAddingProcessors = new(StringComparer.Ordinal)
    {
        "TemplateProcessing", "BertProcessing", "RobertaProcessing",
    };

    private readonly string _path;
    private readonly NativeTokenizer _encoder;
    private readonly Lazy<NativeTokenizer> _keepSpecialDecoder;
    private readonly Dictionary<string, int> _vocab;
    private readonly HashSet<int> _specialIds;

    private HfJsonBackend(string path, NativeTokenizer encoder, Dictionary<string, int> vocab, HashSet<int> specialIds, int? prependedSpecialToken)
    {
        _path = path;
        _encoder = encoder;
        _vocab = vocab;
        _specialIds = specialIds;
        VocabSize = vocab.Count == 0 ? 0 : vocab.Values.Max() + 1;
        ModelBosId = prependedSpecialToken;
        _keepSpecialDecoder = new Lazy<NativeTokenizer>(CreateKeepSpecialDecoder);
    }

    public int VocabSize { get; }

    /// <summary>True when the post-processor starts a sequence with a special token.</summary>
    public bool AddsBosByDefault => ModelBosId is not null;

    /// <summary>The special token the post-processor starts a sequence with.</summary>
    public int? ModelBosId { get; }

    public int? ModelEosId => null;

    public IReadOnlySet<int> SpecialTokenIds => _specialIds;

    public static HfJsonBackend Load(string path)
    {
        // A JsonDocument rather than a JsonNode tree: a 128k-token vocabulary with its merges would
        // take hundreds of megabytes as nodes.
        using var document = ReadJson(path);
        var root = document.RootElement;
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        ReadModelVocabulary(path, root, vocab);
        var specialIds = new HashSet<int>();
        ReadAddedTokens(path, root, vocab, specialIds);

        var postProcessor = root.TryGetProperty("post_processor", out var processor) ? JsonNode.Parse(processor.GetRawText()) : null;
        int? prepended = PrependedSpecialToken(postProcessor);
        var stripped = WithoutSpecialTokenProcessors(postProcessor);
        var encoder = ReferenceEquals(stripped, postProcessor)
            ? CreateNative(path, path)
            : CreateFromJson(path, root, "post_processor", stripped);
        return new HfJsonBackend(path, encoder, vocab, specialIds, prepended);
    }

    public int? TokenToId(string token) => _vocab.TryGetValue(token, out int id) ? id : null;

    public IReadOnlyList<int> Encode(string text)
    {
        uint[] ids;
        try
        {
            ids = _encoder.Encode(text);
        }
        catch (global::Tokenizers.DotNet.TokenizerException e)
        {
            throw new TokenizerException($"{_path}: the tokenizer failed to encode the text: {e.Message}", e);
        }
        var result = new int[ids.Length];
        for (int i = 0; i < ids.Length; i++)
        {
            result[i] = checked((int)ids[i]);
        }
        return result;
    }

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens)
    {
        var native = new uint[ids.Count];
        for (int i = 0; i < native.Length; i++)
        {
            native[i] = (uint)ids[i];
        }
        var tokenizer = skipSpecialTokens || _specialIds.Count == 0 ? _encoder : _keepSpecialDecoder.Value;
        try
        {
            return tokenizer.Decode(native);
        }
        catch (global::Tokenizers.DotNet.TokenizerException e)
        {
            throw new TokenizerException($"{_path}: the tokenizer failed to decode: {e.Message}", e);
        }
    }

    private NativeTokenizer CreateKeepSpecialDecoder()
    {
        using var document = ReadJson(_path);
        var added = JsonNode.Parse(document.RootElement.GetProperty("added_tokens").GetRawText())!.AsArray();
        foreach (var token in added)
        {
            token!["special"] = false;
        }
        return CreateFromJson(_path, document.RootElement, "added_tokens", added);
    }

    private static JsonDocument ReadJson(string path)
    {
        try
        {
            using var stream = File.OpenRead(path);
            var document = JsonDocument.Parse(stream);
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                document.Dispose();
                throw new TokenizerException($"{path}: expected a JSON object (a Hugging Face tokenizer.json).");
            }
            return document;
        }
        catch (Exception e) when (e is JsonException or IOException or UnauthorizedAccessException)
        {
            throw new TokenizerException($"{path}: cannot read a Hugging Face tokenizer.json: {e.Message}", e);
        }
    }

    private static void ReadModelVocabulary(string path, JsonElement root, Dictionary<string, int> vocab)
    {
        if (!root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerException($"{path}: expected a \"model\" object (BPE, Unigram, WordPiece or WordLevel).");
        }
        if (!model.TryGetProperty("vocab", out var entries))
        {
            throw new TokenizerException($"{path}: the model has no \"vocab\".");
        }
        try
        {
            if (entries.ValueKind == JsonValueKind.Object)
            {
                // BPE, WordPiece, WordLevel: {"token": id, ...}
                foreach (var entry in entries.EnumerateObject())
                {
                    vocab[entry.Name] = entry.Value.GetInt32();
                }
            }
            else
            {
                // Unigram: [["piece", score], ...], the id being the position.
                int id = 0;
                foreach (var entry in entries.EnumerateArray())
                {
                    vocab.TryAdd(entry[0].GetString()!, id++);
                }
            }
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or IndexOutOfRangeException)
        {
            throw new TokenizerException($"{path}: the model's \"vocab\" is malformed: {e.Message}", e);
        }
    }

    private static void ReadAddedTokens(string path, JsonElement root, Dictionary<string, int> vocab, HashSet<int> specialIds)
    {
        if (!root.TryGetProperty("added_tokens", out var added) || added.ValueKind == JsonValueKind.Null)
        {
            return;
        }
        try
        {
            foreach (var token in added.EnumerateArray())
            {
                int id = token.GetProperty("id").GetInt32();
                vocab[token.GetProperty("content").GetString()!] = id;
                if (token.TryGetProperty("special", out var special) && special.GetBoolean())
                {
                    specialIds.Add(id);
                }
            }
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or KeyNotFoundException)
        {
            throw new TokenizerException($"{path}: \"added_tokens\" is malformed (expected objects with id, content, special): {e.Message}", e);
        }
    }

    /// <summary>
    /// The id of the special token the post-processor puts before the text of a single sequence, or null
    /// when it puts none there.
    /// </summary>
    private static int? PrependedSpecialToken(JsonNode? processor)
    {
        if (processor is not JsonObject p)
        {
            return null;
        }
        try
        {
            switch ((string?)p["type"])
            {
                case "TemplateProcessing":
                    // "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": …}], "special_tokens": {"<s>": {"ids": [1]}}
                    if (p["single"] is JsonArray single && single.Count > 0 && single[0]?["SpecialToken"]?["id"] is JsonNode name)
                    {
                        return p["special_tokens"]?[(string)name!]?["ids"]?[0]?.GetValue<int>();
                    }
                    return null;
                case "BertProcessing" or "RobertaProcessing":
                    // "cls": ["[CLS]", 101]
                    return p["cls"]?[1]?.GetValue<int>();
                case "Sequence":
                    return p["processors"] is JsonArray list ? list.Select(PrependedSpecialToken).FirstOrDefault(id => id is not null) : null;
                default:
                    return null;
            }
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException)
        {
            return null;
        }
    }

    /// <summary>The post-processor without the parts that add special tokens; the same node when none do.</summary>
    private static JsonNode? WithoutSpecialTokenProcessors(JsonNode? processor)
    {
        if (processor is not JsonObject p)
        {
            return processor;
        }
        string? type = (string?)p["type"];
        if (type is not null && s_specialAddingProcessors.Contains(type))
        {
            return null;
        }
        if (type == "Sequence" && p["processors"] is JsonArray list
            && list.Any(x => x is JsonObject o && s_specialAddingProcessors.Contains((string?)o["type"] ?? "")))
        {
            var kept = new JsonArray(list
                .Where(x => !(x is JsonObject o && s_specialAddingProcessors.Contains((string?)o["type"] ?? "")))
                .Select(x => x?.DeepClone())
                .ToArray());
            return kept.Count == 0 ? null : new JsonObject { ["type"] = "Sequence", ["processors"] = kept };
        }
        return processor;
    }

    /// <summary>
    /// Loads a copy of tokenizer.json with one top-level property replaced, through a temporary file:
    /// the library reads only files.
    /// </summary>
    private static NativeTokenizer CreateFromJson(string originalPath, JsonElement root, string property, JsonNode? replacement)
    {
        var temp = Path.Combine(Path.GetTempPath(), $"frugal-tokenizer-{Environment.ProcessId}-{Guid.NewGuid():N}.json");
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
            using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
            {
                writer.WriteStartObject();
                foreach (var item in root.EnumerateObject())
                {
                    if (item.NameEquals(property))
                    {
                        writer.WritePropertyName(property);
                        if (replacement is null)
                        {
                            writer.WriteNullValue();
                        }
                        else
                        {
                            replacement.WriteTo(writer);
                        }
                    }
                    else
                    {
                        item.WriteTo(writer);
                    }
                }
                writer.WriteEndObject();
            }
            return CreateNative(originalPath, temp);
        }
        finally
        {
            File.Delete(temp);
        }
    }

    private static NativeTokenizer CreateNative(string originalPath, string path)
    {
        try
        {
            return new NativeTokenizer(vocabPath: path);
        }
        catch (global::Tokenizers.DotNet.TokenizerException e)
        {
            throw new TokenizerException($"{originalPath}: Hugging Face tokenizers could not load it: {e.Message}", e);
        }
    }
}
