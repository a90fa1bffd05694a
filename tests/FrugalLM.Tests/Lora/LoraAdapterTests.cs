using System.Diagnostics;
using System.Text.Json.Nodes;
using FrugalLM.IO;
using FrugalLM.Lora;
using FrugalLM.Models.Llama;
using TorchSharp;
using static FrugalLM.Tests.Lora.LoraTestSupport;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Lora;

/// <summary>
/// PEFT's adapter folder format: round trips, the fixtures of tools/make_peft_fixtures.py (PEFT's layout and
/// LoRA math in PyTorch 1.13), key variants, mismatches, and a C#-written adapter checked by that script.
/// </summary>
public sealed class LoraAdapterTests
{
    // Logits of a C# model against the PyTorch reference: fp32 on both sides with different kernels; the
    // fixtures' own fp32-vs-float64 gap is ~3e-7 (printed by the script), so 1e-4 leaves a wide margin.
    private const double LogitTolerance = 1e-4;

    // What PEFT 0.14's LoraConfig.to_dict() returns: the exact field set of adapter_config.json.
    private static readonly string[] PeftFields =
    [
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "eva_config", "exclude_modules", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
        "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora",
    ];

    public LoraAdapterTests() => TestSupport.Init();

    private static string Fixtures => Path.Combine(TestSupport.RepoRoot, "tests", "fixtures", "peft");

    private static string FixtureModel => Path.Combine(Fixtures, "model");

    public static TheoryData<string, int> PeftAdapters => new()
    {
        { "adapter-qv", 4 },
        { "adapter-rslora-patterns", 7 },
        { "adapter-layer1", 2 },
    };

    [Theory]
    [MemberData(nameof(PeftAdapters))]
    public void PeftAdaptersLoadToThePyTorchLogits(string adapter, int layers)
    {
        using var model = HfCheckpoint.LoadModel(FixtureModel);
        using var expected = SafeTensorsFile.Open(Path.Combine(Fixtures, "expected.safetensors"));
        using var ids = expected.Load("input_ids");
        using var baseReference = expected.Load("logits.base");
        using var reference = expected.Load("logits." + adapter);
        using var baseLogits = Logits(model, ids);
        Assert.True(TensorAssert.RelativeError(baseLogits, baseReference) <= LogitTolerance);
        var lora = LoraAdapter.Load(Path.Combine(Fixtures, adapter), model);
        Assert.Equal(layers, lora.LayersOf("default").Count);
        using var logits = Logits(model, ids);
        double error = TensorAssert.RelativeError(logits, reference);
        Assert.True(error <= LogitTolerance, $"{adapter}: logits relative error {error:E2}");
        // The adapter moves the logits far more than the tolerance, so a wrong scale or layer would show.
        Assert.True(TensorAssert.RelativeError(baseLogits, reference) > 100 * LogitTolerance);
    }

    [Fact]
    public void PeftConfigFieldsBecomeTheLoraConfig()
    {
        var info = LoraAdapter.ReadConfig(Path.Combine(Fixtures, "adapter-rslora-patterns"));
        Assert.Equal("tests/fixtures/peft/model", info.BaseModelNameOrPath);
        var config = info.Config;
        Assert.Equal((8, 16.0, true, LoraTargetKind.Regex), (config.Rank, config.Alpha, config.UseRsLora, config.Targets.Kind));
        Assert.Equal(["model.layers.1.mlp.up_proj"], config.Exclude!.Names);
        Assert.Equal((2, 16.0), config.RankAndAlphaFor("model.layers.0.mlp.down_proj"));
        Assert.Equal((8, 4.0), config.RankAndAlphaFor("model.layers.1.self_attn.o_proj"));
        Assert.Equal((8, 16.0), config.RankAndAlphaFor("model.layers.0.self_attn.o_proj"));
        var layer1 = LoraAdapter.ReadConfig(Path.Combine(Fixtures, "adapter-layer1")).Config;
        Assert.Equal([1], layer1.LayersToTransform!);
        Assert.Equal(["layers"], layer1.LayersPattern!);
        Assert.Equal(6.5, layer1.Alpha);
    }

    [Fact]
    public void ReadsConfigsOfNewerPeftVersions()
    {
        // Fields PEFT added after 0.14, at their defaults (as 0.17-0.20 write them), are ignored, as PEFT does;
        // a non-default one that changes the computation is refused by name.
        using var dir = TestSupport.TempDir();
        var config = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures, "adapter-qv", LoraAdapter.ConfigFile)))!;
        config["corda_config"] = null;
        config["trainable_token_indices"] = null;
        config["use_qalora"] = false;
        config["qalora_group_size"] = 16;
        config["target_parameters"] = null;
        config["ensure_weight_tying"] = false;
        config["peft_version"] = "0.18.0";
        File.WriteAllText(Path.Combine(dir.Path, LoraAdapter.ConfigFile), config.ToJsonString());
        Assert.Equal(["q_proj", "v_proj"], LoraAdapter.ReadConfig(dir.Path).Config.Targets.Names);
        config["target_parameters"] = new JsonArray("experts.down_proj");
        File.WriteAllText(Path.Combine(dir.Path, LoraAdapter.ConfigFile), config.ToJsonString());
        Assert.Contains("target_parameters", Assert.Throws<CheckpointFormatException>(() => LoraAdapter.ReadConfig(dir.Path)).Message);
    }

    [Fact]
    public void SavedAdapterReloadsToIdenticalOutputsInPeftLayout()
    {
        using var dir = TestSupport.TempDir();
        using var ids = randint(0, 101, [2, 7], dtype: ScalarType.Int64);
        Tensor trained;
        using (var model = new LlamaForCausalLM(TestSupport.TinyConfig()))
        {
            model.InitializeWeights(4, std: 0.1);
            var lora = LoraModel.Apply(model, new LoraConfig { Rank = 4, Alpha = 32, Dropout = 0.05, Targets = LoraTargets.Parse("q_proj,v_proj") }, seed: 1);
            RandomizeB(lora, "default", 2);
            LoraAdapter.Save(lora, dir.Path, baseModelNameOrPath: "models/tiny");
            trained = Logits(model, ids);
        }
        using var fresh = new LlamaForCausalLM(TestSupport.TinyConfig());
        fresh.InitializeWeights(4, std: 0.1);
        var loaded = LoraAdapter.Load(dir.Path, fresh);
        Assert.Equal("default", loaded.ActiveAdapter);
        Assert.True(Logits(fresh, ids).Same(trained));

        using var file = SafeTensorsFile.Open(Path.Combine(dir.Path, LoraAdapter.WeightsFile));
        Assert.Equal("pt", file.Metadata["format"]);
        Assert.Equal(8, file.Tensors.Count);
        var a = file.Get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
        var b = file.Get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
        Assert.Equal(("F32", "[4, 64]", "F32", "[32, 4]"), (a.Dtype, a.ShapeText, b.Dtype, b.ShapeText));

        var text = File.ReadAllText(Path.Combine(dir.Path, LoraAdapter.ConfigFile));
        var json = (JsonObject)JsonNode.Parse(text)!;
        Assert.Equal(PeftFields, json.Select(kv => kv.Key).ToArray());
        Assert.StartsWith("{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": \"models/tiny\",", text);
        Assert.True(text.Contains("\n  \"lora_alpha\": 32,\n  \"lora_bias\": false,\n  \"lora_dropout\": 0.05,\n"), text);
        Assert.Contains("\n  \"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],\n  \"task_type\": \"CAUSAL_LM\",", text);
        Assert.EndsWith("\"use_rslora\": false\n}", text);
        Assert.Equal(("LORA", 4, true), ((string)json["peft_type"]!, (int)json["r"]!, (bool)json["inference_mode"]!));
    }

    [Fact]
    public void AcceptsPeftKeyVariants()
    {
        using var expected = SafeTensorsFile.Open(Path.Combine(Fixtures, "expected.safetensors"));
        using var ids = expected.Load("input_ids");
        using var reference = expected.Load("logits.adapter-qv");
        var source = Path.Combine(Fixtures, "adapter-qv");
        Func<string, string>[] variants =
        [
            key => key.Replace(".weight", ".default.weight"),                  // adapter name kept
            key => key["base_model.model.".Length..],                          // transformers' integration: no prefix
            key => key.Replace("base_model.model.model.", "base_model.model."), // path relative to the decoder stack
        ];
        foreach (var rename in variants)
        {
            using var dir = TestSupport.TempDir();
            File.Copy(Path.Combine(source, LoraAdapter.ConfigFile), Path.Combine(dir.Path, LoraAdapter.ConfigFile));
            using (var file = SafeTensorsFile.Open(Path.Combine(source, LoraAdapter.WeightsFile)))
            {
                SafeTensors.Write(Path.Combine(dir.Path, LoraAdapter.WeightsFile), file.Tensors.Keys.Select(k => (rename(k), file.Load(k))).ToList());
            }
            using var model = HfCheckpoint.LoadModel(FixtureModel);
            LoraAdapter.Load(dir.Path, model);
            Assert.True(TensorAssert.RelativeError(Logits(model, ids), reference) <= LogitTolerance, rename("base_model.model.model.x.lora_A.weight"));
        }
    }

    [Fact]
    public void RejectsAnAdapterWhoseShapesDoNotMatchTheModel()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        var error = Assert.Throws<CheckpointFormatException>(() => LoraAdapter.Load(Path.Combine(Fixtures, "adapter-qv"), model));
        Assert.Contains(LoraAdapter.WeightsFile, error.Message);
        Assert.Contains("'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape [4, 32] but the model expects [4, 64]", error.Message);
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lora_"));
    }

    [Fact]
    public void RejectsAnAdapterWhoseTargetsDoNotMatchItsWeights()
    {
        using var dir = TestSupport.TempDir();
        var source = Path.Combine(Fixtures, "adapter-qv");
        File.Copy(Path.Combine(source, LoraAdapter.WeightsFile), Path.Combine(dir.Path, LoraAdapter.WeightsFile));
        var config = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(source, LoraAdapter.ConfigFile)))!;
        config["target_modules"] = new JsonArray("q_proj", "k_proj");
        File.WriteAllText(Path.Combine(dir.Path, LoraAdapter.ConfigFile), config.ToJsonString());
        using var model = HfCheckpoint.LoadModel(FixtureModel);
        var error = Assert.Throws<CheckpointFormatException>(() => LoraAdapter.Load(dir.Path, model));
        Assert.Contains("'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight' is for 'model.layers.0.self_attn.v_proj', which the adapter's target_modules do not select", error.Message);
        Assert.Contains("missing tensor 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'", error.Message);
    }

    [Fact]
    public void ExplainsMissingSafetensorsAndUnsupportedFeatures()
    {
        using var dir = TestSupport.TempDir();
        var configText = File.ReadAllText(Path.Combine(Fixtures, "adapter-qv", LoraAdapter.ConfigFile));
        File.WriteAllText(Path.Combine(dir.Path, LoraAdapter.ConfigFile), configText);
        File.WriteAllBytes(Path.Combine(dir.Path, LoraAdapter.PickleWeightsFile), [0x80, 0x02]);
        using var model = HfCheckpoint.LoadModel(FixtureModel);
        var missing = Assert.Throws<CheckpointFormatException>(() => LoraAdapter.Load(dir.Path, model));
        Assert.Contains("adapter_model.bin", missing.Message);
        Assert.Contains("safe_serialization=True", missing.Message);
        File.WriteAllText(Path.Combine(dir.Path, LoraAdapter.ConfigFile), configText.Replace("\"use_dora\": false", "\"use_dora\": true"));
        var dora = Assert.Throws<CheckpointFormatException>(() => LoraAdapter.ReadConfig(dir.Path));
        Assert.Contains("DoRA", dora.Message);
        var noFolder = Assert.Throws<CheckpointFormatException>(() => LoraAdapter.Load(Path.Combine(dir.Path, "nothing"), model));
        Assert.Contains("not found", noFolder.Message);
    }

    [Fact]
    public void NeverSavesAnEmptyAdapter()
    {
        using var dir = TestSupport.TempDir();
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        var folder = Path.Combine(dir.Path, "adapter");
        var error = Assert.Throws<InvalidOperationException>(() => LoraAdapter.Save(LoraModel.Of(model), folder));
        Assert.Contains("no adapters", error.Message);
        Assert.False(Directory.Exists(folder));
        var lora = LoraModel.Apply(model, new LoraConfig { Targets = LoraTargets.Parse("q_proj") });
        lora.RemoveAdapter("default");
        Assert.Throws<InvalidOperationException>(() => LoraAdapter.Save(lora, folder));
        Assert.False(Directory.Exists(folder));
    }

    /// <summary>
    /// The reverse direction: an adapter written here (all-linear minus an exclusion, rank-stabilized, a
    /// fractional alpha) is read by tools/make_peft_fixtures.py the way PEFT reads it (exact config fields and
    /// formatting, keys, dtypes, shapes) and gives the logits computed here.
    /// </summary>
    [PythonTorchFact]
    public void CSharpWrittenAdapterLoadsInThePyTorchReference()
    {
        using var dir = TestSupport.TempDir();
        var adapterDir = Path.Combine(dir.Path, "adapter");
        var expectedPath = Path.Combine(dir.Path, "expected.safetensors");
        using var model = HfCheckpoint.LoadModel(FixtureModel);
        var config = new LoraConfig
        {
            Rank = 6,
            Alpha = 12.5,
            Dropout = 0.1,
            UseRsLora = true,
            Targets = LoraTargets.AllLinear,
            Exclude = LoraTargets.FromRegex(@"model\.layers\.0\.mlp\..*"),
        };
        var lora = LoraModel.Apply(model, config, seed: 21);
        RandomizeB(lora, "default", 22);
        LoraAdapter.Save(lora, adapterDir, baseModelNameOrPath: FixtureModel);
        using var ids = randint(0, 64, [2, 10], dtype: ScalarType.Int64, generator: new Generator(23));
        using var logits = Logits(model, ids);
        SafeTensors.Write(expectedPath, [("input_ids", ids), ("logits", logits)]);

        var (exitCode, output) = CheckInPyTorch(adapterDir, expectedPath);
        Assert.True(exitCode == 0, $"the PyTorch check failed:\n{output}");
        // 14 linear layers minus layer 0's three MLP projections.
        Assert.Contains(": 11 LoRA layers", output);
        Assert.EndsWith("OK", output.Trim());

        // The check is not vacuous: logits off by 1e-3 (10x its tolerance) fail it.
        var wrongPath = Path.Combine(dir.Path, "wrong.safetensors");
        using var wrong = logits * 1.001;
        SafeTensors.Write(wrongPath, [("input_ids", ids), ("logits", wrong)]);
        var (wrongExit, wrongOutput) = CheckInPyTorch(adapterDir, wrongPath);
        Assert.True(wrongExit == 1, wrongOutput);
        Assert.Contains("FAIL", wrongOutput);
    }

    private static (int ExitCode, string Output) CheckInPyTorch(string adapterDir, string expectedPath)
    {
        var script = Path.Combine(TestSupport.RepoRoot, "tools", "make_peft_fixtures.py");
        var start = new ProcessStartInfo(PythonTorchFactAttribute.Python, [script, "--check-adapter", adapterDir, "--expected", expectedPath])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        Assert.True(process.WaitForExit(120_000), "the PyTorch check did not finish in 2 minutes");
        return (process.ExitCode, stdout.Result + stderr.Result);
    }
}
