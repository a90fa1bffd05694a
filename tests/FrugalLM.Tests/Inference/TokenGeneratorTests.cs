using FrugalLM.Inference;
using FrugalLM.Models.Llama;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Inference;

public sealed class TokenGeneratorTests
{
    public TokenGeneratorTests() => TestSupport.Init();

    private static LlamaForCausalLM Model(int seed, FrugalLM.Planning.LlamaConfig? config = null)
    {
        var model = new LlamaForCausalLM(config ?? TestSupport.TinyConfig());
        model.InitializeWeights(seed, std: 0.3);
        model.eval();
        return model;
    }

    // Greedy decoding by recomputing the whole sequence each step: the reference the cached path must match.
    private static List<int> GreedyWithoutCache(LlamaForCausalLM model, IReadOnlyList<int> prompt, int steps)
    {
        var sequence = prompt.ToList();
        var result = new List<int>();
        using var noGrad = no_grad();
        for (int i = 0; i < steps; i++)
        {
            using var scope = NewDisposeScope();
            var logits = model.forward(tensor(sequence.Select(x => (long)x).ToArray(), [1, sequence.Count]));
            int next = (int)logits[0, -1].argmax().item<long>();
            sequence.Add(next);
            result.Add(next);
        }
        return result;
    }

    [Theory]
    [InlineData(2, false)]
    [InlineData(1, true)]
    [InlineData(4, false)]
    public void CachedGreedyEqualsFullRecomputation(int kvHeads, bool tied)
    {
        using var model = Model(seed: 21 + kvHeads, TestSupport.TinyConfig(tied, kvHeads));
        int[] prompt = [1, 17, 42, 5, 99, 3];
        var expected = GreedyWithoutCache(model, prompt, 24);
        var actual = new TokenGenerator(model).Generate(prompt, new SamplingOptions { Temperature = 0, MaxNewTokens = 24 }).ToList();
        Assert.Equal(expected, actual);
    }

    // The cached path runs libtorch's SDPA on different kernels (flash for causal, masked math for a chunk
    // with a past) that sum in different orders; fp32 rounding then differs at ~1e-6 relative.
    private const double Tolerance = 1e-5;

    [Fact]
    public void CachedLogitsMatchFullForward()
    {
        using var model = Model(seed: 4);
        using var noGrad = no_grad();
        using var ids = randint(0, model.Config.VocabSize, [1, 12], dtype: ScalarType.Int64);
        using var full = model.forward(ids);
        using var cache = new KvCache(model.Config, 1, 12, ScalarType.Float32);
        using var prefill = model.Logits(model.Hidden(ids[.., ..5], cache));
        Assert.True(TensorAssert.RelativeError(prefill, full[.., ..5]) < Tolerance);
        // A multi-token step with a past uses the explicit bottom-right causal mask.
        using var chunk = model.Logits(model.Hidden(ids[.., 5..9], cache));
        Assert.True(TensorAssert.RelativeError(chunk, full[.., 5..9]) < Tolerance);
        for (int t = 9; t < 12; t++)
        {
            using var step = model.Logits(model.Hidden(ids[.., t..(t + 1)], cache));
            Assert.True(TensorAssert.RelativeError(step, full[.., t..(t + 1)]) < Tolerance);
        }
    }

    [Fact]
    public void SameSeedSameTokensAndTemperatureZeroIsGreedy()
    {
        using var model = Model(seed: 9);
        int[] prompt = [1, 8, 30];
        var generator = new TokenGenerator(model);
        var sampled = new SamplingOptions { Temperature = 0.9, TopK = 40, TopP = 0.95, Seed = 7, MaxNewTokens = 30 };
        var a = generator.Generate(prompt, sampled).ToList();
        var b = generator.Generate(prompt, sampled).ToList();
        var c = generator.Generate(prompt, sampled with { Seed = 8 }).ToList();
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
        var greedy = generator.Generate(prompt, new SamplingOptions { Temperature = 0, MaxNewTokens = 30 }).ToList();
        Assert.Equal(GreedyWithoutCache(model, prompt, 30), greedy);
    }

    [Fact]
    public void StopsAtStopTokenWithoutEmittingIt()
    {
        using var model = Model(seed: 2);
        int[] prompt = [1, 2, 3];
        var free = new TokenGenerator(model).Generate(prompt, new SamplingOptions { Temperature = 0, MaxNewTokens = 10 }).ToList();
        int stop = free[4];
        var stopped = new TokenGenerator(model).Generate(prompt, new SamplingOptions { Temperature = 0, MaxNewTokens = 10, StopTokenIds = [stop] }).ToList();
        Assert.Equal(free.TakeWhile(t => t != stop), stopped);
    }

    [Fact]
    public void TopKAndTopPOnlyEverPickAllowedTokens()
    {
        using var rng = new TorchSharp.torch.Generator(123);
        using var logits = randn(50, generator: rng) * 3;
        var sorted = logits.argsort(descending: true).data<long>().ToArray();
        var probs = logits.softmax(0).data<float>().ToArray();
        // top-k = 5: only the five largest logits.
        var topK = new SamplingOptions { Temperature = 1, TopK = 5 };
        for (int i = 0; i < 200; i++)
        {
            Assert.Contains((long)TokenGenerator.Sample(logits, topK, rng), sorted.Take(5));
        }
        // top-p = 0.6: the smallest prefix of the ranking whose probability reaches 0.6.
        int keep = 0;
        for (double mass = 0; mass < 0.6; keep++)
        {
            mass += probs[sorted[keep]];
        }
        var topP = new SamplingOptions { Temperature = 1, TopP = 0.6 };
        var seen = new HashSet<long>();
        for (int i = 0; i < 400; i++)
        {
            long pick = TokenGenerator.Sample(logits, topP, rng);
            Assert.Contains(pick, sorted.Take(keep));
            seen.Add(pick);
        }
        Assert.True(seen.Count > 1);
    }

    [Fact]
    public void StopStringsCutAndHoldBackPartialMatches()
    {
        var stops = new StopStrings(["\n\n", "END"]);
        Assert.Equal(("In the beginning", false), stops.Check("In the beginning"));
        Assert.Equal(("In the beginning", false), stops.Check("In the beginningEN"));
        Assert.Equal(("In the beginning", false), stops.Check("In the beginning\n"));
        Assert.Equal(("In the", true), stops.Check("In theEND beginning"));
        Assert.Equal(("a", true), stops.Check("a\n\nEND"));
    }
}
