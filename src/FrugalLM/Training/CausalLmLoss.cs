using FrugalLM.Native;
using FrugalLM.Precision;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>
/// Next-token cross-entropy summed over the positions that take a loss. Two ways, same value and
/// gradients: <see cref="Full"/> materializes fp32 logits [tokens, vocab] as transformers does;
/// <see cref="Chunked"/> never does: it runs the LM head, log-softmax and loss over chunks of tokens and
/// recomputes each chunk's logits in backward, so at most one chunk of logits exists at a time.
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
    public static Tensor Chunked(Tensor hidden, Tensor headWeight, Tensor labels, int chunk) =>
        ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[^1]), headWeight, labels.reshape(-1), chunk);

    // fp32 logits of one chunk. A head kept in fp32 (Fp32NormsAndHead) takes widened hidden states, as its
    // Fp32Linear module does; a 16-bit head computes at its own precision and its logits are widened after.
    private static Tensor Logits(Tensor hidden, Tensor weight) =>
        weight.dtype == ScalarType.Float32
            ? nn.functional.linear(hidden.to(ScalarType.Float32), weight)
            : Matmul16.Linear(hidden, weight).to(ScalarType.Float32);

    private sealed class ChunkedCrossEntropy : autograd.SingleTensorFunction<ChunkedCrossEntropy>
    {
        public override string Name => nameof(ChunkedCrossEntropy);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var hidden = (Tensor)vars[0];
            var weight = (Tensor)vars[1];
            var labels = (Tensor)vars[2];
            int chunk = (int)vars[3];
            ctx.save_for_backward([hidden, weight, labels]);
            ctx.save_data("chunk", chunk);
            var total = zeros(1, dtype: ScalarType.Float32);
            long n = hidden.shape[0];
            for (long start = 0; start < n; start += chunk)
            {
                using var scope = NewDisposeScope();
                long size = Math.Min(chunk, n - start);
                var logits = Logits(hidden.narrow(0, start, size), weight);
                var loss = nn.functional.cross_entropy(logits, labels.narrow(0, start, size),
                    ignore_index: TrainingBatch.IgnoreLabel, reduction: nn.Reduction.Sum);
                total.add_(loss);
            }
            return total.reshape([]);
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            AutogradHandles.BeginBackward();
            var saved = ctx.get_saved_variables();
            var hidden = saved[0];
            var weight = saved[1];
            var labels = saved[2];
            int chunk = (int)ctx.get_data("chunk");
            long n = hidden.shape[0];
            using var scope = NewDisposeScope();
            var gradHidden = zeros_like(hidden);
            // A leaf weight (the parameter, or mixed precision's compute copy) gets its gradient added to .grad here, in
            // place, as autograd's accumulation would: a returned gradient's handle would stay alive in the step's
            // dispose scope until the step ends, a second [vocab, hidden] copy through the whole backward pass.
            bool direct = weight.requires_grad && weight.is_leaf;
            var existing = direct ? weight.grad : null;
            Tensor? gradWeight = !weight.requires_grad ? null
                : existing is not null && existing.dtype == ScalarType.Float32 ? existing
                : zeros(weight.shape, dtype: ScalarType.Float32);
            var weight32 = weight.to(ScalarType.Float32);
            for (long start = 0; start < n; start += chunk)
            {
                using var chunkScope = NewDisposeScope();
                long size = Math.Min(chunk, n - start);
                var h = hidden.narrow(0, start, size);
                var y = labels.narrow(0, start, size);
                // d(sum CE)/d logits = softmax - onehot(label) on counted rows, 0 on ignored ones.
                var logits = Logits(h, weight);
                var counted = y.ne(TrainingBatch.IgnoreLabel);
                var target = y.masked_fill(counted.logical_not(), 0);
                var dlogits = logits.softmax(-1);
                dlogits.scatter_add_(1, target.unsqueeze(1), counted.to(ScalarType.Float32).neg().unsqueeze(1));
                dlogits.mul_(counted.to(ScalarType.Float32).unsqueeze(1) * gradOutput.to(ScalarType.Float32));
                gradHidden.narrow(0, start, size).copy_(dlogits.mm(weight32));
                gradWeight?.addmm_(dlogits.t(), h.to(ScalarType.Float32));
            }
            gradHidden.MoveToOuterDisposeScope();
            if (gradWeight is null || !direct)
            {
                return AutogradHandles.EndBackward(gradOutput, [gradHidden, gradWeight?.to(weight.dtype).MoveToOuterDisposeScope()!, null!, null!]);
            }
            if (existing is null)
            {
                weight.grad = gradWeight.to(weight.dtype);
            }
            else if (!ReferenceEquals(existing, gradWeight))
            {
                existing.add_(gradWeight);
            }
            return AutogradHandles.EndBackward(gradOutput, [gradHidden, null!, null!, null!]);
        }
    }
}
