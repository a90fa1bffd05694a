using System.Text.Json.Nodes;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Quantization;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Quantization;

public sealed class Int8CheckpointTests
{
    public Int8CheckpointTests() => TestSupport.Init();

    [Fact]
    public void SavedInt8FolderHasBitsandbytesLayoutAndReloadsToTheSameOutputs()
    {
        using var dir = TestSupport.TempDir();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 8, std: 0.2);
        var options = new Int8Options { Threshold = 6.0 };
        var quantized = Int8Quantization.Apply(model, options);
        Assert.Equal(2 * 7, quantized.Count);
        HfCheckpoint.Save(model, dir.Path, ScalarType.BFloat16, extraConfig: Int8Checkpoint.ConfigFields(options));

        using (var file = SafeTensorsFile.Open(Path.Combine(dir.Path, "model.safetensors")))
        {
            Assert.Equal("I8", file.Get("model.layers.0.self_attn.q_proj.weight").Dtype);
            Assert.Equal("F32", file.Get("model.layers.0.self_attn.q_proj.SCB").Dtype);
            Assert.Equal("U8", file.Get("model.layers.0.self_attn.q_proj.weight_format").Dtype);
            Assert.Empty(file.Get("model.layers.0.self_attn.q_proj.weight_format").Shape);
            Assert.Equal("BF16", file.Get("lm_head.weight").Dtype); // skipped: stays a float layer
            Assert.Equal("BF16", file.Get("model.norm.weight").Dtype);
        }
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "config.json")))!["quantization_config"]!;
        Assert.Equal("bitsandbytes", config["quant_method"]!.GetValue<string>());
        Assert.True(config["load_in_8bit"]!.GetValue<bool>());
        Assert.Equal(6.0, config["llm_int8_threshold"]!.GetValue<double>());

        using var reloaded = HfCheckpoint.LoadModel(dir.Path);
        Assert.IsType<Int8Linear>(ModuleTree.Get(reloaded, "model.layers.1.mlp.down_proj"));
        Assert.IsNotType<Int8Linear>(ModuleTree.Get(reloaded, "lm_head"));
        using var original = HfCheckpoint.LoadModel(dir.Path);
        using var ids = randint(0, 101, [2, 9], dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        using var a = reloaded.forward(ids);
        using var b = original.forward(ids);
        Assert.True(a.Same(b));
        // The int8 layers hold exactly what the in-memory quantized model held.
        var expected = ((Int8Linear)ModuleTree.Get(model, "model.layers.1.mlp.down_proj")).Weight;
        Assert.True(((Int8Linear)ModuleTree.Get(reloaded, "model.layers.1.mlp.down_proj")).Weight.Same(expected));
    }

    [Fact]
    public void QuantizingWhileLoadingEqualsQuantizingTheLoadedFloatModel()
    {
        using var dir = TestSupport.TempDir();
        using (var source = new LlamaForCausalLM(TestSupport.TinyConfig()))
        {
            source.InitializeWeights(seed: 9, std: 0.2);
            HfCheckpoint.Save(source, dir.Path);
        }
        var options = new Int8Options { Threshold = 4.0 };
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        using var onLoad = checkpoint.CreateModel(quantize: options);
        using var afterLoad = checkpoint.CreateModel();
        Int8Quantization.Apply(afterLoad, options);
        foreach (var path in new[] { "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj" })
        {
            var a = (Int8Linear)ModuleTree.Get(onLoad, path);
            var b = (Int8Linear)ModuleTree.Get(afterLoad, path);
            Assert.True(a.Weight.Same(b.Weight), path);
            Assert.True(a.Scb.Same(b.Scb), path);
            Assert.Equal(4.0, a.Threshold);
        }
        using var ids = randint(0, 101, [1, 7], dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        Assert.True(onLoad.forward(ids).Same(afterLoad.forward(ids)));
    }

    [Fact]
    public void FourBitFoldersAreRefusedClearly()
    {
        using var dir = TestSupport.TempDir();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: 1);
        HfCheckpoint.Save(model, dir.Path, extraConfig: new JsonObject { ["quantization_config"] = new JsonObject { ["quant_method"] = "bitsandbytes", ["load_in_4bit"] = true } });
        var error = Assert.Throws<CheckpointFormatException>(() => HfCheckpoint.LoadModel(dir.Path).Dispose());
        Assert.Contains("4-bit", error.Message);
        Assert.Contains("config.json", error.Message);
    }
}
