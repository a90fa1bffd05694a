using FrugalLM.Lora;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Quantization;
using FrugalLM.Training;
using TorchSharp;
using static FrugalLM.Tests.Lora.LoraTestSupport;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Lora;

/// <summary>LoRA on a whole model: targets, freezing, a training step, several adapters, merging.</summary>
public sealed class LoraModelTests
{
    public LoraModelTests() => TestSupport.Init();

    private static LlamaForCausalLM Model(long seed = 3)
    {
        var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed, std: 0.1);
        return model;
    }

    private static Tensor Ids(long seed) => randint(0, 101, [2, 9], dtype: ScalarType.Int64, generator: new Generator((ulong)seed));

    [Fact]
    public void FreshAdapterLeavesLogitsUnchangedAndFreezesTheBase()
    {
        using var model = Model();
        using var ids = Ids(1);
        using var before = Logits(model, ids);
        var names = model.named_parameters().Select(p => p.name).ToList();
        var lora = LoraModel.Apply(model, new LoraConfig { Rank = 4, Alpha = 8, Targets = LoraTargets.Parse("q_proj,v_proj") }, seed: 7);
        using var after = Logits(model, ids);
        Assert.True(after.Same(before));
        // PEFT's names: the wrapped weight moves under base_layer, the factors sit beside it.
        var now = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        Assert.Contains("model.layers.0.self_attn.q_proj.base_layer.weight", now.Keys);
        Assert.Contains("model.layers.1.self_attn.v_proj.lora_A.default.weight", now.Keys);
        Assert.Contains("model.layers.1.self_attn.v_proj.lora_B.default.weight", now.Keys);
        Assert.Contains("model.layers.0.self_attn.k_proj.weight", now.Keys);
        Assert.Equal(names.Count + 8, now.Count);
        Assert.All(now.Where(p => !p.Key.Contains(".lora_")), p => Assert.False(p.Value.requires_grad, p.Key));
        Assert.All(now.Where(p => p.Key.Contains(".lora_")), p => Assert.True(p.Value.requires_grad, p.Key));
        // q_proj [64, 64] and v_proj [32, 64] (2 KV heads of 16) in 2 layers, rank 4: A [4, 64], B [out, 4].
        long expected = 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4);
        Assert.Equal(expected, lora.TrainableParameters);
        Assert.Equal(expected, lora.AdapterParameters("default"));
        Assert.Contains("4 layers (q_proj, v_proj)", lora.ToString());
    }

    [Fact]
    public void OnlyAdapterParametersChangeInATrainingStep()
    {
        using var model = Model();
        var lora = LoraModel.Apply(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1, Targets = LoraTargets.AllLinear }, seed: 11);
        RandomizeB(lora, "default", seed: 12, std: 0.05);
        var before = Snapshot(model);
        var random = new Random(5);
        var tokens = Enumerable.Range(0, 4 * 17).Select(_ => random.Next(101)).ToArray();
        var corpus = TokenCorpus.FromTokens(tokens, 16);
        var trainer = new Trainer(model, corpus, new TrainOptions { MicroBatch = 4, LearningRate = 1e-2 });
        Assert.All(trainer.Optimizer.Groups.SelectMany(g => g.Parameters), p => Assert.Contains(".lora_", p.Name));
        model.train();
        trainer.Step(corpus.TrainBatches(4, seed: 0, epoch: 0).Take(1).ToList());
        int changed = 0;
        foreach (var (name, parameter) in model.named_parameters())
        {
            if (name.Contains(".lora_"))
            {
                changed += parameter.Same(before[name]) ? 0 : 1;
            }
            else
            {
                Assert.True(parameter.Same(before[name]), $"base parameter {name} changed");
            }
        }
        // Every A and B of the 14 wrapped layers moved.
        Assert.Equal(2 * 14, changed);
    }

    [Fact]
    public void TargetsByNameSuffixRegexAllLinearExcludeAndLayers()
    {
        IReadOnlyList<string> Wrapped(LoraConfig config)
        {
            using var model = Model();
            return LoraModel.Apply(model, config).Layers.Select(l => l.Path).ToList();
        }
        var all = Wrapped(new LoraConfig { Targets = LoraTargets.AllLinear });
        Assert.Equal(14, all.Count);
        Assert.DoesNotContain("lm_head", all);
        Assert.Equal(["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"], Wrapped(new LoraConfig { Targets = LoraTargets.Parse("self_attn.o_proj") }));
        Assert.Equal(["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"],
            Wrapped(new LoraConfig { Targets = LoraTargets.Parse(@"re:model\.layers\.1\.mlp\.(up|down)_proj") }));
        Assert.Equal(12, Wrapped(new LoraConfig { Targets = LoraTargets.AllLinear, Exclude = LoraTargets.FromNames(["gate_proj"]) }).Count);
        Assert.Equal(["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj"],
            Wrapped(new LoraConfig { Targets = LoraTargets.Parse("q_proj,gate_proj"), LayersToTransform = [1] }));
        Assert.Contains("lm_head", Wrapped(new LoraConfig { Targets = LoraTargets.Parse("lm_head,q_proj"), Rank = 2 }));
    }

    [Fact]
    public void ClearErrorsForUnmatchedTargetsAndBadRanks()
    {
        using var model = Model();
        var none = Assert.Throws<ArgumentException>(() => LoraModel.Apply(model, new LoraConfig { Targets = LoraTargets.Parse("query") }));
        Assert.True(none.Message.Contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"), none.Message);
        var typo = Assert.Throws<ArgumentException>(() => LoraModel.Apply(model, new LoraConfig { Targets = LoraTargets.Parse("q_proj,v_prj") }));
        Assert.Contains("'v_prj'", typo.Message);
        var rank = Assert.Throws<ArgumentException>(() => LoraModel.Apply(model, new LoraConfig { Rank = 40, Targets = LoraTargets.Parse("v_proj") }));
        Assert.Contains("model.layers.0.self_attn.v_proj", rank.Message);
        Assert.Contains("[32, 64]", rank.Message);
        Assert.Throws<ArgumentException>(() => LoraModel.Apply(model, new LoraConfig { Rank = 0 }));
        Assert.Throws<ArgumentException>(() => LoraModel.Apply(model, new LoraConfig { Dropout = 1 }));
        Assert.Throws<ArgumentException>(() => LoraTargets.Parse("re:(unclosed"));
        // A failed call leaves the model as it was.
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lora_"));
        Assert.All(model.parameters(), p => Assert.True(p.requires_grad));
    }

    [Fact]
    public void SeveralAdaptersSwitchDisableAndRemove()
    {
        using var model = Model();
        using var ids = Ids(2);
        using var baseLogits = Logits(model, ids);
        var lora = LoraModel.Apply(model, new LoraConfig { Rank = 4, Targets = LoraTargets.Parse("q_proj,v_proj") }, "a", seed: 1);
        lora.AddAdapter("b", new LoraConfig { Rank = 2, Targets = LoraTargets.Parse("v_proj,down_proj") }, seed: 2);
        RandomizeB(lora, "a", 3);
        RandomizeB(lora, "b", 4);
        Assert.Equal(["a", "b"], lora.Adapters);
        Assert.Equal("a", lora.ActiveAdapter);
        using var logitsA = Logits(model, ids);
        lora.SetActive("b");
        Assert.All(model.named_parameters(), p => Assert.Equal(p.name.Contains(".lora_A.b.") || p.name.Contains(".lora_B.b."), p.parameter.requires_grad));
        using var logitsB = Logits(model, ids);
        Assert.True(TensorAssert.RelativeError(logitsA, baseLogits) > 1e-3);
        Assert.True(TensorAssert.RelativeError(logitsB, baseLogits) > 1e-3);
        Assert.True(TensorAssert.RelativeError(logitsB, logitsA) > 1e-3);
        lora.Disable();
        Assert.True(Logits(model, ids).Same(baseLogits));
        lora.Enable();
        Assert.True(Logits(model, ids).Same(logitsB));
        lora.SetActive("a");
        Assert.True(Logits(model, ids).Same(logitsA));
        lora.RemoveAdapter("a");
        Assert.Equal(["b"], lora.Adapters);
        Assert.Null(lora.ActiveAdapter);
        Assert.True(Logits(model, ids).Same(baseLogits));
        // q_proj carried only "a": it is a plain linear again, under its HF name.
        Assert.Contains(model.named_parameters(), p => p.name == "model.layers.0.self_attn.q_proj.weight");
        lora.SetActive("b");
        Assert.True(Logits(model, ids).Same(logitsB));
        Assert.Throws<ArgumentException>(() => lora.SetActive("a"));
        Assert.Throws<ArgumentException>(() => lora.AddAdapter("b", new LoraConfig()));
    }

    [Fact]
    public void MergeUnmergeAndMergeAndUnloadOnAModel()
    {
        using var model = Model();
        using var ids = Ids(3);
        var lora = LoraModel.Apply(model, new LoraConfig { Rank = 8, Alpha = 16, Targets = LoraTargets.AllLinear }, seed: 5);
        RandomizeB(lora, "default", 6);
        var weights = lora.Layers.ToDictionary(l => l.Path, l => ((TorchSharp.Modules.Linear)l.Layer.BaseLayer).weight.detach().clone());
        using var unmerged = Logits(model, ids);
        lora.Merge();
        Assert.True(lora.Merged);
        using var merged = Logits(model, ids);
        // Same function, other summation order: fp32 rounding through two layers, ~1e-6.
        Assert.True(TensorAssert.RelativeError(merged, unmerged) < 1e-5);
        lora.Unmerge();
        foreach (var (path, layer) in lora.Layers)
        {
            double error = TensorAssert.RelativeError(((TorchSharp.Modules.Linear)layer.BaseLayer).weight, weights[path]);
            Assert.True(error <= 1e-6, $"{path}: relative error {error:E2} after merge + unmerge");
        }
        lora.MergeAndUnload();
        Assert.Empty(lora.Adapters);
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lora_") || p.name.Contains("base_layer"));
        Assert.True(TensorAssert.RelativeError(Logits(model, ids), unmerged) < 1e-5);
    }

    [Fact]
    public void MergeIntoAnInt8ModelReportsEveryLayerAndCannotBeUndone()
    {
        using var model = Model();
        var quantized = Int8Quantization.Apply(model);
        using var ids = Ids(4);
        using var baseLogits = Logits(model, ids);
        var lora = LoraModel.Apply(model, new LoraConfig { Rank = 4, Alpha = 8, Targets = LoraTargets.Parse("q_proj,v_proj,lm_head") }, seed: 8);
        RandomizeB(lora, "default", 9);
        using var unmerged = Logits(model, ids);
        var report = lora.Merge();
        Assert.Equal("default", report.Adapter);
        Assert.Equal(5, report.Layers);
        // lm_head stays a float Linear under int8 quantization: it takes the sum exactly and is not listed.
        Assert.Equal(lora.Layers.Where(l => quantized.Contains(l.Path)).Select(l => l.Path), report.Requantized.Select(r => r.Path));
        Assert.Equal(4, report.Requantized.Count);
        Assert.All(report.Requantized, r => Assert.InRange(r.RelativeError, 1e-4, 1e-2));
        Assert.Equal(report.Requantized.Max(r => r.RelativeError), report.MaxRelativeError);
        // Each of the 4 requantized layers moves its output by about e_w + e_x ≈ 2·e_w relative: its weight's
        // rounding, and the int8 rounding of the activations, which the unmerged adapter path (float) did not
        // have (e_x ≈ e_w for Gaussian rows, see LoraLinearTests). To first order the moves add along the
        // residual stream: 4 · 2 · max e_w (measured: 2.5e-2 against 5.0e-2), far less than the adapter moved them.
        using var merged = Logits(model, ids);
        double error = TensorAssert.RelativeError(merged, unmerged);
        Assert.True(error < 8 * report.MaxRelativeError, $"merged vs unmerged logits {error:E2}, max requantization error {report.MaxRelativeError:E2}");
        Assert.True(TensorAssert.RelativeError(baseLogits, unmerged) > 10 * error);
        // Undoing it is refused before anything changes.
        Assert.Throws<NotSupportedException>(lora.Unmerge);
        Assert.Throws<NotSupportedException>(lora.Disable);
        Assert.Throws<NotSupportedException>(lora.Unload);
        Assert.Throws<NotSupportedException>(() => lora.RemoveAdapter("default"));
        Assert.True(lora.Merged);
        Assert.True(lora.Layers.All(l => l.Layer.MergedAdapter == "default"));
        Assert.True(Logits(model, ids).Same(merged));
        // Unloading after the merge keeps the requantized int8 layers under their HF names.
        var again = lora.MergeAndUnload();
        Assert.Equal(0, again.Layers);
        Assert.Empty(lora.Adapters);
        Assert.IsType<Int8Linear>(ModuleTree.Get(model, "model.layers.0.self_attn.q_proj"));
        Assert.True(Logits(model, ids).Same(merged));
    }

    [Fact]
    public void BiasSettingsMakeBiasesTrainable()
    {
        var config = TestSupport.TinyConfig() with { AttentionBias = true };
        using var model = new LlamaForCausalLM(config);
        model.InitializeWeights(1);
        var lora = LoraModel.Apply(model, new LoraConfig { Targets = LoraTargets.Parse("q_proj"), Bias = LoraBias.LoraOnly });
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
        Assert.Contains("model.layers.0.self_attn.q_proj.base_layer.bias", trainable);
        Assert.DoesNotContain("model.layers.0.self_attn.k_proj.bias", trainable);
        lora.AddAdapter("all", new LoraConfig { Targets = LoraTargets.Parse("v_proj"), Bias = LoraBias.All });
        lora.SetActive("all");
        trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
        Assert.Contains("model.layers.0.self_attn.k_proj.bias", trainable);
        Assert.Contains("model.layers.1.self_attn.q_proj.base_layer.bias", trainable);
        Assert.DoesNotContain("model.layers.0.self_attn.q_proj.lora_A.default.weight", trainable);
    }
}
