using FrugalLM.Checkpointing;
using FrugalLM.Lora;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Models.Opt;
using FrugalLM.Planning;
using FrugalLM.Precision;
using FrugalLM.Quantization;
using FrugalLM.Training;
using TorchSharp;
using static TorchSharp.torch;
using PlanCheckpointing = FrugalLM.Planning.Checkpointing;
using PlanQuantization = FrugalLM.Planning.Quantization;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Tests.Precision;

/// <summary><see cref="KbitTraining.Prepare"/> read by <see cref="Techniques.Apply"/> and by the estimator.</summary>
public sealed class KbitTrainingTests
{
    public KbitTrainingTests() => TestSupport.Init();

    private static RunPlan Int8LoraBf16(CausalLM model, bool int8 = true) => new()
    {
        Model = model.Spec("tiny"),
        Precision = PrecisionMode.Bf16,
        Quantization = int8 ? PlanQuantization.Int8 : PlanQuantization.None,
        Lora = new LoraSettings(4, 8, ["q_proj", "v_proj"], 0),
        MicroBatchSize = 2,
        SequenceLength = 16,
        Device = ComputeDevice.Cpu,
    };

    private static TokenCorpus Corpus(int seed, int vocab)
    {
        var random = new Random(seed);
        return TokenCorpus.FromTokens(Enumerable.Range(0, 600).Select(_ => random.Next(vocab)).ToArray(), 16);
    }

    [Fact]
    public void PrepareKeepsNormsAndHeadFp32TheEmbeddingBf16AndTrainsOnlyAdapters()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: Random.Shared.Next());
        var plan = KbitTraining.Prepare(Int8LoraBf16(model));
        Assert.True(plan.Fp32NormsAndHead);
        Assert.Equal(PlanCheckpointing.EveryLayer, plan.Checkpointing);
        using var applied = Techniques.Apply(model, plan, seed: Random.Shared.Next());

        var dtypes = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.dtype);
        var norms = dtypes.Keys.Where(n => n.EndsWith("norm.weight", StringComparison.Ordinal)).ToList();
        Assert.Equal(2 * 2 + 1, norms.Count); // two per layer and the final one
        Assert.All(norms, n => Assert.Equal(ScalarType.Float32, dtypes[n]));
        Assert.Equal(ScalarType.Float32, dtypes["lm_head.weight"]);
        Assert.IsType<Fp32Linear>(ModuleTree.Get(model, "lm_head"));
        // No up-cast of the frozen 16-bit weights: the embedding stays at the compute precision, as do the adapters
        // (trained through fp32 masters).
        Assert.Equal(ScalarType.BFloat16, dtypes["model.embed_tokens.weight"]);
        var adapters = dtypes.Keys.Where(n => n.Contains(".lora_", StringComparison.Ordinal)).ToList();
        Assert.Equal(2 * 2 * 2, adapters.Count);
        Assert.All(adapters, n => Assert.Equal(ScalarType.BFloat16, dtypes[n]));
        Assert.All(applied.Precision.Masters, m => Assert.Equal(ScalarType.Float32, m.Master.dtype));
        // Every projection of both layers is int8 (int8 weight, fp32 SCB); checkpointing wraps every layer.
        var int8 = ModuleTree.Find(model, (_, m) => m is Int8Linear);
        Assert.Equal(2 * 7, int8.Count);
        Assert.All(int8, l => Assert.Equal(ScalarType.Int8, l.Module.named_buffers().Single(b => b.name == "weight").buffer.dtype));
        Assert.All(model.DecoderLayers, l => Assert.IsType<CheckpointedLayer>(l));
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToList();
        Assert.Equal(adapters.Order(), trainable.Order());

        // The rest computes in bf16: hidden states stay bf16 through the fp32 norms; the head's logits are fp32.
        using (var noGrad = no_grad())
        using (var scope = NewDisposeScope())
        {
            var ids = randint(0, 101, [2, 9], dtype: ScalarType.Int64);
            var hidden = model.Hidden(ids);
            Assert.Equal(ScalarType.BFloat16, hidden.dtype);
            Assert.Equal(ScalarType.Float32, model.Logits(hidden).dtype);
        }

        // One step with AdamW at a rate that visibly moves bf16 adapters: finite loss, only adapters change.
        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var corpus = Corpus(Random.Shared.Next(), 101);
        var trainer = new Trainer(model, corpus, new TrainOptions { MicroBatch = 2, LearningRate = 1e-2, WarmupSteps = 0 }, applied.Precision);
        var result = trainer.Step(corpus.TrainBatches(2, 0, 0).Take(1).ToList());
        Assert.True(double.IsFinite(result.Loss) && result.Loss > 0, $"loss {result.Loss}");
        foreach (var (name, tensor) in model.state_dict())
        {
            bool same = tensor.Same(before[name]);
            if (!name.Contains(".lora_", StringComparison.Ordinal))
            {
                Assert.True(same, $"{name} changed");
            }
            else if (name.Contains(".lora_B.", StringComparison.Ordinal))
            {
                Assert.False(same, $"{name} did not train"); // B starts at zero and gets the first gradient
            }
        }
    }

    [Fact]
    public void ChunkedLossThroughTheFp32HeadEqualsTheFullLoss()
    {
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: Random.Shared.Next(), std: 0.1);
        using var applied = Techniques.Apply(model, KbitTraining.Prepare(Int8LoraBf16(model)));
        var head = Assert.IsType<Tensor>(model.HeadWeight, exactMatch: false);
        Assert.Equal(ScalarType.Float32, head.dtype);
        using var scope = NewDisposeScope();
        var hidden = (randn(2, 7, 64) * 2).to(ScalarType.BFloat16).requires_grad_(true);
        var labels = randint(0, 101, [2, 7], dtype: ScalarType.Int64);
        labels[0, 0] = tensor(TrainingBatch.IgnoreLabel);
        var full = CausalLmLoss.Full(model.Logits(hidden), labels);
        var gradFull = autograd.grad([full], [hidden])[0];
        var chunked = CausalLmLoss.Chunked(hidden, head, labels, chunk: 3);
        var gradChunked = autograd.grad([chunked], [hidden])[0];
        // Both compute fp32 logits from the same widened bf16 hidden states: equal to fp32 summation order
        // (1e-5); the input gradients are rounded to bf16 once each (2^-8 relative).
        Assert.Equal(full.item<float>(), chunked.item<float>(), full.item<float>() * 1e-5);
        Assert.InRange(TensorAssert.RelativeError(gradChunked, gradFull), 0, 8e-3);
    }

    [Fact]
    public void EstimatedWeightsAreTheBytesThePreparedModelHolds()
    {
        // One plan, two readers: the estimator's weights (int8 layers with SCB, bf16 embedding and adapters, fp32
        // norms and head) are exactly the bytes of the prepared model's state.
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig());
        model.InitializeWeights(seed: Random.Shared.Next());
        var plan = KbitTraining.Prepare(Int8LoraBf16(model));
        using var applied = Techniques.Apply(model, plan);
        long held = Held(model);
        Assert.Equal(MemoryEstimator.Estimate(plan).Bytes("weights"), held);
        // Without the preparation the norms and head are bf16: (5 x 64 + 101 x 64) x 2 B fewer.
        using var plain = new LlamaForCausalLM(TestSupport.TinyConfig());
        plain.InitializeWeights(seed: 1);
        var unprepared = Int8LoraBf16(plain);
        using var appliedPlain = Techniques.Apply(plain, unprepared);
        long plainHeld = Held(plain);
        Assert.Equal(MemoryEstimator.Estimate(unprepared).Bytes("weights"), plainHeld);
        Assert.Equal((5 * 64 + 101 * 64) * 2, held - plainHeld);
    }

    // Bytes of a model's state; without the 1-byte weight_format scalar each int8 layer carries for bitsandbytes'
    // file layout, which the estimator leaves out.
    private static long Held(nn.Module model) =>
        model.state_dict().Where(kv => !kv.Key.EndsWith(".weight_format", StringComparison.Ordinal)).Sum(kv => kv.Value.numel() * kv.Value.element_size());

    [Fact]
    public void OptLayerNormsStayFp32AndTheTiedHeadStaysWithTheEmbedding()
    {
        // OPT ties its head to the embedding: widening the head would widen the embedding, which is what
        // preparation avoids, so only the LayerNorms (weight and bias) become fp32; libtorch's layer_norm takes
        // them with bf16 inputs. A float base: MixedPrecision cannot yet convert an Int8Linear's bias (OPT's
        // projections have biases), with or without the preparation.
        var config = new OptConfig
        {
            VocabSize = 83,
            HiddenSize = 48,
            FfnDim = 96,
            NumHiddenLayers = 2,
            NumAttentionHeads = 4,
            MaxPositionEmbeddings = 40,
            WordEmbedProjDim = 48,
        };
        using var model = new OptForCausalLM(config);
        model.InitializeWeights(seed: Random.Shared.Next());
        var plan = KbitTraining.Prepare(Int8LoraBf16(model, int8: false));
        using var applied = Techniques.Apply(model, plan, seed: Random.Shared.Next());
        foreach (var (name, p) in model.named_parameters())
        {
            var expected = name.Contains("layer_norm", StringComparison.Ordinal) ? ScalarType.Float32 : ScalarType.BFloat16;
            Assert.True(expected == p.dtype, $"{name}: {p.dtype}");
        }
        Assert.Equal(2 * 2 * 2 + 2, model.named_parameters().Count(p => p.name.Contains("layer_norm", StringComparison.Ordinal)));
        Assert.Null(model.named_modules().FirstOrDefault(m => m.name == Fp32NormsAndHead.HeadPath).module);
        Assert.Equal(MemoryEstimator.Estimate(plan).Bytes("weights"), Held(model));

        var before = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var corpus = Corpus(Random.Shared.Next(), 83);
        var trainer = new Trainer(model, corpus, new TrainOptions { MicroBatch = 2, LearningRate = 1e-2, WarmupSteps = 0 }, applied.Precision);
        var result = trainer.Step(corpus.TrainBatches(2, 0, 0).Take(1).ToList());
        Assert.True(double.IsFinite(result.Loss) && result.Loss > 0, $"loss {result.Loss}");
        Assert.All(model.state_dict().Where(kv => !kv.Key.Contains(".lora_", StringComparison.Ordinal)),
            kv => Assert.True(kv.Value.Same(before[kv.Key]), $"{kv.Key} changed"));
    }

    [Fact]
    public void PreparationNeedsAdaptersAndIsIgnoredWhenGenerating()
    {
        var spec = ModelSpec.FromLlama(TestSupport.TinyConfig(), "tiny");
        var full = new RunPlan { Model = spec, Precision = PrecisionMode.Bf16, Fp32NormsAndHead = true };
        Assert.Contains("LoRA", Assert.Throws<PlanException>(() => full.Validate()).Message);
        var generate = full with { Mode = RunMode.Generate, Optimizer = OptimizerKind.None };
        Assert.Contains(generate.Validate(), w => w.Contains("no effect when generating", StringComparison.Ordinal));
        Assert.Equal(MemoryEstimator.Estimate(generate with { Fp32NormsAndHead = false }).DeviceBytes, MemoryEstimator.Estimate(generate).DeviceBytes);
    }
}
