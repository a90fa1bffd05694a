using FrugalLM.Tokenization;

namespace FrugalLM.Tests.Tokenization;

/// <summary>
/// GPT-2's tokenizer written once by <see cref="Gpt2TokenizerFiles"/> into a temporary folder, and a
/// second folder holding only its vocab.json + merges.txt + configs (the path without tokenizer.json).
/// </summary>
public sealed class Gpt2FolderFixture : IDisposable
{
    public Gpt2FolderFixture()
    {
        Root = Directory.CreateTempSubdirectory("frugal-gpt2-").FullName;
        FullDir = Path.Combine(Root, "full");
        Gpt2TokenizerFiles.WriteTo(FullDir);
        VocabMergesDir = Path.Combine(Root, "vocab-merges");
        Directory.CreateDirectory(VocabMergesDir);
        foreach (var file in new[] { "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json" })
        {
            File.Copy(Path.Combine(FullDir, file), Path.Combine(VocabMergesDir, file));
        }
        FromTokenizerJson = HfTokenizer.Load(FullDir);
        FromVocabMerges = HfTokenizer.Load(VocabMergesDir);
    }

    public string Root { get; }

    /// <summary>Everything <see cref="Gpt2TokenizerFiles.WriteTo"/> wrote.</summary>
    public string FullDir { get; }

    /// <summary>The same without tokenizer.json.</summary>
    public string VocabMergesDir { get; }

    public HfTokenizer FromTokenizerJson { get; }

    public HfTokenizer FromVocabMerges { get; }

    /// <summary>A fresh folder under the fixture's root, for tests that write their own files.</summary>
    public string NewDir()
    {
        var dir = Path.Combine(Root, Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }

    public void Dispose() => Directory.Delete(Root, recursive: true);
}

[CollectionDefinition(Name)]
public sealed class Gpt2FolderCollection : ICollectionFixture<Gpt2FolderFixture>
{
    public const string Name = "GPT-2 tokenizer folder";
}
