using System.Text;
using FrugalLM.Tokenization;

namespace FrugalLM.Tests.Tokenization;

/// <summary>Streamed text must equal the full decode, without ever emitting half a character.</summary>
[Collection(Gpt2FolderCollection.Name)]
public sealed class StreamingDetokenizerTests(Gpt2FolderFixture gpt2)
{
    private static readonly string s_fixtures = Path.Combine(AppContext.BaseDirectory, "Tokenization", "Fixtures");

    [Fact]
    public void ByteLevelTokensThatSplitCharactersStreamToTheFullDecode()
    {
        var random = new Random(Random.Shared.Next());
        string text = string.Join('\n', TestText.RandomLines(random, 200)) + "\n日本語 😀👍🏽👨‍👩‍👧 café";
        foreach (var tokenizer in new[] { gpt2.FromTokenizerJson, gpt2.FromVocabMerges })
        {
            var ids = tokenizer.Encode(text);
            // The premise: some tokens hold only part of a character.
            Assert.Contains(ids, id => tokenizer.Decode([id]).Contains('\uFFFD'));
            AssertStreamsToFullDecode(tokenizer, ids, expectHeldBack: true);
        }
    }

    [Theory]
    [InlineData("sp-llama", "tokenizer.model")]
    [InlineData("hf-llama", "tokenizer.json")]
    public void SentencePieceByteFallbackAndLeadingSpacesStreamToTheFullDecode(string fixture, string file)
    {
        var dir = gpt2.NewDir();
        File.Copy(Path.Combine(s_fixtures, fixture, file), Path.Combine(dir, file));
        var tokenizer = HfTokenizer.Load(dir);
        // Characters the tiny model never saw are spelled as UTF-8 byte tokens (<0xE6> …).
        string text = "And God said 日本語 😀 naïve " + Random.Shared.Next() + " Let there be light.";
        var ids = tokenizer.Encode(text);
        Assert.Contains(ids, id => tokenizer.Decode([id]).Contains('\uFFFD'));
        AssertStreamsToFullDecode(tokenizer, ids, expectHeldBack: true);
        Assert.Equal(text, tokenizer.Decode(ids));
    }

    [Fact]
    public void SpecialTokensAreLeftOutUnlessAsked()
    {
        var tokenizer = gpt2.FromTokenizerJson;
        var ids = tokenizer.Encode("First.<|endoftext|>Second 😀");
        Assert.Contains(50256, ids);
        AssertStreamsToFullDecode(tokenizer, ids, expectHeldBack: true);
        var keep = new StreamingDetokenizer(tokenizer, skipSpecialTokens: false);
        var streamed = new StringBuilder();
        foreach (int id in ids)
        {
            streamed.Append(keep.Push(id));
        }
        streamed.Append(keep.Flush());
        Assert.Equal("First.<|endoftext|>Second 😀", streamed.ToString());
    }

    [Fact]
    public void FlushReleasesAnIncompleteCharacterAsTheFullDecodeDoes()
    {
        var tokenizer = gpt2.FromTokenizerJson;
        var ids = tokenizer.Encode("End on a split emoji 🧠").ToList();
        // Drop the last token so the final character stays incomplete.
        ids.RemoveAt(ids.Count - 1);
        string full = tokenizer.Decode(ids);
        Assert.EndsWith("\uFFFD", full, StringComparison.Ordinal);

        var stream = new StreamingDetokenizer(tokenizer);
        var streamed = new StringBuilder();
        foreach (int id in ids)
        {
            string piece = stream.Push(id);
            Assert.DoesNotContain('\uFFFD', piece);
            streamed.Append(piece);
        }
        string held = stream.Flush();
        Assert.Contains('\uFFFD', held);
        Assert.Equal(full, streamed + held);
        // After a flush the detokenizer starts over.
        Assert.Equal("Hi", stream.Push(tokenizer.Encode("Hi").Single()));
    }

    private static void AssertStreamsToFullDecode(HfTokenizer tokenizer, IReadOnlyList<int> ids, bool expectHeldBack)
    {
        var stream = new StreamingDetokenizer(tokenizer);
        var streamed = new StringBuilder();
        int heldBack = 0;
        foreach (int id in ids)
        {
            string piece = stream.Push(id);
            Assert.DoesNotContain('\uFFFD', piece);
            heldBack += piece.Length == 0 ? 1 : 0;
            streamed.Append(piece);
        }
        streamed.Append(stream.Flush());
        Assert.Equal(tokenizer.Decode(ids), streamed.ToString());
        Assert.Equal(expectHeldBack, heldBack > 0);
    }
}
