using System.Globalization;

namespace FrugalLM.Planning;

/// <summary>
/// FrugalLM's detailed memory estimator: every parameter tensor, gradient, optimizer state, activation, the loss,
/// the KV cache and the framework's own memory, each placed on a tier and given the phases of a step in which it is
/// alive. The device peak is the largest phase total. docs/estimator.md derives each component.
/// </summary>
public static class MemoryEstimator
{
    /// <summary>The largest micro-batch <see cref="MaxMicroBatch"/> searches up to.</summary>
    public const int MaxBatchSearchLimit = 1 << 20;

    private const int EmbeddingUnit = -1;
    private const int HeadUnit = -2;

    /// <summary>Estimates the memory of one plan.</summary>
    /// <exception cref="PlanException">The plan is invalid.</exception>
    public static MemoryEstimate Estimate(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var warnings = plan.Validate();
        var tensors = Account(plan);
        var components = plan.Trains ? TrainingComponents(plan, tensors) : GenerationComponents(plan, tensors);
        components.AddRange(Overhead(plan));
        return new MemoryEstimate(plan, components.Where(c => c.Bytes > 0).ToArray(), warnings, tensors.TrainableCount);
    }

    /// <summary>
    /// The largest micro-batch whose device peak fits <paramref name="deviceBudgetBytes"/>; 0 when even one
    /// sequence (or the part that does not depend on the batch) does not fit. The search stops at
    /// <see cref="MaxBatchSearchLimit"/>.
    /// </summary>
    public static int MaxMicroBatch(RunPlan plan, long deviceBudgetBytes)
    {
        ArgumentNullException.ThrowIfNull(plan);
        bool Fits(int batch)
        {
            try
            {
                return Estimate(plan with { MicroBatchSize = batch }).DeviceBytes <= deviceBudgetBytes;
            }
            catch (OverflowException)
            {
                return false;
            }
        }
        if (!Fits(1))
        {
            return 0;
        }
        // Every batch-dependent term grows with the batch, so the device peak is monotone: double, then bisect.
        int fits = 1, fails = 2;
        while (fails <= MaxBatchSearchLimit && Fits(fails))
        {
            fits = fails;
            fails *= 2;
        }
        if (fails > MaxBatchSearchLimit)
        {
            return fits;
        }
        while (fails - fits > 1)
        {
            int mid = fits + (fails - fits) / 2;
            if (Fits(mid))
            {
                fits = mid;
            }
            else
            {
                fails = mid;
            }
        }
        return fits;
    }

    /// <summary>
    /// Bytes of optimizer state for one tensor of <paramref name="count"/> elements. 8-bit AdamW keeps fp32 moments
    /// for small tensors and for embedding tables (<paramref name="role"/>), as the trainer does.
    /// </summary>
    public static long OptimizerStateBytes(RunPlan plan, long count, TensorRole role = TensorRole.LayerLinearWeight)
    {
        ArgumentNullException.ThrowIfNull(plan);
        int s = plan.OptimizerStateBytes;
        return plan.Optimizer switch
        {
            OptimizerKind.AdamW => 2 * s * count,
            OptimizerKind.AdamW8bit when count < AdamW8bitLayout.MinTensorSize || role is TensorRole.Embedding or TensorRole.PositionEmbedding => 2 * 4 * count,
            OptimizerKind.AdamW8bit => 2 * (count + 4 * ((count + AdamW8bitLayout.BlockSize - 1) / AdamW8bitLayout.BlockSize)),
            OptimizerKind.SgdMomentum => s * count,
            _ => 0,
        };
    }

    /// <summary>Every tensor of the plan: the model's, then LoRA's A and B for each target of each layer.</summary>
    public static IEnumerable<ParameterTensor> Tensors(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        foreach (var t in plan.Model.Tensors())
        {
            yield return t;
        }
        if (plan.Lora is not { } lora)
        {
            yield break;
        }
        var targets = plan.LoraTargets;
        for (int layer = 0; layer < plan.Model.NumHiddenLayers; layer++)
        {
            foreach (var linear in plan.Model.LayerLinears.Where(l => targets.Contains(l.Name)))
            {
                yield return new($"layers.{layer}.{linear.Name}.lora_A", (long)lora.Rank * linear.InFeatures,
                    TensorRole.LoraA, layer, linear.Name, lora.Rank);
                yield return new($"layers.{layer}.{linear.Name}.lora_B", (long)linear.OutFeatures * lora.Rank,
                    TensorRole.LoraB, layer, linear.Name, linear.OutFeatures);
            }
        }
    }

    private sealed class Unit
    {
        public long Weights;
        public long TrainableWeights;

        // Frozen float weights of a decoder layer (a LoRA run's base): FULL_SHARD shards and gathers them with the layer.
        public long FrozenFloat;
        public long Gradients;
        public long Masters;
        public long States;
        public long Trainable;

        // Disk offload: the frozen weights a streamed layer reads (in memory and as stored), the largest tensor converted
        // from another stored width on each read, and the largest linear weight quantized on each read.
        public long Frozen;
        public long Stored;
        public long LargestConverted;
        public long LargestQuantized;
    }

    private sealed class TensorAccount
    {
        public readonly Dictionary<int, Unit> Units = [];
        public long TrainableCount;
        public long LargestTrainable;
        public long LargestTrainableOptimizerBytes;
        public bool Tied;

        public Unit this[int key] => Units.TryGetValue(key, out var u) ? u : Units[key] = new Unit();

        public long Sum(Func<Unit, long> f) => Units.Values.Sum(f);

        public long Sharded(Func<Unit, long> f, int ranks) => Units.Values.Sum(u => (f(u) + ranks - 1) / ranks);

        public long Largest(Func<Unit, long> f) => Units.Values.Max(f);

        public long LargestLayer(Func<Unit, long> f) => Units.Where(kv => kv.Key >= 0).Max(kv => f(kv.Value));
    }

    private static TensorAccount Account(RunPlan plan)
    {
        var account = new TensorAccount { Tied = plan.Model.TieWordEmbeddings };
        long a = plan.ComputeBytes;
        foreach (var t in Tensors(plan))
        {
            bool adapter = t.Role is TensorRole.LoraA or TensorRole.LoraB;
            bool trainable = plan.Trains && (plan.Lora is null ? !adapter : adapter);
            bool quantized = plan.Quantization.Kind != QuantizationKind.None && t.Role == TensorRole.LayerLinearWeight;
            int key = t.Layer >= 0 ? t.Layer : t.Role is TensorRole.FinalNorm or TensorRole.LmHead ? HeadUnit : EmbeddingUnit;
            var unit = account[key];
            long inMemory = quantized ? plan.Quantization.WeightBytes(t.Count, t.Rows) : t.Count * (plan.KeepsInFp32(t.Role) ? 4 : a);
            unit.Weights += inMemory;
            if (!adapter)
            {
                long stored = plan.Offload.StoredFloatBytes > 0 ? plan.Offload.StoredFloatBytes : a;
                bool quantizedOnRead = quantized && !plan.Offload.StoredInt8;
                long storedBytes = quantized && plan.Offload.StoredInt8 ? inMemory : t.Count * stored;
                unit.Frozen += inMemory;
                unit.Stored += storedBytes;
                if (quantizedOnRead)
                {
                    unit.LargestQuantized = Math.Max(unit.LargestQuantized, t.Count);
                }
                if (quantizedOnRead ? stored != 4 : storedBytes != inMemory)
                {
                    unit.LargestConverted = Math.Max(unit.LargestConverted, storedBytes);
                }
            }
            if (!trainable)
            {
                if (t.Layer >= 0 && !quantized)
                {
                    unit.FrozenFloat += inMemory;
                }
                continue;
            }
            unit.TrainableWeights += inMemory;
            long masters = plan.UsesMasterWeights ? 4 * t.Count : 0;
            long states = OptimizerStateBytes(plan, t.Count, t.Role);
            unit.Gradients += t.Count * a;
            unit.Masters += masters;
            unit.States += states;
            unit.Trainable += t.Count;
            account.TrainableCount += t.Count;
            account.LargestTrainable = Math.Max(account.LargestTrainable, t.Count);
            account.LargestTrainableOptimizerBytes = Math.Max(account.LargestTrainableOptimizerBytes, masters + states);
        }
        return account;
    }

    private static List<MemoryComponent> TrainingComponents(RunPlan plan, TensorAccount t)
    {
        var m = plan.Model;
        var offload = plan.EffectiveOffload;
        long b = plan.MicroBatchSize, s = plan.SequenceLength, a = plan.ComputeBytes;
        int ranks = plan.Sharding.Shards ? plan.Sharding.WorldSize : 1;
        bool fullShard = plan.Sharding.Strategy == ShardingStrategy.FullShard && ranks > 1;
        // FSDP at any world size, one rank included: its units gather into buffers of their own (copies of the shards at
        // one rank), and FULL_SHARD recomputes each layer in backward, keeping only layer inputs like checkpointing.
        bool fsdp = plan.Sharding.Strategy != ShardingStrategy.None;
        bool recomputes = plan.Sharding.Strategy == ShardingStrategy.FullShard;
        string per = ranks > 1 ? string.Create(CultureInfo.InvariantCulture, $", sharded over {ranks} ranks") : "";
        var list = new List<MemoryComponent>();

        // FSDP shards what trains and the decoder layers' frozen float weights (a LoRA base); int8 layers' weights and the
        // root unit's frozen parameters (a LoRA run's embeddings, final norm, head) are replicated on every rank, as
        // FrugalLM's FSDP does.
        long replicated = t.Sum(u => u.Weights - u.TrainableWeights - u.FrozenFloat);
        bool frozenSharded = t.Sum(u => u.FrozenFloat) > 0;
        // SHARD_GRAD_OP (any world size): each rank keeps its shards of what trains (in fp32 they are the weights; under
        // mixed precision the masters, counted below), the frozen weights whole, and the root unit gathered; the decoder
        // layers are gathered from their forward until their backward (fsdp_gathered below).
        bool gradOp = fsdp && !recomputes;
        long weights = fullShard ? t.Sharded(u => u.TrainableWeights + u.FrozenFloat, ranks) + replicated
            : gradOp ? (plan.UsesMasterWeights ? 0 : t.Sharded(u => u.TrainableWeights, ranks)) + t.Sum(u => u.Weights - u.TrainableWeights)
                + t[EmbeddingUnit].TrainableWeights + t[HeadUnit].TrainableWeights
            : t.Sum(u => u.Weights);
        if (plan.StreamsWeights)
        {
            list.Add(new("weights", WeightsLabel(plan) + " kept in memory: embeddings, head, norms, adapters", weights - StreamedFrozen(plan, t),
                MemoryTier.Device, Phases.All, WeightsFormula(plan) + "; streamed layers' frozen weights excluded"));
        }
        else
        {
            list.Add(new("weights", WeightsLabel(plan), weights, offload.Weights, Phases.All,
                WeightsFormula(plan) + (fullShard ? per + (replicated > 0 ? " (trainable and decoder layers' frozen float weights; "
                    + (plan.Quantization.Kind == QuantizationKind.None ? "the frozen embeddings and head" : "int8 layers and the frozen embeddings and head") + " replicated)"
                    : frozenSharded ? " (trainable and frozen)" : "") : "")) { Placed = plan.Offload.Weights });
        }
        var placed = plan.Offload; // before a CPU run lifts host into device
        list.Add(new("master_weights", "fp32 master weights of trainable parameters", t.Sharded(u => u.Masters, ranks),
            offload.OptimizerStates, Phases.All, "4 B x trainable parameters" + per) { Placed = placed.OptimizerStates });

        long headGradients = t[HeadUnit].Gradients + (t.Tied ? t[EmbeddingUnit].Gradients : 0);
        long headShare = (headGradients + ranks - 1) / ranks;
        long allGradients = t.Sharded(u => u.Gradients, ranks);
        string gradFormula = $"{a} B x trainable parameters{per}";
        bool accumulating = plan.GradientAccumulationSteps > 1;
        list.Add(new("gradients_head", "gradients of the LM head and final norm (first in backward)", headShare,
            offload.Gradients, Phases.All, gradFormula) { Placed = placed.Gradients });
        list.Add(new("gradients", plan.Lora is null ? "gradients of the decoder layers and embeddings" : "gradients of the LoRA adapters",
            allGradients - headShare,
            offload.Gradients, accumulating ? Phases.All : Phases.BackwardEnd | Phases.OptimizerStep,
            gradFormula + (accumulating ? "; kept across accumulated micro-batches" : "")) { Placed = placed.Gradients });
        list.Add(new("optimizer_states", $"{PlanNames.Format(plan.Optimizer)} states", t.Sharded(u => u.States, ranks),
            offload.OptimizerStates, Phases.All, OptimizerFormula(plan) + per) { Placed = placed.OptimizerStates });

        // The host step (HostAdamWKernel) updates masters and moments in place: no temporaries to count. So does AdamW's
        // fused CPU step (the same kernel) wherever it applies.
        bool moments16Bit = plan.OptimizerStateBytes < 4 && plan.Optimizer == OptimizerKind.AdamW;
        bool parameter16Bit = a < 4 && !plan.UsesMasterWeights;
        bool fusedStep = plan.Optimizer is OptimizerKind.AdamW or OptimizerKind.AdamW8bit
            && OptimizerStepLayout.Fused(plan.Device == ComputeDevice.Cpu, moments16Bit, parameter16Bit);
        if (plan.Optimizer != OptimizerKind.None && t.TrainableCount > 0 && !plan.Offload.StepsOnHost && !fusedStep)
        {
            // The step walks the tensors one at a time, each in chunks (OptimizerStepLayout); under sharding its tensors
            // are each unit's flat shard.
            long stepElements = ranks > 1 ? (t.Largest(u => u.Trainable) + ranks - 1) / ranks : t.LargestTrainable;
            long chunk = Math.Min(stepElements, OptimizerStepLayout.ChunkElements);
            bool adam = plan.Optimizer is OptimizerKind.AdamW or OptimizerKind.AdamW8bit;
            long perValue = adam
                ? OptimizerStepLayout.TemporaryBytesPerValue(
                    gradient16Bit: a < 4,
                    moments16Bit: moments16Bit,
                    moments8Bit: plan.Optimizer == OptimizerKind.AdamW8bit,
                    parameter16Bit: parameter16Bit)
                : (a < 4 ? 4L : 0L); // SGD: the fp32 copy of a 16-bit gradient
            list.Add(new("optimizer_step", "optimizer step temporaries (one chunk)", chunk * perValue,
                offload.OptimizerStates == MemoryTier.Device ? MemoryTier.Device : MemoryTier.Host, Phases.OptimizerStep,
                string.Create(CultureInfo.InvariantCulture,
                    $"{perValue} B x min(largest trainable tensor{(ranks > 1 ? " (a unit's shard)" : "")}, {OptimizerStepLayout.ChunkElements} values): the step goes chunk by chunk")));
        }

        // Activations.
        long layer = ActivationModel.LayerBytes(plan, b, s);
        // Disk offload runs each streamed layer without a graph and recomputes it in backward: checkpointing every layer.
        int layers = m.NumHiddenLayers, k = plan.StreamsWeights || plan.StreamsFromHost || recomputes || (fsdp && plan.Checkpointing.Enabled) ? 1 : plan.Checkpointing.Interval;
        // The full loss peaks in its own backward, where the last layer's recomputed activations and the first activation
        // gradients are counted as about to exist. The fused chunked loss peaks in its forward pass, when neither exists
        // (measured on the bundled model: fp32 with checkpointing over-predicted by 35 MiB with them counted there).
        var backwardOnly = plan.Loss.Chunked ? Phases.BackwardEnd : Phases.ForwardEnd | Phases.BackwardEnd;
        if (k == 0)
        {
            list.Add(new("activations", "activations kept by every decoder layer", checked(layers * layer), MemoryTier.Device,
                Phases.ForwardEnd, $"{layers} layers x per-layer terms"));
            list.Add(new("activations_last_layer", "activations of the layer differentiated last", layer, MemoryTier.Device,
                Phases.BackwardEnd, "one layer's terms"));
        }
        else
        {
            long segments = (layers + k - 1) / k;
            // Alive into backward: each segment's input is released by its own backward, so while the last segment is
            // recomputed and differentiated every checkpoint still exists (measured on llama-100m, fp32 LoRA with
            // checkpointing at 2 x 512: the peak is in a layer's backward, 49 MiB over an estimate without them).
            list.Add(new("activations", "checkpoints (segment inputs)", checked(segments * b * s * m.HiddenSize * a),
                MemoryTier.Device, Phases.ForwardEnd | Phases.BackwardEnd, $"{segments} segments x b x s x hidden x {a} B"));
            list.Add(new("activation_recompute", $"recomputed activations of one segment ({k} layer{(k > 1 ? "s" : "")})",
                checked(k * layer), MemoryTier.Device, backwardOnly, $"{k} x per-layer terms"));
        }
        list.Add(new("activations_head", "final norm, LM head input, token ids and labels",
            ActivationModel.HeadTerms(plan).Sum(term => term.Bytes(b, s)), MemoryTier.Device, Phases.ForwardEnd | Phases.BackwardEnd,
            "head terms"));
        list.Add(new("activation_gradients", "activation gradients in flight (one layer)", ActivationModel.BackwardWorkspaceBytes(plan, b, s),
            MemoryTier.Device, backwardOnly, "b x s x (2 hidden + widest intermediate group)"));
        list.Add(new("loss", plan.Loss.Chunked ? "one chunk of logits and the fused loss's gradients" : "fp32 logits and loss", ActivationModel.LossBytes(plan, b, s),
            MemoryTier.Device, Phases.ForwardEnd, ActivationModel.LossFormula(plan)));
        if (plan.Device == ComputeDevice.Cpu)
        {
            // oneMKL keeps the panels it packs operands into and reuses them for every later product; their size follows
            // the products' shapes, the LM head's the largest (libtorch 2.10's oneMKL 2024.0, 2 threads, [256, hidden] by
            // [hidden, vocab >= 32000]: 16.4 MiB at hidden 128, 26.2 at 256-512, 36.2 at 768-1536, 39.0 at 2048-4096). The
            // runtime baseline's warm-up products are too small to fill them, so a training run holds them beside it.
            list.Add(new("gemm_workspace", "oneMKL's packed operand panels (CPU products, the LM head's the largest)", CpuGemmWorkspaceBytes,
                MemoryTier.Device, Phases.All, "32 MiB (measured 16-39 MiB)"));
        }

        // A tied embedding is differentiated last, when the activations are gone: libtorch's embedding backward makes a
        // dense [vocab, hidden] gradient while the head's is still held, and autograd adds the two into a third
        // (measured with FRUGAL_MEMTRACE's backward marks on llama-100m with vocab 50257: +294 MiB = 2 x 147 MiB above the
        // resident set where the embedding's backward begins). An untied embedding's dense gradient is its final one.
        // The fused chunked loss sets the head's gradient as the leaf's .grad itself, so autograd adds the embedding's dense
        // gradient into it in place: one dense gradient (measured on the bundled model, fp32 with checkpointing: +49 MiB at
        // the embedding's backward, 1 x 49).
        long embeddingGradients = t[EmbeddingUnit].Gradients;
        if (t.Tied && embeddingGradients > 0)
        {
            int copies = plan.Loss.Chunked ? 1 : 2;
            list.Add(new("embedding_backward", plan.Loss.Chunked ? "tied embedding's dense gradient" : "tied embedding's dense gradient and its sum with the head's",
                copies * embeddingGradients, MemoryTier.Device, Phases.BackwardEnd, $"{copies} x vocab x hidden x {a} B"));
        }

        // Buffers of sharding and offloading.
        if (ranks > 1 && headGradients > headShare)
        {
            // The root unit (embeddings, final norm, head) stays gathered, so autograd gives every rank its full gradients,
            // which live from the head's backward until the reduce-scatter after the micro-batch.
            list.Add(new("fsdp_root_gradients", "FSDP root unit's full gradients before reduce-scatter (beyond this rank's share)",
                headGradients - headShare, MemoryTier.Device, Phases.ForwardEnd | Phases.BackwardEnd, "root gradients x (1 - 1/ranks)"));
        }
        if (recomputes)
        {
            // The root stays gathered. A decoder layer is gathered for its forward (with the next one prefetched) and freed
            // after it, and again for its backward (with the previous one prefetched): after the last layer's forward, while
            // the loss is differentiated, no layer is gathered (llama-100m, 4 ranks at 2 x 512: rank 0 peaked in the loss's
            // backward at 904 MiB, against 1025 predicted with two layers counted there). A layer gathers its trainable and
            // its frozen float weights; the root's frozen weights are counted as replicated.
            list.Add(new("fsdp_gathered", "FSDP gathered root unit (embeddings, final norm, head)", t[EmbeddingUnit].TrainableWeights + t[HeadUnit].TrainableWeights,
                MemoryTier.Device, Phases.ForwardEnd | Phases.BackwardEnd, "trainable weights of embedding + head"));
            list.Add(new("fsdp_gathered_layers", "FSDP gathered decoder layers in backward (current and prefetched)", 2 * t.LargestLayer(u => u.TrainableWeights + u.FrozenFloat),
                MemoryTier.Device, Phases.BackwardEnd, "2 x largest layer (its trainable and frozen float weights)"));
        }
        else if (gradOp)
        {
            // Measured on llama-100m at 2 x 512 per rank, 2 ranks: 2147 MiB against 1941 predicted when the weights were
            // counted once, whole (the shards were missing).
            list.Add(new("fsdp_gathered", "FSDP gathered decoder layers (every layer from its forward to its backward)",
                t.Sum(u => u.TrainableWeights) - t[EmbeddingUnit].TrainableWeights - t[HeadUnit].TrainableWeights,
                MemoryTier.Device, Phases.ForwardEnd, "trainable weights of every decoder layer"));
            list.Add(new("fsdp_gathered_last", "FSDP gathered decoder layer still held at the end of backward",
                t.LargestLayer(u => u.TrainableWeights), MemoryTier.Device, Phases.BackwardEnd, "largest decoder layer's trainable weights"));
        }
        else if (plan.StreamsFromHost)
        {
            list.Add(new("weight_stream", "device buffers for weights streamed from the host (current and next decoder layer)", 2 * t.LargestLayer(u => u.Frozen),
                MemoryTier.Device, Phases.ForwardEnd | Phases.BackwardEnd, "2 x largest decoder layer's weights (adapters excluded)"));
        }
        if (fsdp)
        {
            // A decoder layer's full gradients live from its backward to its reduce-scatter. The root unit's (embeddings,
            // head) are gradients_head and fsdp_root_gradients above: counting the root here too counted them twice, and at
            // the loss's backward no layer has gradients yet (bundled model, FULL_SHARD at one rank: predicted 977 against
            // 868 MiB measured, the root's 49 MiB twice).
            list.Add(new("gradient_buffer", "unsharded gradients of one decoder layer before reduce-scatter", t.LargestLayer(u => u.Gradients),
                MemoryTier.Device, Phases.BackwardEnd, "largest decoder layer's gradients"));
        }
        else if (offload.Gradients != MemoryTier.Device)
        {
            list.Add(new("gradient_buffer", "gradients of one unit before transfer", t.Largest(u => u.Gradients), MemoryTier.Device,
                Phases.ForwardEnd | Phases.BackwardEnd, "largest unit's gradients"));
        }
        list.AddRange(DiskStaging(plan, t));
        return list;
    }

    private static List<MemoryComponent> GenerationComponents(RunPlan plan, TensorAccount t)
    {
        var offload = plan.EffectiveOffload;
        long b = plan.MicroBatchSize, s = plan.SequenceLength;
        var list = new List<MemoryComponent>
        {
            plan.StreamsWeights
                ? new("weights", WeightsLabel(plan) + " kept in memory: embeddings, head, final norm, resident layers", t.Sum(u => u.Weights) - StreamedFrozen(plan, t),
                    MemoryTier.Device, Phases.All | Phases.Loading, WeightsFormula(plan) + "; streamed layers excluded")
                : new("weights", WeightsLabel(plan), t.Sum(u => u.Weights), offload.Weights, Phases.All | Phases.Loading, WeightsFormula(plan)) { Placed = plan.Offload.Weights },
            LoadWorkspace(plan),
            new("kv_cache", "KV cache", ActivationModel.KvCacheBytes(plan, b, s), MemoryTier.Device, Phases.All,
                $"2 x layers x b x s x kv_heads x head_dim x {plan.ComputeBytes} B"),
            new("generation_workspace", "forward temporaries (prefill) and last-position logits",
                ActivationModel.GenerationWorkspaceBytes(plan, b, s), MemoryTier.Device, Phases.All, "widest block of one layer"),
            new("inputs", "token ids (int64)", checked(b * s * 8), MemoryTier.Device, Phases.All, "b x s x 8 B"),
        };
        if (plan.StreamsFromHost)
        {
            list.Add(new("weight_stream", "device buffers for weights streamed from the host (current and next decoder layer)", 2 * t.LargestLayer(u => u.Frozen),
                MemoryTier.Device, Phases.All, "2 x largest decoder layer's weights (adapters excluded)"));
        }
        if (plan.Loss.Chunked)
        {
            // frugal eval: the held-out loss of a batch, its head and loss run a chunk of tokens at a time without a graph
            // (measured on the main job's eval at 8 x 48 tokens: 210 MiB above the baseline against 69 predicted without it).
            list.Add(new("evaluation_loss", "held-out loss: one chunk's logits", ActivationModel.LossBytes(plan, b, s),
                MemoryTier.Device, Phases.All, ActivationModel.LossFormula(plan)));
        }
        list.AddRange(DiskStaging(plan, t));
        return list;
    }

    // Loading the weights: a slice of a tensor (at most 8 MiB of the largest, read as fp32) and its mapped file pages,
    // or, when linear layers are quantized from a float checkpoint while loading, the largest such layer's fp32
    // copy and temporaries.
    private static MemoryComponent LoadWorkspace(RunPlan plan)
    {
        var m = plan.Model;
        long largestLinear = m.LayerLinears.Max(l => (long)l.InFeatures * l.OutFeatures);
        long slices = 2 * Math.Min(WeightLoadLayout.SliceBytes, Math.Max((long)m.VocabSize * m.HiddenSize, largestLinear) * 4);
        long quantize = plan.Quantization.Kind == QuantizationKind.None ? 0 : largestLinear * WeightLoadLayout.QuantizeBytesPerValue;
        return quantize > slices
            ? new("load_workspace", "loading: the largest linear layer quantized from its fp32 copy", quantize, MemoryTier.Device, Phases.Loading,
                $"largest layer weight x {WeightLoadLayout.QuantizeBytesPerValue} B")
            : new("load_workspace", "loading: one slice of a tensor and its mapped file pages", slices, MemoryTier.Device, Phases.Loading,
                "2 x min(8 MiB, largest tensor in fp32)");
    }

    // The frozen weights of the streamed layers (the last StreamedLayers decoder layers), in memory form.
    private static long StreamedFrozen(RunPlan plan, TensorAccount t) => Streamed(plan, t).Sum(u => u.Frozen);

    private static IEnumerable<Unit> Streamed(RunPlan plan, TensorAccount t) =>
        t.Units.Where(kv => kv.Key >= plan.Model.NumHiddenLayers - plan.StreamedLayers).Select(kv => kv.Value);

    // Disk offload, as the layer streamer runs it: the streamed layers' weights stay in their files (disk tier); each is
    // read into one of DiskOffloadLayout.Slots buffers of the largest streamed layer; a read that converts a stored width
    // goes through one staging slice, and one that quantizes to int8 holds the largest linear weight in fp32 with its
    // temporaries. Reads run on a background thread during compute, so all of it is alive throughout.
    private static IEnumerable<MemoryComponent> DiskStaging(RunPlan plan, TensorAccount t)
    {
        if (!plan.StreamsWeights || plan.StreamedLayers == 0)
        {
            yield break;
        }
        var streamed = Streamed(plan, t).ToList();
        var live = Phases.All | (plan.Trains ? Phases.None : Phases.Loading);
        var memory = plan.Device == ComputeDevice.Cpu ? MemoryTier.Device : MemoryTier.Host;
        yield return new("weights_disk", string.Create(CultureInfo.InvariantCulture, $"frozen weights of {plan.StreamedLayers} streamed decoder layers, read from the safetensors files"),
            streamed.Sum(u => u.Stored), MemoryTier.Disk, Phases.All, "stored bytes of the streamed layers");
        int slots = Math.Min(DiskOffloadLayout.Slots, plan.StreamedLayers); // one streamed layer needs one buffer
        yield return new("weight_stream", $"{slots} layer buffer{(slots > 1 ? "s (layer in flight and the one read ahead)" : "")}",
            slots * streamed.Max(u => u.Frozen), memory, live, $"min({DiskOffloadLayout.Slots}, streamed layers) x largest streamed layer");
        long slice = Math.Min(WeightLoadLayout.SliceBytes, streamed.Max(u => u.LargestConverted));
        long quantize = streamed.Max(u => u.LargestQuantized) * WeightLoadLayout.QuantizeBytesPerValue;
        if (slice + quantize > 0)
        {
            yield return new("disk_staging", quantize > 0 ? "reading: the largest linear weight quantized to int8 from its fp32 copy, and one staging slice"
                    : "reading: one staging slice converting the stored width",
                slice + quantize, memory, live,
                quantize > 0 ? $"largest layer weight x {WeightLoadLayout.QuantizeBytesPerValue} B + min(8 MiB, largest stored tensor)" : "min(8 MiB, largest stored tensor)");
        }
    }

    /// <summary>oneMKL's retained panels during CPU training (see the <c>gemm_workspace</c> component).</summary>
    public const long CpuGemmWorkspaceBytes = 32L << 20;

    private static IEnumerable<MemoryComponent> Overhead(RunPlan plan)
    {
        if (plan.Overhead.ContextBytes > 0)
        {
            yield return new("cuda_context", "CUDA context and kernels", plan.Overhead.ContextBytes, MemoryTier.Device,
                Phases.All | Phases.Loading, "configured (article: about 1.3 GB)");
        }
        if (plan.Overhead.RuntimeBaselineBytes > 0)
        {
            var tier = plan.Device == ComputeDevice.Cpu ? MemoryTier.Device : MemoryTier.Host;
            yield return new("runtime_baseline", "runtime baseline (process before the model)", plan.Overhead.RuntimeBaselineBytes,
                tier, Phases.All | Phases.Loading, "measured by the runtime");
        }
    }

    private static string WeightsLabel(RunPlan plan)
    {
        var precision = plan.Precision == Precision.Fp32 ? "fp32" : plan.Precision == Precision.Fp16 ? "fp16" : "bf16";
        return plan.Quantization.Kind switch
        {
            QuantizationKind.Int8 => $"weights (int8 linear layers, rest {precision})",
            QuantizationKind.Nf4 => $"weights (NF4 linear layers, rest {precision})",
            _ => plan.Lora is null ? $"weights ({precision})" : $"weights and LoRA adapters ({precision})",
        };
    }

    private static string WeightsFormula(RunPlan plan) => BaseWeightsFormula(plan)
        + (plan.Trains && plan.Fp32NormsAndHead && plan.ComputeBytes < 4 ? "; 4 B for norms and an untied LM head" : "");

    private static string BaseWeightsFormula(RunPlan plan) => plan.Quantization.Kind switch
    {
        QuantizationKind.Int8 => $"1 B per linear weight + 4 B per output row; {plan.ComputeBytes} B for the rest",
        QuantizationKind.Nf4 => string.Create(CultureInfo.InvariantCulture,
            $"0.5 B per linear weight + absmax per {plan.Quantization.Nf4BlockSize}{(plan.Quantization.Nf4DoubleQuant ? " (8-bit, double quant)" : " (fp32)")}; {plan.ComputeBytes} B for the rest"),
        _ => $"{plan.ComputeBytes} B x parameters",
    };

    private static string OptimizerFormula(RunPlan plan) => plan.Optimizer switch
    {
        OptimizerKind.AdamW => $"2 x {plan.OptimizerStateBytes} B x trainable parameters",
        OptimizerKind.AdamW8bit => $"2 x (1 B + 4 B / {AdamW8bitLayout.BlockSize}) per parameter; 8 B for embeddings and tensors under {AdamW8bitLayout.MinTensorSize} elements",
        OptimizerKind.SgdMomentum => $"{plan.OptimizerStateBytes} B x trainable parameters",
        _ => "none",
    };
}
