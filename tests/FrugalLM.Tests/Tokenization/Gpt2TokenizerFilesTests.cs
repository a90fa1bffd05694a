using System.Text.Json.Nodes;
using FrugalLM.Tokenization;
using Microsoft.ML.Tokenizers;
using Xunit.Abstractions;

namespace FrugalLM.Tests.Tokenization;

/// <summary>
/// The GPT-2 folder written from the tiktoken ranks must tokenize exactly as the library's own GPT-2
/// (TiktokenTokenizer, an independent implementation over the same ranks), through both tokenizer.json
/// (Hugging Face's Rust tokenizers) and vocab.json + merges.txt (Microsoft.ML.Tokenizers' BPE).
/// </summary>
[Collection(Gpt2FolderCollection.Name)]
public sealed class Gpt2TokenizerFilesTests(Gpt2FolderFixture gpt2, ITestOutputHelper output)
{
    private static readonly Lazy<TiktokenTokenizer> s_reference = new(() => TiktokenTokenizer.CreateForModel("gpt2"));

    [Fact]
    public void BothPathsEncodeLikeTiktokenAndRoundTrip()
    {
        int seed = Random.Shared.Next();
        output.WriteLine($"seed {seed}");
        var fortunes = TestText.FortuneLines(3000);
        output.WriteLine($"{fortunes.Count} fortune lines (0 if fortunes-min is not installed)");
        var lines = new List<string>(TestText.EdgeCases);
        lines.AddRange(fortunes);
        lines.AddRange(TestText.RandomLines(new Random(seed), 2000));
        // Whole paragraphs too, so that newlines and long whitespace runs meet words.
        for (int i = 0; i + 20 <= lines.Count; i += 20)
        {
            lines.Add(string.Join('\n', lines.GetRange(i, 20)));
        }

        long tokens = 0;
        foreach (var text in lines)
        {
            var expected = ReferenceIds(text);
            tokens += expected.Count;
            foreach (var (name, tokenizer) in new[] { ("tokenizer.json", gpt2.FromTokenizerJson), ("vocab.json+merges.txt", gpt2.FromVocabMerges) })
            {
                var ids = tokenizer.Encode(text);
                Assert.True(expected.SequenceEqual(ids),
                    $"{name} encodes {Show(text)} as [{string.Join(',', ids)}], tiktoken as [{string.Join(',', expected)}] (seed {seed})");
                Assert.Equal(text, tokenizer.Decode(ids, skipSpecialTokens: false));
            }
        }
        output.WriteLine($"{lines.Count} texts, {tokens} tokens: identical");
        Assert.True(tokens > 20_000, $"only {tokens} tokens compared");
    }

    [Theory]
    [InlineData("𝜉")]
    [InlineData(" 𝔘𝔫𝔦𝔠𝔬𝔡𝔢")]
    [InlineData("𠀀𠀁")]
    public void TokenizerJsonTreatsLettersOutsideTheBmpAsLettersLikeGpt2(string letters)
    {
        // GPT-2's regex sees code points, so "'s" after a letter stays the contraction token. .NET's regex
        // (TiktokenTokenizer, and the vocab.json + merges.txt path) sees UTF-16 halves and splits "'" "s".
        var expected = s_reference.Value.EncodeToIds(letters).Append(s_reference.Value.EncodeToIds("'s").Single());
        Assert.Equal(expected, gpt2.FromTokenizerJson.Encode(letters + "'s"));
    }

    [Fact]
    public void SpecialTokensAndSizesComeFromTheWrittenConfigs()
    {
        foreach (var tokenizer in new[] { gpt2.FromTokenizerJson, gpt2.FromVocabMerges })
        {
            Assert.Equal(50256, tokenizer.BosTokenId);
            Assert.Equal([50256], tokenizer.EosTokenIds);
            Assert.Null(tokenizer.PadTokenId);
            Assert.False(tokenizer.AddBosToken);
            Assert.Equal(50257, tokenizer.VocabSize);
        }
        Assert.Equal(Path.Combine(gpt2.FullDir, "tokenizer.json"), gpt2.FromTokenizerJson.Source);
        Assert.Equal(Path.Combine(gpt2.VocabMergesDir, "vocab.json"), gpt2.FromVocabMerges.Source);
    }

    [Fact]
    public void DecodeSkipsOrKeepsTheSpecialToken()
    {
        foreach (var tokenizer in new[] { gpt2.FromTokenizerJson, gpt2.FromVocabMerges })
        {
            var ids = tokenizer.Encode("The end.<|endoftext|>Next");
            Assert.Contains(50256, ids);
            Assert.Equal("The end.<|endoftext|>Next", tokenizer.Decode(ids, skipSpecialTokens: false));
            Assert.Equal("The end.Next", tokenizer.Decode(ids));
        }
    }

    [Fact]
    public void FilesHaveTheHuggingFaceLayout()
    {
        var merges = File.ReadAllLines(Path.Combine(gpt2.FullDir, "merges.txt"));
        Assert.Equal("#version: 0.2", merges[0]);
        Assert.Equal(50000, merges.Length - 1);
        Assert.All(merges.Skip(1), m => Assert.Single(m, ' '));

        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2.FullDir, "tokenizer.json")))!;
        var model = json["model"]!;
        Assert.Equal("BPE", (string?)model["type"]);
        Assert.Equal(50257, model["vocab"]!.AsObject().Count);
        Assert.Equal(50000, model["merges"]!.AsArray().Count);
        // The same merge list in both files, in the same order.
        var first = model["merges"]![0]!.AsArray();
        Assert.Equal(merges[1], $"{first[0]} {first[1]}");
        var pre = json["pre_tokenizer"]!;
        Assert.Equal("ByteLevel", (string?)pre["type"]);
        Assert.False((bool)pre["add_prefix_space"]!);
        Assert.True((bool)pre["trim_offsets"]!);
        Assert.True((bool)pre["use_regex"]!);
        Assert.Equal("ByteLevel", (string?)json["decoder"]!["type"]);
        Assert.Equal("ByteLevel", (string?)json["post_processor"]!["type"]);
        var added = Assert.Single(json["added_tokens"]!.AsArray())!;
        Assert.Equal(50256, (int)added["id"]!);
        Assert.Equal("<|endoftext|>", (string?)added["content"]);
        Assert.True((bool)added["special"]!);

        var vocab = JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2.FullDir, "vocab.json")))!.AsObject();
        Assert.Equal(50257, vocab.Count);
        Assert.Equal(50256, (int)vocab["<|endoftext|>"]!);
        // Byte-level alphabet: the space byte is spelled "Ġ".
        Assert.Equal(s_reference.Value.EncodeToIds(" the").Single(), (int)vocab["Ġthe"]!);

        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2.FullDir, "tokenizer_config.json")))!;
        Assert.Equal("GPT2Tokenizer", (string?)config["tokenizer_class"]);
        Assert.False((bool)config["add_bos_token"]!);
        Assert.Equal(1024, (int)config["model_max_length"]!);
        foreach (var key in new[] { "bos_token", "eos_token", "unk_token" })
        {
            Assert.Equal("<|endoftext|>", (string?)config[key]);
        }
        var map = JsonNode.Parse(File.ReadAllText(Path.Combine(gpt2.FullDir, "special_tokens_map.json")))!;
        Assert.Equal("<|endoftext|>", (string?)map["eos_token"]);
        Assert.Empty(Directory.GetFiles(gpt2.FullDir, "*.tmp"));
    }

    /// <summary>
    /// TiktokenTokenizer's ids, with <c>&lt;|endoftext|&gt;</c> in the text handled outside it: the
    /// library (2.0.1) recognises special tokens only through entries in its LRU cache of pre-tokens,
    /// so after enough distinct text they are evicted and the token is spelled as plain text.
    /// </summary>
    private static List<int> ReferenceIds(string text)
    {
        var ids = new List<int>();
        var parts = text.Split("<|endoftext|>");
        for (int i = 0; i < parts.Length; i++)
        {
            if (i > 0)
            {
                ids.Add(50256);
            }
            if (parts[i].Length > 0)
            {
                ids.AddRange(s_reference.Value.EncodeToIds(parts[i]));
            }
        }
        return ids;
    }

    private static string Show(string text) =>
        System.Text.Json.JsonSerializer.Serialize(text.Length > 200 ? text[..200] + "…" : text);
}
