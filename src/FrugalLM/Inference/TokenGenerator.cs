using FrugalLM.Models;
using FrugalLM.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Inference;

/// <summary>
/// Autoregressive decoding with a KV cache: one forward pass over the prompt, then one single-token pass per
/// new token. Only the last position's logits are computed, so the head costs one row per step.
/// </summary>
public sealed class TokenGenerator(CausalLM model)
{
    /// <summary>
    /// Yields new token ids one at a time (lazily, so callers can stream), stopping at a stop token (not
    /// yielded), after <see cref="SamplingOptions.MaxNewTokens"/>, or at the model's context length.
    /// </summary>
    public IEnumerable<int> Generate(IReadOnlyList<int> prompt, SamplingOptions options)
    {
        options.Validate();
        if (prompt.Count == 0)
        {
            throw new ArgumentException("the prompt must contain at least one token", nameof(prompt));
        }
        int vocab = model.VocabSize;
        foreach (var id in prompt)
        {
            if (id < 0 || id >= vocab)
            {
                throw new ArgumentException($"prompt token {id} is outside the vocabulary (0..{vocab - 1})", nameof(prompt));
            }
        }
        int budget = Math.Min(options.MaxNewTokens, Math.Max(0, model.MaxPositions - prompt.Count));
        if (budget == 0)
        {
            yield break;
        }
        var stops = options.StopTokenIds.ToHashSet();
        using var rng = new torch.Generator((ulong)options.Seed);
        using var cache = model.CreateCache(1, prompt.Count + budget);
        var input = prompt.Select(i => (long)i).ToArray();
        for (int produced = 0; produced < budget; produced++)
        {
            int next;
            // Grad mode is per thread and an iterator resumes on its caller's thread, so it is entered per
            // step rather than held across yields.
            using (StepScope.Begin())
            using (no_grad())
            {
                using var ids = tensor(input, [1, input.Length]);
                var hidden = model.Hidden(ids, cache);
                // The last position as a 2-D [1, hidden] row: the 3-D slice hidden[:, -1:] keeps the prompt's batch
                // stride, which libtorch's matmul cannot fold into a 2-D product, so it made a contiguous
                // copy of the whole (16-bit) head for every token: +47 MiB of peak on llama-100m.
                var logits = model.Logits(hidden.select(1, -1)).reshape(-1).to(ScalarType.Float32);
                next = Sample(logits, options, rng);
            }
            if (stops.Contains(next))
            {
                yield break;
            }
            yield return next;
            input = [next];
        }
    }

    /// <summary>Chooses a token from one row of logits [vocab] according to <paramref name="options"/>.</summary>
    public static int Sample(Tensor logits, SamplingOptions options, torch.Generator rng)
    {
        using var scope = NewDisposeScope();
        if (options.IsGreedy)
        {
            return (int)logits.argmax().item<long>();
        }
        var scaled = logits / options.Temperature;
        if (options.TopK > 0 && options.TopK < scaled.shape[0])
        {
            var kth = scaled.topk(options.TopK).values[^1];
            scaled = scaled.masked_fill(scaled < kth, double.NegativeInfinity);
        }
        if (options.TopP < 1.0)
        {
            var (sorted, order) = scaled.sort(descending: true);
            var probabilities = sorted.softmax(0);
            // Drop a token when the tokens ranked above it already reach p; the top token always stays.
            var before = probabilities.cumsum(0) - probabilities;
            var drop = zeros_like(scaled, dtype: ScalarType.Bool).scatter(0, order, before >= options.TopP);
            scaled = scaled.masked_fill(drop, double.NegativeInfinity);
        }
        return (int)scaled.softmax(0).multinomial(1, generator: rng).item<long>();
    }
}
