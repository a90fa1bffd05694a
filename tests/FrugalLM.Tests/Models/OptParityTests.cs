using System.Globalization;
using FrugalLM.Checkpointing;
using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Models.Opt;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using FrugalLM.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Models;

/// <summary>
/// OPT against an independent PyTorch implementation of transformers' modeling_opt (tools/make_opt_fixtures.py,
/// PyTorch 1.13): logits, one clipped AdamW step through the trainer, a greedy continuation with the KV cache,
/// on a pre-LN tied model and a post-LN model with project_in/project_out (the 350M shape); plus the cache,
/// names, checkpointing, dropout, saving and int8 loading on the same architecture.
/// </summary>
[Collection(nameof(GlobalRandom))]
public sealed class OptParityTests
{
    // Logits: fp32 on both sides with different kernels (SDPA scaling the product, the reference scaling q
    // first); the fixtures' own fp32-vs-fp64 gap is < 5e-7, so 1e-4 leaves wide margin.
    private const double LogitTolerance = 1e-4;

    // One AdamW step: the fixtures' step moves < 2e-6 under gradient rounding noise (checked by the script).
    private const double StepTolerance = 1e-5;

    public OptParityTests() => TestSupport.Init();

    public static TheoryData<string> Fixtures => new() { "opt-tiny", "opt-postln-proj" };

    private static string Folder(string name) => Path.Combine(TestSupport.RepoRoot, "tests", "fixtures", "parity", name);

    private static OptForCausalLM Load(string fixture) => Assert.IsType<OptForCausalLM>(HfCheckpoint.LoadModel(Folder(fixture)));

    private static SafeTensorsFile Expected(string fixture) => SafeTensorsFile.Open(Path.Combine(Folder(fixture), "expected.safetensors"));

    /// <summary>A small OPT for tests that need no fixture; sizes differ from the fixtures on purpose.</summary>
    private static OptConfig Tiny(bool normBefore = true, int projection = 48, double dropout = 0.0) => new()
    {
        VocabSize = 83,
        HiddenSize = 48,
        FfnDim = 96,
        NumHiddenLayers = 4,
        NumAttentionHeads = 4,
        MaxPositionEmbeddings = 40,
        WordEmbedProjDim = projection,
        DoLayerNormBefore = normBefore,
        Dropout = dropout,
        AttentionDropout = dropout,
    };

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void LogitsMatchPyTorch(string fixture)
    {
        using var model = Load(fixture);
        using var expected = Expected(fixture);
        using var ids = expected.Load("input_ids");
        using var reference = expected.Load("logits");
        using var noGrad = no_grad();
        using var logits = model.forward(ids);
        double error = TensorAssert.RelativeError(logits, reference);
        Assert.True(error <= LogitTolerance, $"{fixture}: logits relative error {error:E2}");
    }

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void OneAdamWStepMatchesPyTorch(string fixture)
    {
        using var model = Load(fixture);
        using var expected = Expected(fixture);
        var meta = expected.Metadata;
        double Meta(string key) => double.Parse(meta[key], CultureInfo.InvariantCulture);
        var betas = meta["adamw_betas"].Split(',').Select(b => double.Parse(b, CultureInfo.InvariantCulture)).ToArray();
        using var ids = expected.Load("train_input_ids");
        int rows = (int)ids.shape[0], sequence = (int)ids.shape[1] - 1;
        // The batch holds the pad token (1): nn.Embedding(padding_idx=1) gives its row no lookup gradient.
        Assert.Contains(1L, ids.data<long>().ToArray());
        var corpus = TokenCorpus.FromTokens(ids.data<long>().Select(x => (int)x).ToArray(), sequence);
        var trainer = new Trainer(model, corpus, new TrainOptions
        {
            MicroBatch = rows,
            GradClip = Meta("max_grad_norm"),
            LearningRate = Meta("adamw_lr"),
            Beta1 = betas[0],
            Beta2 = betas[1],
            Eps = Meta("adamw_eps"),
            WeightDecay = Meta("adamw_weight_decay"),
        });
        var batch = new TrainingBatch(
            ids[.., ..^1].contiguous().data<long>().ToArray(), ids[.., 1..].contiguous().data<long>().ToArray(), rows, sequence);
        var (loss, gradNorm, skipped) = trainer.Step([batch]);
        Assert.False(skipped);
        using var expectedLoss = expected.Load("loss");
        using var expectedNorm = expected.Load("grad_norm");
        Assert.Equal(expectedLoss.item<float>(), loss, 1e-5 * Math.Abs(loss));
        Assert.Equal(expectedNorm.item<float>(), gradNorm, 1e-5 * gradNorm);
        int compared = 0;
        foreach (var (name, parameter) in model.named_parameters())
        {
            using var reference = expected.Load("updated." + name);
            double error = TensorAssert.RelativeError(parameter, reference);
            Assert.True(error <= StepTolerance, $"{fixture}: {name} relative error {error:E2}");
            compared++;
        }
        Assert.Equal(expected.Tensors.Keys.Count(k => k.StartsWith("updated.", StringComparison.Ordinal)), compared);
    }

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void GreedyContinuationWithTheKvCacheMatchesTokenForToken(string fixture)
    {
        using var model = Load(fixture);
        model.eval();
        using var expected = Expected(fixture);
        using var prompt = expected.Load("greedy_prompt");
        using var tokens = expected.Load("greedy_tokens");
        var generated = new TokenGenerator(model).Generate(
            prompt.data<long>().Select(x => (int)x).ToArray(),
            new SamplingOptions { Temperature = 0, MaxNewTokens = (int)tokens.shape[1] }).ToList();
        Assert.Equal(tokens.data<long>().Select(x => (int)x), generated);
    }

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void KvCacheLogitsEqualFullRecomputation(string fixture)
    {
        using var model = Load(fixture);
        model.eval();
        using var noGrad = no_grad();
        using var ids = randint(0, model.VocabSize, [2, 19], generator: new torch.Generator(17), dtype: ScalarType.Int64);
        using var full = model.forward(ids);
        using var cache = model.CreateCache(2, 19);
        var pieces = new List<Tensor>();
        long start = 0;
        // A prefix, a multi-token chunk over a past (explicit mask), then one token at a time.
        foreach (long size in new long[] { 5, 4 }.Concat(Enumerable.Repeat(1L, 10)))
        {
            pieces.Add(model.Logits(model.Hidden(ids[.., (int)start..(int)(start + size)], cache)));
            start += size;
        }
        Assert.Equal(19, cache.Length);
        using var incremental = cat(pieces, 1);
        // The same fp32 arithmetic in other kernel splits: equal to rounding.
        double error = TensorAssert.RelativeError(incremental, full);
        Assert.True(error <= 1e-5, $"{fixture}: cached logits relative error {error:E2}");
        Assert.Throws<InvalidOperationException>(() => model.Hidden(ids[.., ..1], cache));
    }

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void ParameterNamesAreTheCheckpointsKeys(string fixture)
    {
        using var checkpoint = HfCheckpoint.Open(Folder(fixture));
        using var model = Assert.IsType<OptForCausalLM>(checkpoint.CreateModel());
        Assert.Equal(checkpoint.TensorNames.Order(StringComparer.Ordinal), HfCheckpoint.State(model).Select(s => s.Name).Order(StringComparer.Ordinal));
        Assert.Equal(ModelSpec.FromOpt(model.Config, fixture).ParameterCount, model.parameters().Sum(p => p.numel()));
        Assert.Equal("model.decoder.layers", model.DecoderLayersPath);
    }

    [Fact]
    public void NamesFollowTheConfigsOptions()
    {
        var config = Tiny(normBefore: true, projection: 32) with
        {
            NumHiddenLayers = 1,
            EnableBias = false,
            TieWordEmbeddings = false,
            RemoveFinalLayerNorm = true,
            LayerNormElementwiseAffine = false,
        };
        using var model = new OptForCausalLM(config);
        var expected = new[]
        {
            "lm_head.weight", "model.decoder.embed_positions.weight", "model.decoder.embed_tokens.weight",
            "model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc2.weight",
            "model.decoder.layers.0.self_attn.k_proj.weight", "model.decoder.layers.0.self_attn.out_proj.weight",
            "model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.v_proj.weight",
            "model.decoder.project_in.weight", "model.decoder.project_out.weight",
        };
        Assert.Equal(expected, model.named_parameters().Select(p => p.name).Order(StringComparer.Ordinal));
        Assert.Equal(new long[] { 83, 32 }, model.Decoder.EmbedTokens.Weight.shape);
        Assert.Equal(new long[] { 42, 48 }, model.named_parameters().Single(p => p.name == "model.decoder.embed_positions.weight").parameter.shape);
        Assert.Equal(ModelSpec.FromOpt(config, "t").ParameterCount, model.parameters().Sum(p => p.numel()));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void CheckpointingGradientsEqualPlainOnes(bool normBefore)
    {
        // Residual and attention dropout on: recomputation must replay the same masks.
        var plain = Gradients(normBefore, every: 0);
        foreach (int every in new[] { 1, 3 })
        {
            var checkpointed = Gradients(normBefore, every);
            Assert.Equal(plain.Keys.Order(), checkpointed.Keys.Order());
            foreach (var (name, g) in plain)
            {
                double error = TensorAssert.RelativeError(checkpointed[name], g);
                Assert.True(error <= 1e-6, $"every {every}: {name} relative error {error:E2}");
            }
        }
    }

    private static Dictionary<string, Tensor> Gradients(bool normBefore, int every)
    {
        using var model = new OptForCausalLM(Tiny(normBefore, projection: normBefore ? 48 : 40, dropout: 0.2));
        model.InitializeWeights(seed: 21, std: 0.2);
        if (every > 0)
        {
            Assert.Equal((4 + every - 1) / every, ActivationCheckpointing.Apply(model, every));
        }
        model.train();
        manual_seed(7);
        using var ids = randint(0, 83, [2, 15], generator: new torch.Generator(3), dtype: ScalarType.Int64);
        var loss = CausalLmLoss.Full(model.forward(ids[.., ..^1]), ids[.., 1..]);
        loss.backward();
        return model.named_parameters().Where(p => p.parameter.grad is not null)
            .ToDictionary(p => p.name, p => p.parameter.grad!.clone().DetachFromDisposeScope());
    }

    [Fact]
    public void DropoutActsOnlyInTraining()
    {
        using var model = new OptForCausalLM(Tiny(dropout: 0.3));
        model.InitializeWeights(seed: 4, std: 0.2);
        using var ids = randint(0, 83, [2, 9], generator: new torch.Generator(8), dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        model.eval();
        using var evalA = model.forward(ids);
        using var evalB = model.forward(ids);
        Assert.True(evalA.Same(evalB));
        model.train();
        using var trained = model.forward(ids);
        Assert.True(TensorAssert.RelativeError(trained, evalA) > 1e-3);
    }

    [Fact]
    public void HeadWeightIsTheEmbeddingOnlyWithoutProjectOut()
    {
        using var tied = Load("opt-tiny");
        Assert.Same(tied.Decoder.EmbedTokens.Weight, tied.HeadWeight);
        using var projected = Load("opt-postln-proj");
        Assert.Null(projected.HeadWeight);
        // The chunked loss the trainer uses with a head weight equals the full one.
        using var expected = Expected("opt-tiny");
        using var ids = expected.Load("train_input_ids");
        var batch = new TrainingBatch(ids[.., ..^1].contiguous().data<long>().ToArray(), ids[.., 1..].contiguous().data<long>().ToArray(), 2, 11);
        using var noGrad = no_grad();
        using var full = Evaluation.LossSum(tied, batch, 0);
        using var chunked = Evaluation.LossSum(tied, batch, 5);
        Assert.Equal(full.item<float>(), chunked.item<float>(), 1e-5 * Math.Abs(full.item<float>()));
    }

    [Fact]
    public void SavedFolderReloadsAsTheSameOpt()
    {
        using var dir = TestSupport.TempDir();
        using var model = Load("opt-postln-proj");
        HfCheckpoint.Save(model, dir.Path);
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        Assert.Equal("opt", checkpoint.ModelType);
        Assert.Equal(model.Config, checkpoint.Opt);
        using var reloaded = Assert.IsType<OptForCausalLM>(checkpoint.CreateModel());
        using var ids = randint(0, model.VocabSize, [1, 12], generator: new torch.Generator(2), dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        Assert.True(reloaded.forward(ids).Same(model.forward(ids)));
    }

    [Fact]
    public void Int8QuantizeOnLoadReplacesEveryLinearButTheHead()
    {
        var options = new Int8Options { Threshold = 3.0 };
        using var checkpoint = HfCheckpoint.Open(Folder("opt-postln-proj"));
        using var onLoad = checkpoint.CreateModel(quantize: options);
        using var afterLoad = checkpoint.CreateModel();
        using var reference = checkpoint.CreateModel();
        Int8Quantization.Apply(afterLoad, options);
        var int8 = ModuleTree.Find(onLoad, (_, m) => m is Int8Linear).Select(m => m.Path).ToList();
        // Six per layer (q, k, v, out, fc1, fc2) and project_in/out; lm_head stays float.
        Assert.Equal(2 * 6 + 2, int8.Count);
        Assert.Contains("model.decoder.project_in", int8);
        Assert.IsType<TorchSharp.Modules.Linear>(ModuleTree.Get(onLoad, "lm_head"));
        foreach (var path in int8)
        {
            var a = (Int8Linear)ModuleTree.Get(onLoad, path);
            var b = (Int8Linear)ModuleTree.Get(afterLoad, path);
            Assert.True(a.Weight.Same(b.Weight), path);
            Assert.True(a.Scb.Same(b.Scb), path);
        }
        using var ids = randint(0, 96, [1, 10], generator: new torch.Generator(6), dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        using var quantized = onLoad.forward(ids);
        Assert.True(quantized.Same(afterLoad.forward(ids)));
        // Row-wise absmax int8 rounds each weight by at most 1/254 of its row's largest; through two layers and
        // the projections that is a few percent of the logits at most, and never zero.
        double error = TensorAssert.RelativeError(quantized, reference.forward(ids));
        Assert.InRange(error, 1e-6, 5e-2);
    }

    [Fact]
    public void TheArticlesInt8LoraCheckpointedFlowTrainsAnOpt()
    {
        // int8 base, LoRA r 8 on q_proj and v_proj with dropout, checkpointing, as the article fine-tunes
        // OPT-6.7B (pre-LN, as every size but 350M): the adapters alone must learn a repeating phrase, every
        // base weight must stay as it was, and the losses must track the same LoRA run on the float base
        // without checkpointing.
        var (int8Losses, int8Model) = LoraRun(int8AndCheckpointing: true);
        var (floatLosses, floatModel) = LoraRun(int8AndCheckpointing: false);
        using (int8Model)
        using (floatModel)
        {
            Assert.NotEmpty(ModuleTree.Find(int8Model, (_, m) => m is Int8Linear));
            Assert.All(int8Model.DecoderLayers, l => Assert.IsType<CheckpointedLayer>(l));
        }
        Assert.True(int8Losses[^1] < 0.5 * int8Losses[0], $"int8 loss {int8Losses[0]:F3} -> {int8Losses[^1]:F3}");
        Assert.True(floatLosses[^1] < 0.5 * floatLosses[0], $"float loss {floatLosses[0]:F3} -> {floatLosses[^1]:F3}");
        for (int i = 0; i < int8Losses.Count; i++)
        {
            // Same data, initialization and dropout masks (checkpointing replays the RNG); only the base's int8
            // rounding (< 1/254 of each row's largest weight) differs, a perturbation that training then
            // amplifies step by step: the curves agree to a few percent, far from a run that does not learn.
            Assert.True(Math.Abs(int8Losses[i] - floatLosses[i]) < 0.1 * floatLosses[i], $"report {i}: int8 {int8Losses[i]:F4}, float {floatLosses[i]:F4}");
        }
    }

    private static (List<double> Losses, OptForCausalLM Model) LoraRun(bool int8AndCheckpointing)
    {
        var phrase = Enumerable.Range(0, 13).Select(i => (i * 11 + 5) % 83).ToArray();
        var tokens = Enumerable.Range(0, 1500).Select(i => phrase[i % phrase.Length]).ToArray();
        var model = new OptForCausalLM(Tiny(dropout: 0.1));
        model.InitializeWeights(seed: 5, std: 0.2);
        var plan = new RunPlan
        {
            Model = model.Spec("opt-test"),
            Quantization = int8AndCheckpointing ? new Planning.Quantization(QuantizationKind.Int8) : Planning.Quantization.None,
            Lora = new LoraSettings(8, 16, ["q_proj", "v_proj"], 0.05),
            Checkpointing = int8AndCheckpointing ? new Planning.Checkpointing(1) : Planning.Checkpointing.None,
            MicroBatchSize = 4,
            SequenceLength = 24,
            Device = ComputeDevice.Cpu,
        };
        using var applied = Techniques.Apply(model, plan, seed: 3);
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
        Assert.Equal(4 * 2 * 2, trainable.Count); // A and B of two targets in four layers
        Assert.All(trainable, n => Assert.Contains(".lora_", n, StringComparison.Ordinal));
        var frozen = model.named_parameters().Where(p => !p.parameter.requires_grad)
            .ToDictionary(p => p.name, p => p.parameter.detach().clone().DetachFromDisposeScope());
        var options = new TrainOptions { Steps = 80, MicroBatch = 4, LearningRate = 3e-2, LogEvery = 20 };
        var reports = new List<TrainProgress>();
        manual_seed(11);
        new Trainer(model, TokenCorpus.FromTokens(tokens, 24), options, applied.Precision).Run(reports.Add);
        foreach (var (name, p) in model.named_parameters().Where(p => !p.parameter.requires_grad))
        {
            Assert.True(p.Same(frozen[name]), name);
        }
        return (reports.Select(r => r.Loss).ToList(), model);
    }

    [Fact]
    public void InitializationFollowsTransformers()
    {
        using var model = new OptForCausalLM(Tiny(projection: 32) with { PadTokenId = 5 });
        model.InitializeWeights(seed: 1, std: 0.05);
        foreach (var (name, p) in model.named_parameters())
        {
            if (name.EndsWith("layer_norm.weight", StringComparison.Ordinal))
            {
                Assert.True(p.eq(1).all().item<bool>(), name);
            }
            else if (name.EndsWith(".bias", StringComparison.Ordinal))
            {
                Assert.True(p.eq(0).all().item<bool>(), name);
            }
            else if (name != "model.decoder.embed_tokens.weight")
            {
                // Thousands of N(0, 0.05) draws: the sample deviation is within a few percent of 0.05.
                Assert.InRange(p.std().item<float>(), 0.045, 0.055);
            }
        }
        var embed = model.Decoder.EmbedTokens.Weight;
        Assert.True(embed[5].eq(0).all().item<bool>());
        Assert.InRange(embed[6..].std().item<float>(), 0.045, 0.055);
    }

    [Fact]
    public void PositionsBeyondTheTableAreRefused()
    {
        using var model = new OptForCausalLM(Tiny());
        model.InitializeWeights(seed: 2);
        using var ids = randint(0, 83, [1, 41], dtype: ScalarType.Int64);
        using var noGrad = no_grad();
        var error = Assert.Throws<ArgumentException>(() => model.forward(ids));
        Assert.Contains("max_position_embeddings (40)", error.Message);
    }

    [Fact]
    public void ConfigJsonRoundTrips()
    {
        var config = Tiny(normBefore: false, projection: 32, dropout: 0.1) with { InitStd = 0.01, PadTokenId = 0, TorchDtype = "bfloat16" };
        using var model = new OptForCausalLM(config);
        var json = model.ConfigJson("float16");
        Assert.Equal("OPTForCausalLM", json["architectures"]![0]!.GetValue<string>());
        Assert.Equal(config with { TorchDtype = "float16" }, OptConfig.Parse(json.ToJsonString()));
    }
}
