using FrugalLM.IO;
using FrugalLM.Models.Llama;
using static TorchSharp.torch;

namespace FrugalLM.Tests.IO;

public sealed class HfCheckpointTests
{
    public HfCheckpointTests() => TestSupport.Init();

    [Theory]
    [InlineData(false, 1L << 30)]
    [InlineData(true, 1L << 30)]
    [InlineData(false, 40_000L)]
    public void SaveThenLoadGivesIdenticalLogits(bool tied, long shardBytes)
    {
        using var dir = TestSupport.TempDir();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig(tied));
        model.InitializeWeights(seed: 11, std: 0.2);
        HfCheckpoint.Save(model, dir.Path, maxShardBytes: shardBytes);
        bool sharded = File.Exists(Path.Combine(dir.Path, HfCheckpoint.IndexFile));
        Assert.Equal(shardBytes < 100_000, sharded);
        using var loaded = HfCheckpoint.LoadModel(dir.Path);
        using var ids = randint(0, model.Config.VocabSize, [2, 9], dtype: ScalarType.Int64);
        using var a = model.forward(ids);
        using var b = loaded.forward(ids);
        Assert.True(a.Same(b));
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        Assert.Equal(tied, !checkpoint.TensorNames.Contains("lm_head.weight"));
    }

    [Fact]
    public void LoadsInRequestedDtype()
    {
        using var dir = TestSupport.TempDir();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 5);
        HfCheckpoint.Save(model, dir.Path, dtype: ScalarType.BFloat16);
        Assert.Contains("\"bfloat16\"", File.ReadAllText(Path.Combine(dir.Path, "config.json")));
        using var loaded = HfCheckpoint.LoadModel(dir.Path, ScalarType.Float32);
        var original = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in loaded.named_parameters())
        {
            Assert.Equal(ScalarType.Float32, p.dtype);
            Assert.True(p.Same(original[name].to(ScalarType.BFloat16).to(ScalarType.Float32)), name);
        }
    }

    [Fact]
    public void ShapeMismatchNamesFileTensorAndBothShapes()
    {
        using var dir = TestSupport.TempDir();
        using (var model = new LlamaForCausalLM(TestSupport.TinyConfig()))
        {
            model.InitializeWeights(seed: 1);
            HfCheckpoint.Save(model, dir.Path);
        }
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        using var other = new LlamaForCausalLM(TestSupport.TinyConfig() with { IntermediateSize = 160 });
        var error = Assert.Throws<CheckpointFormatException>(() => checkpoint.LoadInto(other));
        Assert.Contains("model.safetensors", error.Message);
        Assert.Contains("model.layers.0.mlp.up_proj.weight", error.Message);
        Assert.Contains("[144, 64]", error.Message);
        Assert.Contains("[160, 64]", error.Message);
    }

    [Fact]
    public void MissingAndUnexpectedKeysAreReported()
    {
        using var dir = TestSupport.TempDir();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 1);
        var tensors = model.named_parameters().Where(p => p.name != "model.norm.weight").Select(p => (p.name, (Tensor)p.parameter)).ToList();
        using var extra = randn(3);
        tensors.Add(("model.extra.weight", extra));
        SafeTensors.Write(Path.Combine(dir.Path, "model.safetensors"), tensors);
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), model.Config.ToJson().ToJsonString());
        var error = Assert.Throws<CheckpointFormatException>(() => HfCheckpoint.LoadModel(dir.Path).Dispose());
        Assert.Contains("missing tensor 'model.norm.weight'", error.Message);
        Assert.Contains("unexpected tensor 'model.extra.weight'", error.Message);
    }

    [Fact]
    public void UnsupportedArchitectureIsAClearError()
    {
        using var dir = TestSupport.TempDir();
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), """{"model_type": "gpt2", "n_embd": 768}""");
        var error = Assert.Throws<FrugalLM.Planning.ModelConfigException>(() => HfCheckpoint.Open(dir.Path));
        Assert.Contains("unsupported architecture 'gpt2'", error.Message);
    }
}
