using FrugalLM.Native;
using FrugalLM.Precision;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>
/// Next-token cross-entropy summed over the positions that take a loss. Two ways, same value and
/// gradients: <see cref="Full"/> materializes fp32 logits [tokens, vocab] as transformers does;
/// <see cref="Chunked"/> never does: it runs the LM head and loss over chunks of tokens in one reused buffer and
/// computes each chunk's gradients at once, so at most one chunk of logits exists at a time.
/// </summary>
public static class CausalLmLoss
{
    /// <summary>Sum of per-token losses from full fp32 logits [N, vocab] and labels [N].</summary>
    /// <remarks>
    /// The loss's graph keeps only log-softmax's own output, so the views made here are released at once; a
    /// caller that no longer needs <paramref name="logits"/> should release it too (as
    /// <see cref="Evaluation.LossSum"/> does). A handle left to the step's dispose scope keeps a
    /// [tokens, vocab] tensor alive through backward that PyTorch would already have freed.
    /// </remarks>
    public static Tensor Full(Tensor logits, Tensor labels)
    {
        using var flat = logits.reshape(-1, logits.shape[^1]);
        using var wide = flat.to(ScalarType.Float32);
        using var targets = labels.reshape(-1);
        return nn.functional.cross_entropy(wide, targets, ignore_index: TrainingBatch.IgnoreLabel, reduction: nn.Reduction.Sum);
    }

    /// <summary>
    /// Sum of per-token losses of hidden states [N, hidden] under the head weight [vocab, hidden], computed
    /// <paramref name="chunk"/> tokens at a time; differentiable in both the hidden states and the weight.
    /// </summary>
    /// <remarks>
    /// Fused, as Liger-Kernel's linear cross-entropy: when a gradient will be asked for, each chunk's gradients (of the
    /// hidden states and of the head weight) are computed right after its loss, in the forward pass, from the chunk's
    /// logits turned into softmax - onehot in place; backward only scales them by the incoming gradient. One fp32 buffer
    /// of [chunk, vocab] serves every chunk, so no [tokens, vocab] tensor and no per-chunk allocation exists, and no logits
    /// are recomputed (the earlier version recomputed each chunk's logits in backward: a third more LM-head products).
    /// Held from forward to backward: the hidden states' gradient [N, hidden] and, for a trainable head, its fp32
    /// gradient [vocab, hidden], which a leaf head then takes as its .grad without a copy.
    /// </remarks>
    public static Tensor Chunked(Tensor hidden, Tensor headWeight, Tensor labels, int chunk)
    {
        var flat = hidden.reshape(-1, hidden.shape[^1]);
        var targets = labels.reshape(-1);
        if (!is_grad_enabled() || !(flat.requires_grad || headWeight.requires_grad))
        {
            using var noGrad = no_grad();
            return FusedChunks(flat, headWeight, targets, chunk, gradients: null);
        }
        return ChunkedCrossEntropy.apply(flat, headWeight, targets, chunk);
    }

    // fp32 logits of one chunk into `into`, for a head that is not computed natively in 16 bits (MultipliesNatively16
    // heads use FusedChunks' 16-bit buffer). A head kept in fp32 (Fp32NormsAndHead) takes widened hidden states, as its
    // Fp32Linear module does. A 16-bit head this CPU computes in fp32 anyway (Matmul16.Upcasts: fp16 here) takes the
    // product of the widened operands when the head's fp32 copy exists for the gradients: what Matmul16 would compute,
    // without its fp32 tiles of the weight and its 16-bit logits (measured: fp16 training of the bundled model peaked 55
    // MiB over the estimate); without the copy (no gradients), Matmul16's product, widened after.
    private static void Logits(Tensor hidden, Tensor weight, Tensor? weight32, Tensor into)
    {
        if (weight.dtype == ScalarType.Float32 || (weight32 is not null && Matmul16.Upcasts(weight.dtype)))
        {
            using var wide = hidden.to(ScalarType.Float32);
            using var weightT = (weight32 ?? weight).t();
            into.addmm_(wide, weightT, beta: 0); // beta 0: the buffer's old values are not read
        }
        else
        {
            using var narrow = Matmul16.Linear(hidden, weight);
            into.copy_(narrow);
        }
    }

    // A 16-bit head whose products this CPU computes natively (bf16 with AVX-512 BF16, not fp16).
    private static bool MultipliesNatively16(Tensor weight) =>
        weight.dtype != ScalarType.Float32 && !Matmul16.Upcasts(weight.dtype);

    /// <summary>Gradients a fused pass fills in: of the hidden states [N, hidden] and of the head weight, or null for a frozen head.</summary>
    private sealed record FusedGradients(Tensor Hidden, Tensor? Weight);

    // The loss sum of all chunks; with `gradients`, also d(loss sum)/d hidden and d(loss sum)/d weight (fp32).
    private static Tensor FusedChunks(Tensor hidden, Tensor weight, Tensor labels, int chunk, FusedGradients? gradients)
    {
        long n = hidden.shape[0];
        long vocab = weight.shape[0];
        var total = zeros(1, dtype: ScalarType.Float32);
        using var buffer = empty([Math.Min(chunk, n), vocab], dtype: ScalarType.Float32);
        // A 16-bit head this CPU multiplies natively takes its gradients' products in 16 bits too (the logits' gradient
        // rounded to the head's dtype, fp32 accumulation across chunks), as autocast's backward does: twice as fast as
        // the fp32 products here (AVX-512 BF16), and no fp32 copy of the head. Otherwise the products are fp32.
        bool native16 = MultipliesNatively16(weight);
        using var weight32 = gradients is null || native16 ? null : weight.dtype == ScalarType.Float32 ? weight.alias() : weight.to(ScalarType.Float32);
        // The 16-bit chunk (logits, then their gradient) and the chunk's [hidden, vocab] head gradient, allocated once and
        // written in place by every chunk: fresh ones per chunk were three page-faulted allocations of a chunk's size each
        // (bf16 full training of the bundled model, alternating with PyTorch: 1063-1065 -> 1113-1171 tokens/s).
        using var buffer16 = native16 ? empty([Math.Min(chunk, n), vocab], dtype: weight.dtype) : null;
        using var products16 = native16 && gradients?.Weight is not null ? empty([weight.shape[1], vocab], dtype: weight.dtype) : null;
        for (long start = 0; start < n; start += chunk)
        {
            using var scope = NewDisposeScope();
            long size = Math.Min(chunk, n - start);
            var h = hidden.narrow(0, start, size);
            var y = labels.narrow(0, start, size);
            var logits = buffer.narrow(0, 0, size);
            var logits16 = buffer16?.narrow(0, 0, size);
            // The chunk's hidden states in the head's dtype (norms kept in fp32 hand over fp32 ones).
            var h16 = native16 ? h.to(weight.dtype) : null;
            if (logits16 is not null)
            {
                logits16.addmm_(h16!, weight.t(), beta: 0);
                logits.copy_(logits16);
            }
            else
            {
                Logits(h, weight, weight32, logits);
            }
            var counted = y.ne(TrainingBatch.IgnoreLabel);
            var target = y.masked_fill(counted.logical_not(), 0).unsqueeze(1);
            // loss = log(sum(exp(x - max))) + max - x[label], on counted rows; exp(x - max) is written over the logits.
            var picked = logits.gather(1, target).squeeze(1);
            var max = logits.amax([-1L], keepdim: true);
            logits.sub_(max).exp_();
            var sum = logits.sum([-1L], keepdim: true);
            var rows = (sum.log() + max).squeeze(1) - picked;
            var countedF = counted.to(ScalarType.Float32);
            total.add_((rows * countedF).sum());
            if (gradients is null)
            {
                continue;
            }
            // d(sum CE)/d logits = softmax - onehot(label) on counted rows, 0 on ignored ones; built in place.
            logits.div_(sum);
            logits.scatter_add_(1, target, countedF.neg().unsqueeze(1));
            if (!counted.all().item<bool>())
            {
                logits.mul_(countedF.unsqueeze(1));
            }
            if (logits16 is Tensor d16)
            {
                d16.copy_(logits);
                using var dh16 = d16.mm(weight);
                gradients.Hidden.narrow(0, start, size).copy_(dh16);
                if (gradients.Weight is Tensor gw16)
                {
                    // (h^T d)^T rather than d^T h: libtorch's 16-bit product copies a transposed [chunk, vocab] operand
                    // into a contiguous one first (measured: +25 MiB on the bundled model); h is only [chunk, hidden].
                    // The accumulator has the same [hidden, vocab] layout (NativeAccumulator), so the adds run along
                    // memory; read across it they took 6% of a bf16 step.
                    using var h16T = h16!.t();
                    products16!.addmm_(h16T, d16, beta: 0);
                    using var dw16 = products16.t();
                    AddWidened(gw16, dw16, overwrite: start == 0);
                }
                continue;
            }
            gradients.Hidden.narrow(0, start, size).addmm_(logits, weight32!, beta: 0);
            if (gradients.Weight is Tensor gw)
            {
                using var h32 = h.to(ScalarType.Float32);
                gw.addmm_(logits.t(), h32, beta: start == 0 ? 0 : 1);
            }
        }
        return total.reshape([]);
    }

    // into (+)= from, from in a narrower dtype. libtorch's add_ of mixed dtypes first converts all of `from` to fp32 (+49
    // MiB for the bundled model's head gradient, measured); blocks of rows bound that copy to 4 MiB (copy_ converts as
    // it goes).
    private static void AddWidened(Tensor into, Tensor from, bool overwrite)
    {
        long rows = into.shape[0];
        long block = Math.Max(1, (1L << 20) / Math.Max(1, into.shape[1]));
        for (long r = 0; r < rows; r += block)
        {
            long size = Math.Min(block, rows - r);
            using var target = into.narrow(0, r, size);
            using var source = from.narrow(0, r, size);
            _ = overwrite ? target.copy_(source) : target.add_(source);
        }
    }

    // The fp32 head gradient of a natively computed 16-bit head: [vocab, hidden] over [hidden, vocab] memory, the layout
    // of the products (h^T d) added into it.
    private static Tensor NativeAccumulator(Tensor weight)
    {
        using var storage = empty([weight.shape[1], weight.shape[0]], dtype: ScalarType.Float32);
        return storage.t();
    }

    // A contiguous copy in `dtype` (to() would keep a transposed layout).
    private static Tensor Contiguous(Tensor source, ScalarType dtype)
    {
        var copy = empty(source.shape, dtype: dtype);
        copy.copy_(source);
        return copy;
    }

    private sealed class ChunkedCrossEntropy : autograd.SingleTensorFunction<ChunkedCrossEntropy>
    {
        public override string Name => nameof(ChunkedCrossEntropy);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var hidden = (Tensor)vars[0];
            var weight = (Tensor)vars[1];
            var labels = (Tensor)vars[2];
            int chunk = (int)vars[3];
            // Created in the caller's dispose scope (the step's), released by backward as soon as they are handed on.
            var gradients = new FusedGradients(
                empty(hidden.shape, dtype: ScalarType.Float32),
                !weight.requires_grad ? null
                    : MultipliesNatively16(weight) ? NativeAccumulator(weight)
                    : empty(weight.shape, dtype: ScalarType.Float32));
            ctx.save_data("gradients", gradients);
            ctx.save_data("hidden_dtype", hidden.dtype);
            ctx.save_data("weight_dtype", weight.dtype);
            ctx.save_for_backward([weight]);
            return FusedChunks(hidden, weight, labels, chunk, gradients);
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            var gradients = (FusedGradients)ctx.get_data("gradients");
            var hiddenDtype = (ScalarType)ctx.get_data("hidden_dtype");
            var weightDtype = (ScalarType)ctx.get_data("weight_dtype");
            var weight = ctx.get_saved_variables()[0];
            using var scope = NewDisposeScope();
            // The loss is a sum; its incoming gradient (1 / tokens, times the loss scale under fp16) scales both.
            var scale = gradOutput.to(ScalarType.Float32);
            var gradHidden = gradients.Hidden.mul(scale).to(hiddenDtype).MoveToOuterDisposeScope();
            gradients.Hidden.Dispose();
            if (gradients.Weight is not Tensor gradWeight)
            {
                return AutogradHandles.EndBackward(gradOutput, [gradHidden, null!, null!, null!]);
            }
            gradWeight.mul_(scale);
            // A leaf weight (the parameter, or mixed precision's compute copy) gets its gradient added to .grad here, in
            // place, as autograd's accumulation would: a returned gradient's handle would stay alive in the step's
            // dispose scope until the step ends, a second [vocab, hidden] copy through the whole backward pass.
            if (!weight.is_leaf)
            {
                var returned = Contiguous(gradWeight, weightDtype).MoveToOuterDisposeScope();
                gradWeight.Dispose();
                return AutogradHandles.EndBackward(gradOutput, [gradHidden, returned, null!, null!]);
            }
            var existing = weight.grad;
            if (existing is null)
            {
                weight.grad = weightDtype == ScalarType.Float32 && gradWeight.is_contiguous() ? gradWeight : Contiguous(gradWeight, weightDtype);
            }
            else
            {
                AddWidened(existing, gradWeight, overwrite: false);
            }
            gradWeight.Dispose();
            return AutogradHandles.EndBackward(gradOutput, [gradHidden, null!, null!, null!]);
        }
    }
}
