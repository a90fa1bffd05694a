using FrugalLM.Tokenization;

namespace FrugalLM.Tests.Tokenization;

/// <summary>
/// tokenizer.model through Microsoft.ML.Tokenizers against Google's own spm_encode/spm_decode, on two
/// tiny models trained on the KJV by Fixtures/make-sentencepiece-fixtures.sh: LLaMA-style BPE with byte
/// fallback and identity normalisation, and a Unigram with nmt_nfkc normalisation.
/// </summary>
public sealed class SentencePieceTests : IDisposable
{
    private static readonly string s_fixtures = Path.Combine(AppContext.BaseDirectory, "Tokenization", "Fixtures");

    private readonly string _root = Directory.CreateTempSubdirectory("frugal-spm-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    [Theory]
    [InlineData("sp-llama")]
    [InlineData("sp-unigram-nfkc")]
    public void EncodesLikeSpmEncode(string model)
    {
        var dir = CopyModel(model, tokenizerConfig: null);
        var tokenizer = HfTokenizer.Load(dir);
        var samples = File.ReadAllLines(Path.Combine(s_fixtures, "sentencepiece-samples.txt"));
        var expected = File.ReadAllLines(Path.Combine(s_fixtures, model, "expected-ids.txt"));
        var decoded = File.ReadAllLines(Path.Combine(s_fixtures, model, "expected-decoded.txt"));
        Assert.Equal(samples.Length, expected.Length);
        for (int i = 0; i < samples.Length; i++)
        {
            var ids = tokenizer.Encode(samples[i], addBos: false);
            Assert.Equal(expected[i], string.Join(' ', ids));
            // spm_decode spells <unk> as " ⁇ ", transformers as "<unk>"; elsewhere both must agree.
            if (!ids.Contains(0))
            {
                Assert.Equal(decoded[i], tokenizer.Decode(ids));
            }
        }
    }

    [Fact]
    public void LlamaStyleModelRoundTripsAndAddsBos()
    {
        var dir = CopyModel("sp-llama", tokenizerConfig: """
            {
              "add_bos_token": true,
              "add_eos_token": false,
              "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
              "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
              "unk_token": "<unk>",
              "pad_token": null,
              "tokenizer_class": "LlamaTokenizer"
            }
            """);
        var tokenizer = HfTokenizer.Load(dir);
        Assert.Equal(Path.Combine(dir, "tokenizer.model"), tokenizer.Source);
        Assert.Equal(1, tokenizer.BosTokenId);
        Assert.Equal([2], tokenizer.EosTokenIds);
        Assert.Null(tokenizer.PadTokenId);
        Assert.True(tokenizer.AddBosToken);
        Assert.Equal(1000, tokenizer.VocabSize);

        var samples = File.ReadAllLines(Path.Combine(s_fixtures, "sentencepiece-samples.txt"));
        var decoded = File.ReadAllLines(Path.Combine(s_fixtures, "sp-llama", "expected-decoded.txt"));
        for (int i = 0; i < samples.Length; i++)
        {
            var ids = tokenizer.Encode(samples[i]);
            Assert.Equal(1, ids[0]);
            if (samples[i].Contains("<s>", StringComparison.Ordinal))
            {
                // Special-token text in the input becomes the special token, as in transformers.
                Assert.Contains(1, ids.Skip(1));
                Assert.Contains(2, ids);
                continue;
            }
            Assert.DoesNotContain(1, ids.Skip(1));
            Assert.Equal(decoded[i], tokenizer.Decode(ids));
            // Byte fallback makes every sample reversible, whatever its script.
            Assert.Equal(samples[i], tokenizer.Decode(ids));
        }
    }

    [Fact]
    public void TokenizerJsonOfTheSameModelEncodesLikeSpmEncode()
    {
        // hf-llama/tokenizer.json is sp-llama/tokenizer.model as transformers' LlamaConverter writes it,
        // read by Hugging Face's Rust tokenizers; its "<s> $A" template supplies BOS.
        var dir = Directory.CreateDirectory(Path.Combine(_root, "hf-llama")).FullName;
        File.Copy(Path.Combine(s_fixtures, "hf-llama", "tokenizer.json"), Path.Combine(dir, "tokenizer.json"));
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), """{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}""");
        var tokenizer = HfTokenizer.Load(dir);
        Assert.True(tokenizer.AddBosToken);
        Assert.Equal(1, tokenizer.BosTokenId);
        Assert.Equal([2], tokenizer.EosTokenIds);

        var samples = File.ReadAllLines(Path.Combine(s_fixtures, "sentencepiece-samples.txt"));
        var expected = File.ReadAllLines(Path.Combine(s_fixtures, "sp-llama", "expected-ids.txt"));
        for (int i = 0; i < samples.Length; i++)
        {
            if (samples[i].Contains("<s>", StringComparison.Ordinal))
            {
                continue; // spm_encode reads "<s>" as text; transformers, as the special token.
            }
            Assert.Equal("1 " + expected[i], string.Join(' ', tokenizer.Encode(samples[i])));
            Assert.Equal(expected[i], string.Join(' ', tokenizer.Encode(samples[i], addBos: false)));
            Assert.Equal(samples[i], tokenizer.Decode(tokenizer.Encode(samples[i])));
        }
    }

    [Fact]
    public void BareModelTakesBosAndEosFromTheModel()
    {
        var tokenizer = HfTokenizer.Load(CopyModel("sp-llama", tokenizerConfig: null));
        Assert.Equal(1, tokenizer.BosTokenId);
        Assert.Equal([2], tokenizer.EosTokenIds);
        Assert.True(tokenizer.AddBosToken);
        Assert.Equal(1, tokenizer.Encode("Jesus wept.")[0]);
    }

    [Fact]
    public void DecodeKeepsSpecialTokensOnlyWhenAsked()
    {
        var tokenizer = HfTokenizer.Load(CopyModel("sp-llama", tokenizerConfig: """{"bos_token": "<s>", "eos_token": "</s>"}"""));
        var ids = tokenizer.Encode("And God saw the light").Append(2).ToArray();
        Assert.Equal("And God saw the light", tokenizer.Decode(ids));
        var kept = tokenizer.Decode(ids, skipSpecialTokens: false);
        Assert.StartsWith("<s>", kept, StringComparison.Ordinal);
        Assert.EndsWith("</s>", kept, StringComparison.Ordinal);
        Assert.Contains("And God saw the light", kept, StringComparison.Ordinal);
    }

    private string CopyModel(string model, string? tokenizerConfig)
    {
        var dir = Directory.CreateDirectory(Path.Combine(_root, Guid.NewGuid().ToString("N"))).FullName;
        File.Copy(Path.Combine(s_fixtures, model, "tokenizer.model"), Path.Combine(dir, "tokenizer.model"));
        if (tokenizerConfig is not null)
        {
            File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), tokenizerConfig);
        }
        return dir;
    }
}
