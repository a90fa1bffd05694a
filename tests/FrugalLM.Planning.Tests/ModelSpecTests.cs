using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

public sealed class ModelSpecTests
{
    /// <summary>
    /// Exact parameter counts computed from each preset's published config.json, next to the figure a publication
    /// gives (checked to that figure's last digit). The sources are in <see cref="ModelCatalog"/>:
    /// LLaMA paper Table 2 (6.7B / 13.0B / 32.5B / 65.2B); the HF Hub's safetensors "6.74B" and "69B" for the
    /// Llama 2 7B/70B checkpoints; the Llama 2 paper's 13B; the bf16 total_size of the Llama 3 8B, Llama 3(.1) 70B
    /// and Mistral 7B checkpoint indexes divided by 2 (exact); the OPT paper's 6.7B.
    /// </summary>
    [Theory]
    [InlineData("llama-7b", 6_738_415_616L)]
    [InlineData("llama-13b", 13_015_864_320L)]
    [InlineData("llama-33b", 32_528_943_616L)]
    [InlineData("llama-65b", 65_285_660_672L)]
    [InlineData("llama2-7b", 6_738_415_616L)]
    [InlineData("llama2-13b", 13_015_864_320L)]
    [InlineData("llama2-70b", 68_976_648_192L)]
    [InlineData("llama3-8b", 8_030_261_248L)]
    [InlineData("llama3-70b", 70_553_706_496L)]
    [InlineData("mistral-7b", 7_241_732_096L)]
    [InlineData("opt-6.7b", 6_658_473_984L)]
    public void PresetParameterCountsMatchTheirPublishedFigures(string name, long expected)
    {
        var preset = ModelCatalog.FindPreset(name)!;
        var spec = preset.Spec;
        Assert.Equal(expected, spec.ParameterCount);
        Assert.Equal(expected, spec.Tensors().Sum(t => t.Count));
        double billions = spec.ParameterCount / 1e9;
        Assert.True(Math.Abs(billions - preset.PublishedParameterCount) <= preset.PublishedResolution + 1e-9,
            $"{name}: {billions:F3}B vs published {preset.PublishedParameterCount}B ({preset.PublishedSource})");
        if (spec.Llama is { } llama)
        {
            // An independent path: LlamaConfig's own closed-form count.
            Assert.Equal(llama.ParameterCount, spec.ParameterCount);
        }
    }

    [Fact]
    public void EveryPresetIsPinnedAbove()
    {
        var pinned = typeof(ModelSpecTests).GetMethod(nameof(PresetParameterCountsMatchTheirPublishedFigures))!
            .GetCustomAttributes(typeof(InlineDataAttribute), false).Cast<InlineDataAttribute>()
            .Select(a => (string)a.GetData(null!).First()[0]).ToHashSet();
        Assert.Equal(ModelCatalog.Presets.Select(p => p.Name).ToHashSet(), pinned);
    }

    [Fact]
    public void Opt67bCountsLearnedPositionsBiasesLayerNormsAndATiedHead()
    {
        var spec = ModelCatalog.Resolve("opt-6.7b");
        // embed_tokens 50272 x 4096 = 205,914,112; embed_positions (2048 + 2) x 4096 = 8,396,800.
        // Per layer: q,k,v,out 4 x (4096 x 4096 + 4096) = 67,125,248; fc1 4096 x 16384 + 16384 = 67,125,248;
        // fc2 16384 x 4096 + 4096 = 67,112,960; two LayerNorms 2 x 8192 = 16,384 -> 201,379,840.
        // 32 layers = 6,444,154,880; final LayerNorm 8,192; LM head tied (0).
        Assert.Equal(205_914_112L, spec.EmbeddingParameterCount);
        Assert.Equal(8_396_800L, spec.PositionParameterCount);
        Assert.Equal(201_379_840L, spec.LayerParameterCount);
        Assert.Equal(8_192L, spec.FinalNormParameterCount);
        Assert.Equal(0L, spec.LmHeadParameterCount);
        Assert.Equal(205_914_112L + 8_396_800L + 6_444_154_880L + 8_192L, spec.ParameterCount);
        Assert.Equal(0.1, spec.ResidualDropout);
    }

    [Fact]
    public void GroupedQueryAttentionNarrowsKeyAndValueProjections()
    {
        var spec = ModelCatalog.Resolve("llama2-70b");
        var k = spec.LayerLinears.Single(l => l.Name == "k_proj");
        Assert.Equal((8192, 1024), (k.InFeatures, k.OutFeatures)); // 8 KV heads x 128
        Assert.Equal(1024, spec.KeyValueDim);
    }

    [Fact]
    public void RandomLlamaConfigsAgreeWithLlamaConfigsOwnCount()
    {
        var random = new Random(20231129);
        for (int trial = 0; trial < 50; trial++)
        {
            int kvHeads = random.Next(1, 5), groups = random.Next(1, 4), headDim = 2 * random.Next(1, 9);
            var config = new LlamaConfig
            {
                VocabSize = random.Next(10, 500),
                HiddenSize = random.Next(8, 200),
                IntermediateSize = random.Next(8, 300),
                NumHiddenLayers = random.Next(1, 6),
                NumAttentionHeads = kvHeads * groups,
                NumKeyValueHeads = kvHeads,
                HeadDim = headDim,
                TieWordEmbeddings = random.Next(2) == 0,
                AttentionBias = random.Next(2) == 0,
                MlpBias = random.Next(2) == 0,
            };
            var spec = ModelSpec.FromLlama(config, "random");
            Assert.Equal(config.ParameterCount, spec.ParameterCount);
            Assert.Equal(spec.ParameterCount, spec.Tensors().Sum(t => t.Count));
        }
    }

    [Fact]
    public void TiedEmbeddingsAreCountedOnce()
    {
        var untied = Tiny.Llama();
        var tied = ModelSpec.FromLlama(untied.Llama! with { TieWordEmbeddings = true }, "tied");
        Assert.Equal(untied.ParameterCount - untied.LmHeadParameterCount, tied.ParameterCount);
        Assert.DoesNotContain(tied.Tensors(), t => t.Role == TensorRole.LmHead);
    }

    [Fact]
    public void LoadsLlamaAndOptFoldersAndRefusesOtherArchitectures()
    {
        var dir = Directory.CreateTempSubdirectory("frugal-spec-");
        try
        {
            var llama = Path.Combine(dir.FullName, "tiny-llama");
            Directory.CreateDirectory(llama);
            File.WriteAllText(Path.Combine(llama, "config.json"), Tiny.Llama().Llama!.ToJson().ToJsonString());
            var loaded = ModelCatalog.Resolve(llama);
            Assert.Equal("tiny-llama", loaded.Name);
            Assert.Equal(Tiny.Llama().ParameterCount, loaded.ParameterCount);

            var opt = Path.Combine(dir.FullName, "opt.json");
            File.WriteAllText(opt, ModelCatalog.FindPreset("opt-6.7b")!.ConfigJson);
            Assert.Equal(6_658_473_984L, ModelCatalog.Resolve(opt).ParameterCount);

            var gpt2 = Path.Combine(dir.FullName, "gpt2.json");
            File.WriteAllText(gpt2, """{"model_type":"gpt2","n_embd":768}""");
            var error = Assert.Throws<ModelConfigException>(() => ModelCatalog.Resolve(gpt2));
            Assert.Contains("gpt2", error.Message);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }

    [Fact]
    public void UnknownPresetNamesThePresets()
    {
        var error = Assert.Throws<ModelConfigException>(() => ModelCatalog.Resolve("llama-8b-nonexistent"));
        Assert.Contains("llama-7b", error.Message);
    }

    [Fact]
    public void AliasesResolve()
    {
        Assert.Equal(ModelCatalog.Resolve("llama-7b").ParameterCount, ModelCatalog.Resolve("LLaMA-6B").ParameterCount);
        Assert.Equal(ModelCatalog.Resolve("llama-33b").ParameterCount, ModelCatalog.Resolve("llama-30b").ParameterCount);
    }
}
