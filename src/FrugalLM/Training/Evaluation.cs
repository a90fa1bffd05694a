using FrugalLM.Models;
using FrugalLM.Native;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>The loss a model assigns to batches of text, for training and for held-out evaluation.</summary>
public static class Evaluation
{
    /// <summary>Sum of next-token losses over the counted positions of <paramref name="batch"/>.</summary>
    /// <param name="model">The model.</param>
    /// <param name="batch">Inputs and labels.</param>
    /// <param name="lossChunk">Tokens per chunk of the LM head and loss; 0 computes all logits at once.</param>
    public static Tensor LossSum(CausalLM model, TrainingBatch batch, int lossChunk)
    {
        var inputs = tensor(batch.Inputs, [batch.Rows, batch.Columns]);
        var labels = tensor(batch.Labels, [batch.Rows, batch.Columns]);
        var hidden = model.Hidden(inputs);
        Native.MemoryTrace.Mark("hidden");
        if (lossChunk > 0 && model.HeadWeight is Tensor head)
        {
            return CausalLmLoss.Chunked(hidden, head, labels, lossChunk);
        }
        using var logits = model.Logits(hidden);
        return CausalLmLoss.Full(logits, labels);
    }

    /// <summary>
    /// Mean loss per counted token over <paramref name="batches"/> (at most <paramref name="maxBatches"/>;
    /// 0 = all), without gradients, and the number of tokens counted. The model is left in eval mode.
    /// </summary>
    public static (double Loss, long Tokens) MeanLoss(CausalLM model, IEnumerable<TrainingBatch> batches, int lossChunk = 0, int maxBatches = 0)
    {
        model.eval();
        double sum = 0;
        long count = 0;
        using var noGrad = no_grad();
        foreach (var batch in batches.Take(maxBatches > 0 ? maxBatches : int.MaxValue))
        {
            using var step = StepScope.Begin();
            sum += LossSum(model, batch, lossChunk).item<float>();
            count += batch.LabelCount;
        }
        return (sum / Math.Max(1, count), count);
    }
}
