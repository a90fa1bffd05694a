using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.Tokenization;
using Microsoft.ML.Tokenizers;

namespace FrugalLM.Tests.Tokenization;

/// <summary>BOS/EOS/PAD from the folder's configs, BOS insertion, and the errors for bad folders.</summary>
[Collection(Gpt2FolderCollection.Name)]
public sealed class HfTokenizerConfigTests(Gpt2FolderFixture gpt2)
{
    private static readonly Lazy<TiktokenTokenizer> s_reference = new(() => TiktokenTokenizer.CreateForModel("gpt2"));

    public static TheoryData<string> Sources => ["tokenizer.json", "vocab.json"];

    [Theory]
    [MemberData(nameof(Sources))]
    public void TokenStringsAndContentObjectsResolveThroughTheVocabulary(string source)
    {
        var (dir, vocab) = FolderWith(source);
        var picked = PickTokens(vocab, 3);
        Write(dir, "tokenizer_config.json", new JsonObject
        {
            ["bos_token"] = picked[0].Token,
            ["eos_token"] = new JsonObject { ["__type"] = "AddedToken", ["content"] = picked[1].Token, ["lstrip"] = false, ["special"] = true },
            ["pad_token"] = new JsonObject { ["content"] = picked[2].Token },
        });
        var tokenizer = HfTokenizer.Load(dir);
        Assert.Equal(picked[0].Id, tokenizer.BosTokenId);
        Assert.Equal([picked[1].Id], tokenizer.EosTokenIds);
        Assert.Equal(picked[2].Id, tokenizer.PadTokenId);
        Assert.False(tokenizer.AddBosToken);
    }

    [Theory]
    [MemberData(nameof(Sources))]
    public void SpecialTokensMapAndIdFilesFillWhatTokenizerConfigLeavesOut(string source)
    {
        var (dir, vocab) = FolderWith(source);
        var picked = PickTokens(vocab, 6);
        Write(dir, "tokenizer_config.json", new JsonObject { ["pad_token"] = null, ["add_bos_token"] = true });
        Write(dir, "special_tokens_map.json", new JsonObject { ["eos_token"] = new JsonObject { ["content"] = picked[0].Token } });
        Write(dir, "generation_config.json", new JsonObject
        {
            ["eos_token_id"] = new JsonArray(picked[1].Id, picked[0].Id, picked[2].Id),
            ["pad_token_id"] = picked[3].Id,
        });
        Write(dir, "config.json", new JsonObject
        {
            ["bos_token_id"] = picked[4].Id,
            ["eos_token_id"] = picked[5].Id,
            ["pad_token_id"] = 0,
        });
        var tokenizer = HfTokenizer.Load(dir);
        Assert.Equal(picked[4].Id, tokenizer.BosTokenId);
        // The tokenizer's own EOS first, then the other stop ids, without repeats.
        Assert.Equal([picked[0].Id, picked[1].Id, picked[2].Id, picked[5].Id], tokenizer.EosTokenIds);
        Assert.Equal(picked[3].Id, tokenizer.PadTokenId);
        Assert.True(tokenizer.AddBosToken);

        string text = "Fresh text " + Random.Shared.Next();
        var plain = s_reference.Value.EncodeToIds(text);
        Assert.Equal([picked[4].Id, .. plain], tokenizer.Encode(text));
        Assert.Equal(plain, tokenizer.Encode(text, addBos: false));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void TemplatePostProcessorDecidesBosWhenTheConfigIsSilent(bool insideSequence)
    {
        var dir = gpt2.NewDir();
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2.FullDir, "tokenizer.json")))!.AsObject();
        var template = JsonNode.Parse("""
            {
              "type": "TemplateProcessing",
              "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
              "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
              "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [50256], "tokens": ["<|endoftext|>"]}}
            }
            """)!;
        // Llama-3 folders wrap the template in a Sequence after a ByteLevel processor.
        json["post_processor"] = insideSequence
            ? new JsonObject { ["type"] = "Sequence", ["processors"] = new JsonArray(json["post_processor"]!.DeepClone(), template) }
            : template;
        Write(dir, "tokenizer.json", json);
        // No config names BOS: the template's token is it.

        string text = "Let there be light " + Random.Shared.Next();
        var plain = s_reference.Value.EncodeToIds(text);
        var tokenizer = HfTokenizer.Load(dir);
        Assert.True(tokenizer.AddBosToken);
        Assert.Equal(50256, tokenizer.BosTokenId);
        Assert.Equal([50256, .. plain], tokenizer.Encode(text));
        Assert.Equal(plain, tokenizer.Encode(text, addBos: false));

        Write(dir, "tokenizer_config.json", new JsonObject { ["add_bos_token"] = false });
        tokenizer = HfTokenizer.Load(dir);
        Assert.False(tokenizer.AddBosToken);
        Assert.Equal(plain, tokenizer.Encode(text));
    }

    [Fact]
    public void FolderWithoutTokenizerFilesIsAnErrorNamingIt()
    {
        var dir = gpt2.NewDir();
        File.WriteAllText(Path.Combine(dir, "config.json"), "{}");
        var e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains(dir, e.Message, StringComparison.Ordinal);
        Assert.Contains("tokenizer.json", e.Message, StringComparison.Ordinal);
        Assert.Contains("tokenizer.model", e.Message, StringComparison.Ordinal);

        var missing = Path.Combine(dir, "nope");
        e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(missing));
        Assert.Contains(missing, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void VocabWithoutMergesIsAnErrorNamingTheMissingFile()
    {
        var dir = gpt2.NewDir();
        File.Copy(Path.Combine(gpt2.FullDir, "vocab.json"), Path.Combine(dir, "vocab.json"));
        var e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains(dir, e.Message, StringComparison.Ordinal);
        Assert.Contains("merges.txt", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("tokenizer.json")]
    [InlineData("tokenizer.model")]
    [InlineData("vocab.json")]
    public void CorruptTokenizerFileIsAnErrorNamingIt(string file)
    {
        var dir = gpt2.NewDir();
        if (file == "vocab.json")
        {
            File.Copy(Path.Combine(gpt2.FullDir, "merges.txt"), Path.Combine(dir, "merges.txt"));
        }
        // A truncated tokenizer.json / vocab.json, or random bytes for the protobuf tokenizer.model.
        var bytes = file == "tokenizer.model"
            ? RandomBytes(4096)
            : File.ReadAllBytes(Path.Combine(gpt2.FullDir, file))[..100_000];
        File.WriteAllBytes(Path.Combine(dir, file), bytes);
        var e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains(Path.Combine(dir, file), e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void UnreadableOrInconsistentConfigsAreErrorsNamingTheFile()
    {
        var (dir, _) = FolderWith("tokenizer.json");
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), "{\"bos_token\": ");
        var e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains(Path.Combine(dir, "tokenizer_config.json"), e.Message, StringComparison.Ordinal);

        string unknown = $"<|not-a-token-{Random.Shared.Next()}|>";
        Write(dir, "tokenizer_config.json", new JsonObject { ["eos_token"] = unknown });
        e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains(Path.Combine(dir, "tokenizer_config.json"), e.Message, StringComparison.Ordinal);
        Assert.Contains(unknown, e.Message, StringComparison.Ordinal);

        File.Delete(Path.Combine(dir, "tokenizer_config.json"));
        int outside = 50257 + Random.Shared.Next(1000);
        Write(dir, "generation_config.json", new JsonObject { ["eos_token_id"] = new JsonArray(50256, outside) });
        e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains(Path.Combine(dir, "generation_config.json"), e.Message, StringComparison.Ordinal);
        Assert.Contains(outside.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message, StringComparison.Ordinal);

        Write(dir, "generation_config.json", new JsonObject { ["eos_token_id"] = "fifty" });
        e = Assert.Throws<TokenizerException>(() => HfTokenizer.Load(dir));
        Assert.Contains("eos_token_id", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void DecodeRejectsIdsOutsideTheVocabulary()
    {
        int id = 50257 + Random.Shared.Next(1000);
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => gpt2.FromTokenizerJson.Decode([15496, id]));
        Assert.Contains(id.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message, StringComparison.Ordinal);
    }

    /// <summary>A folder with only the GPT-2 tokenizer file(s) of one kind, and that vocabulary.</summary>
    private (string Dir, JsonObject Vocab) FolderWith(string source)
    {
        var dir = gpt2.NewDir();
        var files = source == "tokenizer.json" ? new[] { "tokenizer.json" } : ["vocab.json", "merges.txt"];
        foreach (var file in files)
        {
            File.Copy(Path.Combine(gpt2.FullDir, file), Path.Combine(dir, file));
        }
        return (dir, JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2.FullDir, "vocab.json")))!.AsObject());
    }

    /// <summary>Distinct random ordinary tokens (ids below the special one).</summary>
    private static List<(string Token, int Id)> PickTokens(JsonObject vocab, int count)
    {
        var all = vocab.Select(kv => (Token: kv.Key, Id: (int)kv.Value!)).Where(t => t.Id < 50256).ToArray();
        Random.Shared.Shuffle(all);
        return [.. all.Take(count)];
    }

    private static byte[] RandomBytes(int count)
    {
        var bytes = new byte[count];
        Random.Shared.NextBytes(bytes);
        return bytes;
    }

    private static void Write(string dir, string file, JsonNode json) =>
        File.WriteAllText(Path.Combine(dir, file), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
}
