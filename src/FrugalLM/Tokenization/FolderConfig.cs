using System.Text.Json;
using System.Text.Json.Nodes;

namespace FrugalLM.Tokenization;

/// <summary>A token the folder's configuration declares: its text, its id when the config gives one, and whether it is special.</summary>
internal readonly record struct DeclaredToken(string Content, int? Id, bool Special)
{
    /// <summary>
    /// Gives every declared token an id (its own, else the vocabulary's; tokens found in neither are
    /// left out, as they cannot be produced) and collects the special ones. One id per text and one text
    /// per id: the first declaration wins.
    /// </summary>
    public static (Dictionary<string, int> Tokens, HashSet<int> SpecialIds) Resolve(IEnumerable<DeclaredToken> declared, Func<string, int?> vocabulary)
    {
        var tokens = new Dictionary<string, int>(StringComparer.Ordinal);
        var ids = new HashSet<int>();
        var special = new HashSet<int>();
        foreach (var token in declared)
        {
            if ((token.Id ?? vocabulary(token.Content)) is int id && !tokens.ContainsKey(token.Content) && ids.Add(id))
            {
                tokens.Add(token.Content, id);
                if (token.Special)
                {
                    special.Add(id);
                }
            }
        }
        return (tokens, special);
    }
}

/// <summary>
/// The JSON files of a Hugging Face folder that describe special tokens: <c>tokenizer_config.json</c>,
/// <c>special_tokens_map.json</c>, <c>added_tokens.json</c>, <c>generation_config.json</c>, <c>config.json</c>.
/// Each is optional; one that exists but cannot be read is an error naming it.
/// </summary>
internal sealed class FolderConfig
{
    public const string TokenizerConfigFile = "tokenizer_config.json";
    public const string SpecialTokensMapFile = "special_tokens_map.json";
    public const string AddedTokensFile = "added_tokens.json";
    public const string GenerationConfigFile = "generation_config.json";
    public const string ModelConfigFile = "config.json";

    private static readonly string[] s_namedSpecialTokens = ["bos_token", "eos_token", "unk_token", "pad_token"];

    private FolderConfig(string dir)
    {
        Dir = dir;
        TokenizerConfig = ReadOptional(dir, TokenizerConfigFile);
        SpecialTokensMap = ReadOptional(dir, SpecialTokensMapFile);
        AddedTokens = ReadOptional(dir, AddedTokensFile);
        GenerationConfig = ReadOptional(dir, GenerationConfigFile);
        ModelConfig = ReadOptional(dir, ModelConfigFile);
    }

    public string Dir { get; }

    public JsonObject? TokenizerConfig { get; }

    public JsonObject? SpecialTokensMap { get; }

    public JsonObject? AddedTokens { get; }

    public JsonObject? GenerationConfig { get; }

    public JsonObject? ModelConfig { get; }

    public static FolderConfig Read(string dir) => new(dir);

    /// <summary>
    /// The tokens a tokenizer without its own added-token list (tokenizer.model, vocab.json) must match
    /// whole in the text: <c>added_tokens_decoder</c>, <c>added_tokens.json</c>, and the named special
    /// tokens (bos/eos/unk/pad, additional_special_tokens), as transformers does.
    /// </summary>
    public List<DeclaredToken> DeclaredTokens()
    {
        var named = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (config, file) in new[] { (TokenizerConfig, TokenizerConfigFile), (SpecialTokensMap, SpecialTokensMapFile) })
        {
            if (config is null)
            {
                continue;
            }
            foreach (var key in s_namedSpecialTokens)
            {
                if (TokenText(config, key, file) is string text)
                {
                    named.Add(text);
                }
            }
            if (config["additional_special_tokens"] is JsonArray extra)
            {
                foreach (var item in extra)
                {
                    named.Add(TokenText(item, file, "additional_special_tokens")
                        ?? throw Malformed(file, "additional_special_tokens", "a list of tokens"));
                }
            }
        }

        var declared = new List<DeclaredToken>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        if (TokenizerConfig?["added_tokens_decoder"] is JsonObject decoder)
        {
            foreach (var (key, value) in decoder)
            {
                if (!int.TryParse(key, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int id)
                    || value is not JsonObject entry || TokenText((JsonNode)entry, TokenizerConfigFile, "added_tokens_decoder") is not string content)
                {
                    throw Malformed(TokenizerConfigFile, "added_tokens_decoder", "{\"<id>\": {\"content\": ..., \"special\": ...}}");
                }
                bool special = entry["special"] is JsonValue flag && flag.TryGetValue(out bool b) ? b : named.Contains(content);
                if (seen.Add(content))
                {
                    declared.Add(new DeclaredToken(content, id, special));
                }
            }
        }
        if (AddedTokens is not null)
        {
            foreach (var (content, value) in AddedTokens)
            {
                if (value is not JsonValue v || !v.TryGetValue(out int id))
                {
                    throw Malformed(AddedTokensFile, content, "{\"<token>\": <id>}");
                }
                if (seen.Add(content))
                {
                    declared.Add(new DeclaredToken(content, id, named.Contains(content)));
                }
            }
        }
        foreach (var content in named)
        {
            if (seen.Add(content))
            {
                declared.Add(new DeclaredToken(content, null, true));
            }
        }
        return declared;
    }

    /// <summary>The text of a token field: a string, an object with "content", or null/absent.</summary>
    public string? TokenText(JsonObject config, string key, string file) => TokenText(config[key], file, key);

    public TokenizerException Malformed(string file, string key, string expected) =>
        new($"{Path.Combine(Dir, file)}: \"{key}\" is malformed; expected {expected}.");

    private string? TokenText(JsonNode? node, string file, string key) => node switch
    {
        null => null,
        JsonValue v when v.TryGetValue(out string? s) => s,
        JsonObject o when o["content"] is JsonValue c && c.TryGetValue(out string? s) => s,
        _ => throw Malformed(file, key, "a string or an object with \"content\""),
    };

    private static JsonObject? ReadOptional(string dir, string file)
    {
        var path = Path.Combine(dir, file);
        if (!File.Exists(path))
        {
            return null;
        }
        try
        {
            using var stream = File.OpenRead(path);
            return JsonNode.Parse(stream, documentOptions: new JsonDocumentOptions { AllowTrailingCommas = true }) as JsonObject
                ?? throw new TokenizerException($"{path}: expected a JSON object.");
        }
        catch (Exception e) when (e is JsonException or IOException or UnauthorizedAccessException)
        {
            throw new TokenizerException($"{path}: cannot read it as JSON: {e.Message}", e);
        }
    }
}
