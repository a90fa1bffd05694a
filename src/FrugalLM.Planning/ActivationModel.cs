namespace FrugalLM.Planning;

/// <summary>One tensor (or group) an autograd graph keeps for backward, per token of a micro-batch.</summary>
/// <param name="Name">What it is.</param>
/// <param name="BytesPerToken">Bytes per token (b·s tokens in a micro-batch).</param>
/// <param name="BytesPerTokenPerKey">Bytes per token per attended key (the s x s attention terms; b·s·s of them).</param>
public sealed record ActivationTerm(string Name, long BytesPerToken, long BytesPerTokenPerKey = 0)
{
    /// <summary>Bytes for a micro-batch of <paramref name="batch"/> sequences of <paramref name="sequence"/> tokens.</summary>
    public long Bytes(long batch, long sequence) =>
        checked(batch * sequence * BytesPerToken + batch * sequence * sequence * BytesPerTokenPerKey);
}

/// <summary>
/// Activation memory from the architecture, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
/// Large Transformer Models", section 4.1), adapted to what PyTorch's autograd keeps for these layers: RMSNorm or
/// LayerNorm, SwiGLU or ReLU MLPs, rotary positions, no dropout in LLaMA, fused (SDPA) or eager attention, and
/// frozen weights under LoRA (a linear layer keeps its input only when its weight, or an adapter on it, needs a
/// gradient). docs/estimator.md derives every term.
/// </summary>
public static class ActivationModel
{
    private const int Fp32 = 4;

    /// <summary>What one decoder layer keeps for backward while training.</summary>
    public static IReadOnlyList<ActivationTerm> LayerTerms(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var m = plan.Model;
        long a = plan.ComputeBytes, h = m.HiddenSize, q = m.AttentionDim, heads = m.NumAttentionHeads;
        var targets = plan.LoraTargets;
        double loraDropout = plan.Lora?.Dropout ?? 0;
        // A linear's input is needed by its weight gradient, or by a LoRA adapter reading it directly. With LoRA
        // dropout the adapter reads a dropped copy instead (counted below) and the frozen weight needs nothing.
        bool NeedsInput(string name) => plan.TrainsAllWeights || (targets.Contains(name) && loraDropout == 0);
        bool llama = m.Family == ModelFamily.Llama;
        long normStats = m.RmsNorm ? Fp32 : 2 * Fp32; // rstd (and the mean for LayerNorm), fp32 per token

        var terms = new List<ActivationTerm>
        {
            new("norm 1 input", h * a + normStats),
        };
        if (NeedsInput("q_proj") || NeedsInput("k_proj") || NeedsInput("v_proj"))
        {
            terms.Add(new("attention input (norm 1 output)", h * a));
        }
        terms.Add(new(llama ? "q, k, v after rotary, k and v expanded to every head" : "q, k, v", 3 * q * a));
        string outName = llama ? "o_proj" : "out_proj";
        if (plan.Attention == AttentionKind.Sdpa)
        {
            terms.Add(new("attention output (kept by SDPA)", q * a));
            terms.Add(new("attention log-sum-exp", heads * Fp32));
        }
        else
        {
            // Softmax in fp32 keeps its output; when computing in 16-bit the probabilities are cast back and the
            // cast copy is what P·V keeps.
            terms.Add(new("attention probabilities", 0, heads * (Fp32 + (a < Fp32 ? a : 0))));
            if (NeedsInput(outName))
            {
                terms.Add(new($"attention output ({outName} input)", q * a));
            }
        }
        if (m.ResidualDropout > 0)
        {
            terms.Add(new("attention residual dropout mask", h));
        }
        terms.Add(new("norm 2 input", h * a + normStats));
        if (llama)
        {
            long i = m.IntermediateSize;
            if (NeedsInput("gate_proj") || NeedsInput("up_proj"))
            {
                terms.Add(new("MLP input (norm 2 output)", h * a));
            }
            terms.Add(new("gate, up and silu(gate)", 3 * i * a));
            if (NeedsInput("down_proj"))
            {
                terms.Add(new("down_proj input", i * a));
            }
        }
        else
        {
            long f = m.IntermediateSize;
            if (NeedsInput("fc1"))
            {
                terms.Add(new("MLP input (norm 2 output)", h * a));
            }
            terms.Add(new("relu output (fc2 input)", f * a));
            if (m.ResidualDropout > 0)
            {
                terms.Add(new("MLP residual dropout mask", h));
            }
        }
        if (plan.Lora is { } lora)
        {
            long dropped = 0, inner = 0;
            foreach (var name in targets)
            {
                var linear = m.LayerLinears.First(l => l.Name == name);
                if (lora.Dropout > 0)
                {
                    dropped += linear.InFeatures * (a + 1); // dropped copy + bool mask
                }
                inner += lora.Rank * a; // A's output, B's input
            }
            if (dropped > 0)
            {
                terms.Add(new("LoRA dropout inputs and masks", dropped));
            }
            terms.Add(new("LoRA A outputs", inner));
        }
        return terms;
    }

    /// <summary>Bytes one decoder layer keeps for a micro-batch.</summary>
    public static long LayerBytes(RunPlan plan, long batch, long sequence) =>
        LayerTerms(plan).Sum(t => t.Bytes(batch, sequence));

    /// <summary>What training keeps after the decoder layers (final norm, LM head input) and the inputs.</summary>
    public static IReadOnlyList<ActivationTerm> HeadTerms(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var m = plan.Model;
        long a = plan.ComputeBytes;
        var terms = new List<ActivationTerm>();
        if (m.HasFinalNorm)
        {
            terms.Add(new("final norm input", m.HiddenSize * a + (m.RmsNorm ? Fp32 : 2 * Fp32)));
        }
        if (plan.TrainsAllWeights)
        {
            terms.Add(new("LM head input", m.EmbeddingDim * a));
        }
        terms.Add(new("token ids and labels (int64)", 16));
        return terms;
    }

    /// <summary>
    /// Peak bytes of logits and cross-entropy. Full: three fp32 tensors of tokens x vocabulary at once (the kept
    /// log-probabilities, the gradient arriving at them, the gradient leaving them), plus one at compute precision
    /// when the head computes in 16 bits on a CPU in fp16 (<see cref="LogitsBytes16"/>). Chunked (fused): one fp32 buffer
    /// of a chunk's logits, turned into their gradient in place, plus a 16-bit head's chunk of logits before the copy
    /// (not when training in fp16 on a CPU, whose head product runs from the head's fp32 copy); when training, the
    /// gradients computed in the forward pass and held until backward: of the hidden states (tokens x hidden, fp32),
    /// a 16-bit head's fp32 copy, and a trainable head's gradient in fp32, whose compute-precision part is the
    /// estimator's <c>gradients_head</c> (the fp32 buffer becomes the head's gradient).
    /// </summary>
    public static long LossBytes(RunPlan plan, long batch, long sequence)
    {
        ArgumentNullException.ThrowIfNull(plan);
        long tokens = checked(batch * sequence);
        return plan.Loss.Chunked
            ? FusedLossTerms(plan, tokens).Sum(t => t.Bytes)
            : checked(tokens * plan.Model.VocabSize * (3 * Fp32 + LogitsBytes16(plan)));
    }

    /// <summary>The formula of <see cref="LossBytes"/> for reports.</summary>
    public static string LossFormula(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        return plan.Loss.Chunked
            ? string.Join(" + ", FusedLossTerms(plan, 0).Select(t => t.Formula))
            : $"b x s x vocab x (12 + {LogitsBytes16(plan)}) B";
    }

    // The fused chunked loss's terms, bytes at `tokens` tokens and their formula (see LossBytes).
    private static IEnumerable<(long Bytes, string Formula)> FusedLossTerms(RunPlan plan, long tokens)
    {
        long chunk = Math.Min(tokens, plan.Loss.ChunkTokens);
        long vocab = plan.Model.VocabSize, hidden = plan.Model.HiddenSize, a = plan.ComputeBytes;
        bool head16 = a < Fp32 && !plan.HeadInFp32;
        bool train = plan.Mode == RunMode.Train;
        // A natively computed 16-bit head: its chunk of 16-bit logits, later of their gradient, and when trainable each
        // chunk's 16-bit weight gradient before it is added to the fp32 one. An fp16 head on a CPU trains from its fp32
        // copy instead (and evaluates through Matmul16, whose 16-bit logits count).
        bool native16 = head16 && !UpcastsFp16(plan);
        long perLogit = Fp32 + (head16 && !(train && UpcastsFp16(plan)) ? a : 0);
        yield return (checked(chunk * vocab * perLogit), $"min(b x s, {plan.Loss.ChunkTokens}) x vocab x {perLogit} B");
        if (!train)
        {
            yield break;
        }
        yield return (checked(tokens * hidden * Fp32), "b x s x hidden x 4 B");
        if (head16 && !native16)
        {
            yield return (checked(vocab * hidden * Fp32), "vocab x hidden x 4 B (fp32 head)");
        }
        if (plan.Lora is null && head16)
        {
            yield return (checked(vocab * hidden * (Fp32 - a)), $"vocab x hidden x {Fp32 - a} B (fp32 head gradient beyond gradients_head)");
        }
        if (plan.Lora is null && native16)
        {
            yield return (checked(vocab * hidden * a), $"vocab x hidden x {a} B (a chunk's 16-bit head gradient)");
        }
    }

    private static bool UpcastsFp16(RunPlan plan) => plan.Device == ComputeDevice.Cpu && plan.Precision == Precision.Fp16;

    /// <summary>
    /// Bytes per logit of 16-bit logits that live beside the fp32 ones: only fp16 on a CPU, whose head runs through
    /// fp32 tiles (<see cref="UpcastLayout"/>) and keeps its fp16 output. A natively computed 16-bit head's logits are
    /// widened and released before backward (measured on the bundled model at 4 x 256: counting them over-predicted
    /// bf16 and bf16-pure training by 94-115 MiB, 2 B a logit; fp16 needs them). 0 as well when the head is kept in
    /// fp32 (<see cref="RunPlan.HeadInFp32"/>: fp32 logits directly).
    /// </summary>
    public static long LogitsBytes16(RunPlan plan)
    {
        ArgumentNullException.ThrowIfNull(plan);
        return UpcastsFp16(plan) && !plan.HeadInFp32 ? plan.ComputeBytes : 0;
    }

    /// <summary>
    /// Gradients of activations in flight while one layer is differentiated: the residual stream's gradient and the
    /// widest group of intermediate gradients in the layer (gate/up/product for SwiGLU, dq/dk/dv/do for attention).
    /// </summary>
    public static long BackwardWorkspaceBytes(RunPlan plan, long batch, long sequence)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var m = plan.Model;
        long a = plan.ComputeBytes, h = m.HiddenSize, q = m.AttentionDim, i = m.IntermediateSize;
        long mlp = m.Family == ModelFamily.Llama ? 3 * i : 2 * i;
        return checked(batch * sequence * a * (2 * h + Math.Max(mlp, 4 * q)));
    }

    /// <summary>
    /// The largest set of temporaries one layer's forward holds when nothing is kept for backward (generation's
    /// prefill over the whole sequence), plus the fp32 logits of the last position.
    /// </summary>
    public static long GenerationWorkspaceBytes(RunPlan plan, long batch, long sequence)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var m = plan.Model;
        long a = plan.ComputeBytes, h = m.HiddenSize, q = m.AttentionDim, i = m.IntermediateSize;
        long attention = checked(batch * sequence * a * (2 * h + 4 * q));
        if (plan.Attention == AttentionKind.Eager)
        {
            attention = checked(attention + batch * sequence * sequence * m.NumAttentionHeads * (Fp32 + (a < Fp32 ? a : 0)));
        }
        long mlp = checked(batch * sequence * a * (2 * h + (m.Family == ModelFamily.Llama ? 3 * i : 2 * i)));
        return checked(Math.Max(attention, mlp) + batch * m.VocabSize * Fp32 + UpcastTilesBytes(plan, batch * sequence));
    }

    /// <summary>
    /// fp16 products on a CPU run in fp32 tiles (<see cref="UpcastLayout"/>): a weight tile, an output tile and
    /// the input's fp32 copy (widest input: the MLP's down projection) beside the 16-bit operands; 0 elsewhere.
    /// </summary>
    public static long UpcastTilesBytes(RunPlan plan, long rows)
    {
        ArgumentNullException.ThrowIfNull(plan);
        if (plan.Device != ComputeDevice.Cpu || plan.Precision != Precision.Fp16)
        {
            return 0;
        }
        long widest = plan.Model.LayerLinears.Max(l => (long)l.InFeatures);
        return checked(Fp32 * (2 * UpcastLayout.TileElements + rows * widest));
    }

    /// <summary>The KV cache: keys and values of every layer for every position, at compute precision.</summary>
    public static long KvCacheBytes(RunPlan plan, long batch, long sequence)
    {
        ArgumentNullException.ThrowIfNull(plan);
        var m = plan.Model;
        return checked(2L * m.NumHiddenLayers * batch * sequence * m.KeyValueDim * plan.ComputeBytes);
    }
}
