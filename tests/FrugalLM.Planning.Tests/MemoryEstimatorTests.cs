using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

/// <summary>Each component on the tiny models, with the expected bytes worked out by hand in the comments.</summary>
public sealed class MemoryEstimatorTests
{
    [Fact]
    public void Fp32FullAdamWComponentsAndPhases()
    {
        var e = MemoryEstimator.Estimate(Tiny.Plan());
        // Weights 8656 x 4 = 34,624. No masters in fp32.
        Assert.Equal(34_624, e.Bytes("weights"));
        Assert.Equal(0, e.Bytes("master_weights"));
        // Gradients 4 B each: head unit (final norm 16 + LM head 1600) x 4 = 6,464 first, the rest 28,160.
        Assert.Equal(6_464, e.Bytes("gradients_head"));
        Assert.Equal(28_160, e.Bytes("gradients"));
        // AdamW: 2 x 4 B x 8656 = 69,248. Step temporaries: the largest tensor (1600, under one chunk) x 8 B
        // (the clipped gradient and the denominator) = 12,800.
        Assert.Equal(69_248, e.Bytes("optimizer_states"));
        Assert.Equal(12_800, e.Bytes("optimizer_step"));
        // One layer keeps 1176 B per token (see ActivationTermsOfALlamaLayer); 6 tokens -> 7,056; 2 layers 14,112.
        Assert.Equal(14_112, e.Bytes("activations"));
        Assert.Equal(7_056, e.Bytes("activations_last_layer"));
        // Head: final norm input 16 x 4 + 4 = 68, LM head input 64, ids and labels 16 -> 148 x 6 = 888.
        Assert.Equal(888, e.Bytes("activations_head"));
        // In-flight activation gradients: 6 tokens x 4 B x (2 x 16 + max(3 x 40, 4 x 16)) = 3,648.
        Assert.Equal(3_648, e.Bytes("activation_gradients"));
        // Loss: 6 tokens x 100 vocab x 12 B = 7,200.
        Assert.Equal(7_200, e.Bytes("loss"));
        Assert.Equal(1_000, e.Bytes("cuda_context"));

        // Forward end: weights, first gradients, states, all activations, head, in-flight grads, loss, context.
        Assert.Equal(34_624 + 6_464 + 69_248 + 14_112 + 888 + 3_648 + 7_200 + 1_000, e.DeviceBytesAt(Phases.ForwardEnd));
        // Backward end: weights, all gradients, states, last layer's activations, head, in-flight grads, context.
        Assert.Equal(34_624 + 6_464 + 28_160 + 69_248 + 7_056 + 888 + 3_648 + 1_000, e.DeviceBytesAt(Phases.BackwardEnd));
        // Optimizer step: weights, gradients, states, the step temporaries, context.
        Assert.Equal(34_624 + 6_464 + 28_160 + 69_248 + 12_800 + 1_000, e.DeviceBytesAt(Phases.OptimizerStep));
        Assert.Equal(Phases.OptimizerStep, e.PeakPhase);
        Assert.Equal(152_296, e.DeviceBytes);
        Assert.Equal(0, e.HostBytes);
        Assert.Equal(8_656, e.TrainableParameterCount);
    }

    [Fact]
    public void MixedPrecisionKeepsFp32MastersAndSixteenBitGradients()
    {
        var e = MemoryEstimator.Estimate(Tiny.Plan() with { Precision = Precision.Bf16 });
        Assert.Equal(17_312, e.Bytes("weights"));          // 8656 x 2
        Assert.Equal(34_624, e.Bytes("master_weights"));   // 8656 x 4
        Assert.Equal(3_232, e.Bytes("gradients_head"));    // 1616 x 2
        Assert.Equal(14_080, e.Bytes("gradients"));        // 7040 x 2
        Assert.Equal(69_248, e.Bytes("optimizer_states")); // moments on the fp32 masters
        Assert.Equal(19_200, e.Bytes("optimizer_step"));   // 1600 x (4 fp32 gradient + 4 clipped + 4 denominator)
        // bf16 loss: 6 x 100 x 12 = 7,200: a natively computed bf16 head's logits are widened and released before
        // backward. fp16 on a CPU runs its head through fp32 tiles and keeps its fp16 output: 6 x 100 x (12 + 2) = 8,400.
        Assert.Equal(7_200, e.Bytes("loss"));
        var fp16Cpu = MemoryEstimator.Estimate(Tiny.Plan() with { Precision = Precision.Fp16, Device = ComputeDevice.Cpu, Overhead = FrameworkOverhead.Cpu });
        Assert.Equal(8_400, fp16Cpu.Bytes("loss"));
    }

    [Fact]
    public void TheFusedCpuStepHasNoTemporaries()
    {
        // On the CPU, AdamW updates in place (AdamW.FusedCpuStep): fp32 values with fp32 or 8-bit moments, and bf16-pure's
        // bf16 values with bf16 moments. Every plan on a GPU goes through libtorch's ops chunk by chunk.
        var cpu = Tiny.Plan() with { Device = ComputeDevice.Cpu, Overhead = FrameworkOverhead.Cpu };
        Assert.Equal(0, MemoryEstimator.Estimate(cpu).Bytes("optimizer_step"));
        Assert.Equal(0, MemoryEstimator.Estimate(cpu with { Precision = Precision.Bf16 }).Bytes("optimizer_step"));
        Assert.Equal(0, MemoryEstimator.Estimate(cpu with { Optimizer = OptimizerKind.AdamW8bit }).Bytes("optimizer_step"));
        Assert.Equal(0, MemoryEstimator.Estimate(cpu with { Precision = Precision.Bf16Pure }).Bytes("optimizer_step"));
        Assert.Equal(12_800, MemoryEstimator.Estimate(Tiny.Plan()).Bytes("optimizer_step"));
        Assert.Equal(38_400, MemoryEstimator.Estimate(Tiny.Plan() with { Precision = Precision.Bf16Pure }).Bytes("optimizer_step"));
        Assert.False(OptimizerStepLayout.Fused(cpu: false, moments16Bit: false, parameter16Bit: false));
        Assert.False(OptimizerStepLayout.Fused(cpu: true, moments16Bit: false, parameter16Bit: true));
    }

    [Fact]
    public void PureBf16AndSgdStates()
    {
        var pure = MemoryEstimator.Estimate(Tiny.Plan() with { Precision = Precision.Bf16Pure });
        Assert.Equal(0, pure.Bytes("master_weights"));
        Assert.Equal(34_624, pure.Bytes("optimizer_states")); // 2 x 2 B x 8656
        Assert.Equal(38_400, pure.Bytes("optimizer_step"));   // 1600 x (12 as mixed + 8 fp32 moments + 4 fp32 weights)

        var sgd = MemoryEstimator.Estimate(Tiny.Plan() with { Optimizer = OptimizerKind.SgdMomentum });
        Assert.Equal(34_624, sgd.Bytes("optimizer_states"));  // 4 B x 8656
        Assert.Equal(0, sgd.Bytes("optimizer_step"));

        var none = MemoryEstimator.Estimate(Tiny.Plan() with { Optimizer = OptimizerKind.None });
        Assert.Equal(0, none.Bytes("optimizer_states"));
    }

    [Theory]
    [InlineData(4095, 32_760)] // under min_8bit_size: two fp32 moments, 8 x 4095
    [InlineData(4096, 8_208)]  // 2 x (4096 B + 4 B x ceil(4096 / 2048) = 8)
    [InlineData(4800, 9_624)]  // 2 x (4800 + 4 x 3)
    public void EightBitAdamWStatesAreBlockWise(long count, long expected)
    {
        Assert.Equal(expected, MemoryEstimator.OptimizerStateBytes(Tiny.Plan() with { Optimizer = OptimizerKind.AdamW8bit }, count));
    }

    [Theory]
    [InlineData(TensorRole.Embedding, 8 * 40_000L)]
    [InlineData(TensorRole.PositionEmbedding, 8 * 40_000L)]
    [InlineData(TensorRole.LmHead, 2 * (40_000L + 4 * 20))] // an untied head is a plain matrix: 8-bit
    public void EightBitAdamWKeepsEmbeddingStatesInFloat32(TensorRole role, long expected)
    {
        Assert.Equal(expected, MemoryEstimator.OptimizerStateBytes(Tiny.Plan() with { Optimizer = OptimizerKind.AdamW8bit }, 40_000, role));
    }

    [Fact]
    public void QuantizedBaseWeights()
    {
        var generate = Tiny.Plan() with { Mode = RunMode.Generate, Precision = Precision.Bf16, Optimizer = OptimizerKind.None };
        // Unquantized tensors (embedding 1600, norms 64, final norm 16, LM head 1600 = 3280) stay bf16: 6,560.
        // int8: linear weights 2688 B + one fp32 scale per output row (16+8+8+16+40+40+16 = 144 rows, 576 B) = 3,264
        // per layer, 6,528 for two.
        Assert.Equal(6_528 + 6_560, MemoryEstimator.Estimate(generate with { Quantization = Quantization.Int8 }).Bytes("weights"));
        // NF4, 64-weight blocks with fp32 absmax: q 256 -> 128 + 4 x 4 = 144; k, v 128 -> 64 + 2 x 4 = 72;
        // o 144; gate, up, down 640 -> 320 + 10 x 4 = 360. 1,512 per layer, 3,024 for two.
        Assert.Equal(3_024 + 6_560, MemoryEstimator.Estimate(generate with { Quantization = Quantization.Nf4 }).Bytes("weights"));
        // Double quantization: absmax 1 B per block + 4 B per 256 blocks + a 4 B offset:
        // q 128 + 4 + 4 + 4 = 140; k, v 64 + 2 + 4 + 4 = 74; o 140; 640-weight layers 320 + 10 + 4 + 4 = 338.
        // 1,442 per layer, 2,884 for two.
        var doubleQuant = new Quantization(QuantizationKind.Nf4, Nf4DoubleQuant: true);
        Assert.Equal(2_884 + 6_560, MemoryEstimator.Estimate(generate with { Quantization = doubleQuant }).Bytes("weights"));
    }

    [Fact]
    public void KbitPreparationKeepsNormsAndHeadInFp32AndNothingElse()
    {
        var plan = Tiny.Plan() with
        {
            Precision = Precision.Bf16,
            Quantization = Quantization.Int8,
            Lora = new LoraSettings(2, 4, ["q_proj", "v_proj"], 0),
        };
        var prepared = KbitTraining.Prepare(plan);
        Assert.True(prepared.Fp32NormsAndHead);
        Assert.Equal(Checkpointing.EveryLayer, prepared.Checkpointing);
        Assert.Equal(new Checkpointing(2), KbitTraining.Prepare(plan with { Checkpointing = new Checkpointing(2) }).Checkpointing);
        var e = MemoryEstimator.Estimate(prepared);
        // int8 linear weights 2 x 3,264 = 6,528 (see QuantizedBaseWeights); embedding 1600 x 2 B = 3,200 (not
        // up-cast); norms 2 x (16 + 16) + final 16 = 80 x 4 B = 320; LM head 1600 x 4 B = 6,400; adapters 224 x 2 B
        // = 448. Sum 16,896.
        Assert.Equal(6_528 + 3_200 + 320 + 6_400 + 448, e.Bytes("weights"));
        // Unprepared, norms and head are bf16: 80 x 2 + 1600 x 2 = 3,360 fewer.
        Assert.Equal(16_896 - 3_360, MemoryEstimator.Estimate(plan).Bytes("weights"));
        // The fp32 head gives fp32 logits directly: 6 tokens x 100 x 12 B = 7,200; a bf16 head's logits are released
        // before backward, so the same.
        Assert.Equal(7_200, e.Bytes("loss"));
        Assert.Equal(7_200, MemoryEstimator.Estimate(plan).Bytes("loss"));
        // Checkpointing on: 2 segment inputs x 6 tokens x 16 x 2 B = 384.
        Assert.Equal(384, e.Bytes("activations"));
        // Frozen norms and head: no gradients, masters or states of theirs.
        Assert.Equal(0, e.Bytes("gradients_head"));
        Assert.Equal(224 * 4, e.Bytes("master_weights"));

        // OPT ties its head to the embedding, which stays bf16: only the LayerNorms (weight and bias, 2 x 2 x 16 + 16
        // = 80) widen. Float base: (2304 - 80) x 2 B = 4,448 + 80 x 4 B = 320 + adapters (q, v: 4 x 16 per layer,
        // 128) x 2 B = 256 -> 5,024. The head computes in bf16 (its logits widened and released before backward): 6 x 50 x 12 = 3,600.
        var opt = MemoryEstimator.Estimate(KbitTraining.Prepare(Tiny.Plan(Tiny.Opt()) with
        {
            Precision = Precision.Bf16,
            Lora = new LoraSettings(2, 4, ["q_proj", "v_proj"], 0),
        }));
        Assert.Equal(4_448 + 320 + 256, opt.Bytes("weights"));
        Assert.Equal(3_600, opt.Bytes("loss"));
    }

    [Fact]
    public void LoraTrainsOnlyItsAdapters()
    {
        var plan = Tiny.Plan() with { Lora = new LoraSettings(2, 4, ["q_proj", "v_proj"], 0) };
        var e = MemoryEstimator.Estimate(plan);
        // Per layer: q A 2x16 = 32, q B 16x2 = 32, v A 2x16 = 32, v B 8x2 = 16 -> 112; two layers 224.
        Assert.Equal(224, e.TrainableParameterCount);
        Assert.Equal((8_656 + 224) * 4, e.Bytes("weights"));
        Assert.Equal(0, e.Bytes("gradients_head"));      // the head is frozen
        Assert.Equal(224 * 4, e.Bytes("gradients"));
        Assert.Equal(224 * 8, e.Bytes("optimizer_states"));
        Assert.Equal(32 * 8, e.Bytes("optimizer_step")); // largest adapter tensor: 32 elements x 8 B
        // 968 B per token per layer (see LoraLayerTerms) x 6 tokens x 2 layers.
        Assert.Equal(968 * 6 * 2, e.Bytes("activations"));
        // Head: final norm input 68 + ids 16 (no LM head input: its weight is frozen) = 84 x 6.
        Assert.Equal(84 * 6, e.Bytes("activations_head"));
    }

    [Fact]
    public void ActivationTermsOfALlamaLayer()
    {
        // fp32, full fine-tuning, SDPA, per token: norm 1 input 16 x 4 + 4 (rstd) = 68; attention input 64;
        // q, k, v (k and v expanded to 4 heads) 3 x 16 x 4 = 192; attention output 64; log-sum-exp 4 heads x 4 = 16;
        // norm 2 input 68; MLP input 64; gate, up, silu(gate) 3 x 40 x 4 = 480; down_proj input 160. Sum 1,176.
        var plan = Tiny.Plan();
        Assert.Equal(1_176, ActivationModel.LayerTerms(plan).Sum(t => t.BytesPerToken));
        Assert.Equal(0, ActivationModel.LayerTerms(plan).Sum(t => t.BytesPerTokenPerKey));
        Assert.Equal(1_176 * 6, ActivationModel.LayerBytes(plan, 2, 3));

        // Eager keeps no log-sum-exp but the fp32 probabilities: 4 heads x 4 B per key (1160 B per token + 16 per key).
        var eager = plan with { Attention = AttentionKind.Eager };
        Assert.Equal(1_160, ActivationModel.LayerTerms(eager).Sum(t => t.BytesPerToken));
        Assert.Equal(16, ActivationModel.LayerTerms(eager).Sum(t => t.BytesPerTokenPerKey));
        Assert.Equal(2 * 3 * 1_160 + 2 * 3 * 3 * 16, ActivationModel.LayerBytes(eager, 2, 3));

        // bf16 eager: per token 36 + 32 + 96 + 32 (o_proj input) + 36 + 32 + 240 + 80 = 584; per key 4 x (4 + 2) = 24.
        var eagerBf16 = eager with { Precision = Precision.Bf16 };
        Assert.Equal(584, ActivationModel.LayerTerms(eagerBf16).Sum(t => t.BytesPerToken));
        Assert.Equal(24, ActivationModel.LayerTerms(eagerBf16).Sum(t => t.BytesPerTokenPerKey));
    }

    [Fact]
    public void LoraLayerTerms()
    {
        // LoRA on q and v, no dropout: the frozen MLP needs neither its input nor down_proj's, and the frozen o_proj
        // nothing beyond what SDPA keeps. 68 + 64 (q/v input) + 192 + 64 + 16 + 68 + 480 + A outputs 2 x 2 x 4 = 16
        // -> 968.
        var lora = Tiny.Plan() with { Lora = new LoraSettings(2, 4, ["q_proj", "v_proj"], 0) };
        Assert.Equal(968, ActivationModel.LayerTerms(lora).Sum(t => t.BytesPerToken));
        // With dropout the adapters read a dropped copy: input 16 x 4 + mask 16 = 80 per target, 160 for two, and
        // the attention input itself is no longer kept: 968 - 64 + 160 = 1,064.
        var dropout = lora with { Lora = lora.Lora! with { Dropout = 0.1 } };
        Assert.Equal(1_064, ActivationModel.LayerTerms(dropout).Sum(t => t.BytesPerToken));
    }

    [Fact]
    public void ActivationTermsOfAnOptLayer()
    {
        // fp32 full SDPA: LayerNorm 1 input 8 x 4 + 8 (mean, rstd) = 40; attention input 32; q, k, v 96;
        // attention output 32; log-sum-exp 2 x 4 = 8; dropout mask 8; LayerNorm 2 input 40; fc1 input 32;
        // relu output 32 x 4 = 128; dropout mask 8. Sum 424.
        var plan = Tiny.Plan(Tiny.Opt());
        Assert.Equal(2_304, plan.Model.ParameterCount);
        Assert.Equal(424, ActivationModel.LayerTerms(plan).Sum(t => t.BytesPerToken));
    }

    [Fact]
    public void CheckpointingKeepsSegmentInputsAndRecomputesOneSegment()
    {
        var every = MemoryEstimator.Estimate(Tiny.Plan() with { Checkpointing = Checkpointing.EveryLayer });
        // 2 segments x 6 tokens x 16 x 4 B = 768 kept; one layer (7,056) recomputed.
        Assert.Equal(768, every.Bytes("activations"));
        Assert.Equal(7_056, every.Bytes("activation_recompute"));
        Assert.Equal(0, every.Bytes("activations_last_layer"));
        var pairs = MemoryEstimator.Estimate(Tiny.Plan() with { Checkpointing = new Checkpointing(2) });
        // 1 segment of 2 layers: 384 kept, 2 x 7,056 recomputed.
        Assert.Equal(384, pairs.Bytes("activations"));
        Assert.Equal(14_112, pairs.Bytes("activation_recompute"));
    }

    [Fact]
    public void ChunkedLossOnlyHoldsOneChunk()
    {
        // Fused: one fp32 buffer of a chunk's logits, 4 tokens x 100 x 4 = 1,600, and the hidden states' gradient the
        // forward pass computes and backward takes, 6 tokens x 16 x 4 = 384. The trainable head's fp32 gradient is its
        // gradients_head (fp32 here). A chunk larger than the batch holds the batch: 6 x 100 x 4 = 2,400.
        Assert.Equal(1_600 + 384, ActivationModel.LossBytes(Tiny.Plan() with { Loss = new LossComputation(true, 4) }, 2, 3));
        Assert.Equal(2_400 + 384, ActivationModel.LossBytes(Tiny.Plan() with { Loss = new LossComputation(true, 100) }, 2, 3));
        // bf16 full training: a chunk of bf16 logits (and later their bf16 gradient) beside the buffer (4 x 100 x (4 + 2)
        // = 2,400), the fp32 gradient's half beyond the bf16 gradients_head (100 x 16 x 2 = 3,200) and a chunk's bf16
        // head gradient before it is added (3,200).
        Assert.Equal(2_400 + 384 + 3_200 + 3_200, ActivationModel.LossBytes(Tiny.Plan() with
        {
            Loss = new LossComputation(true, 4), Precision = Precision.Bf16,
        }, 2, 3));
        // fp16 on a CPU: the head's product runs from its fp32 copy, so no 16-bit chunk of logits.
        Assert.Equal(1_600 + 384 + 6_400 + 3_200, ActivationModel.LossBytes(Tiny.Plan() with
        {
            Loss = new LossComputation(true, 4), Precision = Precision.Fp16, Device = ComputeDevice.Cpu,
        }, 2, 3));
        // bf16 LoRA: a frozen 16-bit head, so a chunk of bf16 logits beside the buffer (4 x 100 x (4 + 2) = 2,400) and no
        // head gradient.
        var lora = Tiny.Plan() with
        {
            Loss = new LossComputation(true, 4), Precision = Precision.Bf16, Lora = new LoraSettings(2, 4, ["q_proj"], 0),
        };
        Assert.Equal(2_400 + 384, ActivationModel.LossBytes(lora, 2, 3));
        // Evaluation (a generation plan with a loss): the buffer only.
        Assert.Equal(1_600, ActivationModel.LossBytes(Tiny.Plan() with { Loss = new LossComputation(true, 4), Mode = RunMode.Generate }, 2, 3));
    }

    [Fact]
    public void GenerationKeepsAKvCacheAndNoTrainingState()
    {
        var plan = Tiny.Plan() with { Mode = RunMode.Generate, Precision = Precision.Bf16, Optimizer = OptimizerKind.None };
        var e = MemoryEstimator.Estimate(plan);
        // 2 (K and V) x 2 layers x 2 sequences x 3 positions x 2 KV heads x 4 x 2 B = 384.
        Assert.Equal(384, e.Bytes("kv_cache"));
        // Prefill temporaries: max(attention 6 x 2 x (32 + 64) = 1,152; MLP 6 x 2 x (32 + 120) = 1,824)
        // + last-position fp32 logits 2 x 100 x 4 = 800.
        Assert.Equal(2_624, e.Bytes("generation_workspace"));
        Assert.Equal(48, e.Bytes("inputs"));
        Assert.Equal(17_312, e.Bytes("weights"));
        Assert.Equal(0, e.Bytes("optimizer_states") + e.Bytes("gradients") + e.Bytes("activations"));
        Assert.Equal(17_312 + 384 + 2_624 + 48 + 1_000, e.DeviceBytesAt(Phases.ForwardEnd));
        // Loading reads the largest tensor (the 100 x 16 embedding, 6,400 B in fp32) whole and holds its mapped
        // pages: 12,800 B beside the weights, which is more than generating needs here.
        Assert.Equal(12_800, e.Bytes("load_workspace"));
        Assert.Equal(17_312 + 12_800 + 1_000, e.DeviceBytes);
        Assert.Equal(Phases.Loading, e.PeakPhase);
    }

    [Fact]
    public void Fp16GenerationOnACpuHoldsFp32Tiles()
    {
        var gpu = Tiny.Plan() with { Mode = RunMode.Generate, Precision = Precision.Fp16, Optimizer = OptimizerKind.None };
        var cpu = gpu with { Device = ComputeDevice.Cpu };
        // Two tiles of 4 Mi fp32 values and the fp32 copy of 2 x 3 input rows of the widest input (the MLP's 40).
        long tiles = 4 * (2 * (4L << 20) + 6 * 40);
        Assert.Equal(tiles, ActivationModel.UpcastTilesBytes(cpu, 6));
        Assert.Equal(tiles, MemoryEstimator.Estimate(cpu).Bytes("generation_workspace") - MemoryEstimator.Estimate(gpu).Bytes("generation_workspace"));
        Assert.Equal(0, ActivationModel.UpcastTilesBytes(cpu with { Precision = Precision.Bf16 }, 6));
    }

    [Fact]
    public void QuantizingWhileLoadingHoldsTheLargestLayerInFp32()
    {
        var plan = Tiny.Plan() with
        {
            Model = ModelCatalog.Resolve("llama-7b"), Mode = RunMode.Generate, Precision = Precision.Bf16, Optimizer = OptimizerKind.None,
            Quantization = Quantization.Int8,
        };
        var e = MemoryEstimator.Estimate(plan);
        // The MLP's 11008 x 4096 weights, 13 B a value (fp32 copy, absolute values, scaled copy, int8 result).
        Assert.Equal(11_008L * 4_096 * 13, e.Bytes("load_workspace"));
        Assert.True(e.DeviceBytesAt(Phases.Loading) < e.DeviceBytesAt(Phases.ForwardEnd) + e.Bytes("load_workspace"));
    }

    [Fact]
    public void FsdpDividesModelStatesAndAddsGatheredLayers()
    {
        var full = MemoryEstimator.Estimate(Tiny.Plan() with { Sharding = new Sharding(ShardingStrategy.FullShard, 2) });
        // Units: embedding 6,400 B, two layers of 10,880 B, head 6,464 B; each halved: 3,200 + 5,440 x 2 + 3,232.
        Assert.Equal(17_312, full.Bytes("weights"));
        Assert.Equal(34_624, full.Bytes("optimizer_states"));
        Assert.Equal(3_232, full.Bytes("gradients_head"));
        Assert.Equal(17_312 - 3_232, full.Bytes("gradients"));
        // Gathered: embedding + head (the root stays gathered); in backward also the current and the prefetched layer.
        Assert.Equal(6_400 + 6_464, full.Bytes("fsdp_gathered"));
        Assert.Equal(2 * 10_880, full.Bytes("fsdp_gathered_layers"));
        Assert.Equal(Phases.BackwardEnd, full.Components.Single(c => c.Key == "fsdp_gathered_layers").LiveIn);
        // Unsharded gradients of one decoder layer before reduce-scatter (the root's are gradients_head and the rest).
        Assert.Equal(10_880, full.Bytes("gradient_buffer"));
        // The step walks flat shards: the largest unit (a layer, 2720 parameters) over 2 ranks x 8 B.
        Assert.Equal(1_360 * 8, full.Bytes("optimizer_step"));

        var gradOp = MemoryEstimator.Estimate(Tiny.Plan() with { Sharding = new Sharding(ShardingStrategy.ShardGradOp, 2) });
        // ZeRO-2: this rank's fp32 shards (17,312 B, the weights themselves in fp32) and the root gathered (6,400 + 6,464);
        // every decoder layer gathered from its forward to its backward, one still at the end of backward.
        Assert.Equal(17_312 + 12_864, gradOp.Bytes("weights"));
        Assert.Equal(34_624, gradOp.Bytes("optimizer_states"));
        Assert.Equal(2 * 10_880, gradOp.Bytes("fsdp_gathered"));
        Assert.Equal(10_880, gradOp.Bytes("fsdp_gathered_last"));

        // Under LoRA the adapters and the decoder layers' frozen base are sharded and gathered with their layer; the root's
        // frozen embedding, final norm and head (6,400 + 64 + 6,400 = 12,864 B) stay whole on every rank.
        var lora = Tiny.Plan() with { Lora = new LoraSettings(2, 4, ["q_proj"], 0), Sharding = new Sharding(ShardingStrategy.FullShard, 2) };
        var plain = MemoryEstimator.Estimate(lora with { Sharding = Sharding.None });
        var shardedLora = MemoryEstimator.Estimate(lora);
        long adapters = plain.Bytes("weights") - 34_624; // q_proj A (2 x 16) and B (16 x 2) in each of 2 layers: 128 values x 4 B
        Assert.Equal(512, adapters);
        // Each layer: 10,880 B of base and 256 B of adapters, halved.
        Assert.Equal(2 * (10_880 + 256) / 2 + 12_864, shardedLora.Bytes("weights"));
        Assert.Equal(0, shardedLora.Bytes("fsdp_gathered")); // no root adapters
        Assert.Equal(2 * (10_880 + 256), shardedLora.Bytes("fsdp_gathered_layers")); // current and prefetched layer
        // ZeRO-2 under LoRA: the whole frozen model and this rank's half of the adapters.
        Assert.Equal(34_624 + 512 / 2, MemoryEstimator.Estimate(lora with { Sharding = new Sharding(ShardingStrategy.ShardGradOp, 2) }).Bytes("weights"));

        // An int8 base's linear weights (3,264 B a layer with their scales) stay replicated; its norms (128 B a layer) are sharded.
        var int8 = MemoryEstimator.Estimate(lora with { Quantization = Quantization.Int8 });
        Assert.Equal(2 * (128 + 256) / 2 + 2 * 3_264 + 12_864, int8.Bytes("weights"));
        Assert.Equal(2 * (128 + 256), int8.Bytes("fsdp_gathered_layers"));
    }

    [Fact]
    public void ATiedEmbeddingsBackwardAddsTwoDenseGradientsAtTheEnd()
    {
        var config = new LlamaConfig
        {
            VocabSize = 100, HiddenSize = 16, IntermediateSize = 40, NumHiddenLayers = 2, NumAttentionHeads = 4,
            NumKeyValueHeads = 2, HeadDim = 4, MaxPositionEmbeddings = 64, TieWordEmbeddings = true,
        };
        var tied = Tiny.Plan(ModelSpec.FromLlama(config, "tiny-tied"));
        var e = MemoryEstimator.Estimate(tied);
        // The embedding's dense gradient (100 x 16 x 4 B = 6,400) and its sum with the head's: 12,800, at backward end only.
        Assert.Equal(12_800, e.Bytes("embedding_backward"));
        Assert.Equal(Phases.BackwardEnd, e.Components.Single(c => c.Key == "embedding_backward").LiveIn);
        // Untied: the embedding's dense gradient is its final one, already counted.
        Assert.Equal(0, MemoryEstimator.Estimate(Tiny.Plan()).Bytes("embedding_backward"));
        // A frozen embedding (LoRA) is not differentiated.
        Assert.Equal(0, MemoryEstimator.Estimate(tied with { Lora = new LoraSettings(8, 16, ["q_proj"], 0) }).Bytes("embedding_backward"));

        // FSDP at 2 ranks: the root unit's full gradients (tied embedding 6,400 + final norm 64) live until the
        // reduce-scatter, half of them beyond this rank's share.
        var sharded = MemoryEstimator.Estimate(tied with { Sharding = new Sharding(ShardingStrategy.FullShard, 2) });
        Assert.Equal(3_232, sharded.Bytes("gradients_head"));
        Assert.Equal(6_464 - 3_232, sharded.Bytes("fsdp_root_gradients"));
        Assert.Equal(0, e.Bytes("fsdp_root_gradients"));
    }

    [Fact]
    public void OffloadPlacesComponentsOnTiers()
    {
        var optimizer = MemoryEstimator.Estimate(Tiny.Plan() with { Offload = OffloadPolicy.Optimizer });
        Assert.Equal(MemoryTier.Host, optimizer.Components.Single(c => c.Key == "optimizer_states").Tier);
        Assert.Equal(MemoryTier.Host, optimizer.Components.Single(c => c.Key == "gradients").Tier);
        Assert.Equal(MemoryTier.Device, optimizer.Components.Single(c => c.Key == "weights").Tier);
        Assert.Equal(10_880, optimizer.Bytes("gradient_buffer")); // one layer's gradients before the copy
        // Gradients and states; the host step (HostAdamWKernel) works in place, so no step temporaries anywhere.
        Assert.Equal(34_624 + 69_248, optimizer.HostBytes);
        Assert.Equal(0, optimizer.Bytes("optimizer_step"));

        var all = MemoryEstimator.Estimate(Tiny.Plan() with { Offload = OffloadPolicy.All });
        Assert.Equal(MemoryTier.Host, all.Components.Single(c => c.Key == "weights").Tier);
        Assert.Equal(2 * 10_880, all.Bytes("weight_stream"));

        // Disk: a LoRA run streams both layers' frozen weights from the files (fp32: 2 x 10,880 B) through two layer buffers;
        // embeddings, final norm, head and the adapters (q_proj r2: 2 x (2x16 + 16x2) x 4 B = 512 B) stay in memory.
        var lora = Tiny.Plan() with { Lora = new LoraSettings(2, 4, ["q_proj"], 0), Offload = OffloadPolicy.Disk };
        var disk = MemoryEstimator.Estimate(lora);
        Assert.Equal(2 * 10_880, disk.DiskBytes);
        Assert.Equal(2 * 10_880, disk.Bytes("weight_stream"));
        Assert.Equal(0, disk.Bytes("disk_staging"));
        Assert.Equal((1_600 + 16 + 1_600) * 4 + 512, disk.Bytes("weights"));
        // Streamed layers are recomputed in backward: activations as with checkpointing every layer.
        var checkpointed = MemoryEstimator.Estimate(lora with { Offload = OffloadPolicy.None, Checkpointing = Checkpointing.EveryLayer });
        Assert.Equal(checkpointed.Bytes("activation_recompute"), disk.Bytes("activation_recompute"));
        // bf16 files read into fp32: 2 B per weight on disk, and a staging slice of the largest stored tensor (640 x 2 B).
        var converted = MemoryEstimator.Estimate(lora with { Offload = OffloadPolicy.Disk with { StoredFloatBytes = 2 } });
        Assert.Equal(2 * 2_720 * 2, converted.DiskBytes);
        Assert.Equal(1_280, converted.Bytes("disk_staging"));
        // Generation with the first layer resident streams one layer.
        var generate = MemoryEstimator.Estimate(Tiny.Plan() with
        {
            Mode = RunMode.Generate,
            Optimizer = OptimizerKind.None,
            Offload = OffloadPolicy.Disk with { ResidentLayers = 1 },
        });
        Assert.Equal(10_880, generate.DiskBytes);
        Assert.Equal(8_656 * 4 - 10_880, generate.Bytes("weights"));
        Assert.Throws<PlanException>(() => MemoryEstimator.Estimate(Tiny.Plan() with { Offload = OffloadPolicy.Disk })); // full training: nothing frozen

        // On a CPU run the host is the device: nothing is "offloaded" to it.
        var cpu = MemoryEstimator.Estimate(Tiny.Plan() with
        {
            Offload = OffloadPolicy.Optimizer,
            Device = ComputeDevice.Cpu,
            Overhead = new FrameworkOverhead(0, 5_000),
        });
        Assert.Equal(0, cpu.HostBytes);
        // ... but what the policy placed there is still reported, as --offload optimizer prints it.
        Assert.Equal(34_624 + 69_248, cpu.PlacedBytes(MemoryTier.Host));
        Assert.Equal(MemoryTier.Host, cpu.Components.Single(c => c.Key == "optimizer_states").Placed);
        Assert.Equal(5_000, cpu.Bytes("runtime_baseline"));
        Assert.Equal(0, cpu.Bytes("cuda_context"));
    }

    [Fact]
    public void GradientAccumulationKeepsGradientsAliveAcrossTheStep()
    {
        var e = MemoryEstimator.Estimate(Tiny.Plan() with { GradientAccumulationSteps = 4 });
        Assert.Equal(Phases.All, e.Components.Single(c => c.Key == "gradients").LiveIn);
        Assert.Equal(MemoryEstimator.Estimate(Tiny.Plan()).DeviceBytesAt(Phases.ForwardEnd) + 28_160, e.DeviceBytesAt(Phases.ForwardEnd));
    }

    [Fact]
    public void MaxMicroBatchIsTheLargestThatFits()
    {
        var random = new Random(7);
        var plan = Tiny.Plan();
        long fixedPart = MemoryEstimator.Estimate(plan with { MicroBatchSize = 1 }).DeviceBytes;
        for (int trial = 0; trial < 25; trial++)
        {
            long budget = fixedPart + random.NextInt64(-1_000, 5_000_000);
            int batch = MemoryEstimator.MaxMicroBatch(plan, budget);
            if (batch == 0)
            {
                Assert.True(fixedPart > budget);
                continue;
            }
            Assert.True(MemoryEstimator.Estimate(plan with { MicroBatchSize = batch }).DeviceBytes <= budget);
            Assert.True(MemoryEstimator.Estimate(plan with { MicroBatchSize = batch + 1 }).DeviceBytes > budget);
        }
    }

    [Theory]
    [InlineData("rank")]
    [InlineData("target")]
    [InlineData("world")]
    [InlineData("batch")]
    [InlineData("quantized-full")]
    [InlineData("positions")]
    [InlineData("alpha")]
    public void InvalidPlansAreRefusedWithAReason(string what)
    {
        var plan = Tiny.Plan();
        var bad = what switch
        {
            // k_proj is 16 -> 8: rank 9 cannot exist.
            "rank" => plan with { Lora = new LoraSettings(9, 18, ["k_proj"], 0) },
            "target" => plan with { Lora = new LoraSettings(2, 4, ["fc1"], 0) },
            "world" => plan with { Sharding = new Sharding(ShardingStrategy.FullShard, 0) },
            "batch" => plan with { MicroBatchSize = -1 },
            "quantized-full" => plan with { Quantization = Quantization.Nf4 },
            "positions" => Tiny.Plan(Tiny.Opt()) with { SequenceLength = 17 },
            _ => plan with { Lora = new LoraSettings(2, 0, ["q_proj"], 0) },
        };
        var error = Assert.Throws<PlanException>(() => MemoryEstimator.Estimate(bad));
        Assert.False(string.IsNullOrWhiteSpace(error.Message));
    }

    [Fact]
    public void RankLimitMessageNamesTheLayer()
    {
        var error = Assert.Throws<PlanException>(() =>
            MemoryEstimator.Estimate(Tiny.Plan() with { Lora = new LoraSettings(9, 18, ["k_proj"], 0) }));
        Assert.Contains("k_proj", error.Message);
        Assert.Contains("at most 8", error.Message);
    }

    [Fact]
    public void AllLinearTargetsEveryDecoderLinear()
    {
        var plan = Tiny.Plan() with { Lora = new LoraSettings(1, 2, [LoraSettings.AllLinear], 0) };
        // Rank 1: sum over the 7 linears of (in + out) = 32 + 24 + 24 + 32 + 56 + 56 + 56 = 280 per layer; 560.
        Assert.Equal(560, MemoryEstimator.Estimate(plan).TrainableParameterCount);
    }
}
