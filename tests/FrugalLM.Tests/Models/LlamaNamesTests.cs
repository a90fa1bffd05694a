using FrugalLM.Models.Llama;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Models;

public sealed class LlamaNamesTests
{
    public LlamaNamesTests() => TestSupport.Init();

    [Fact]
    public void ParameterNamesAreHuggingFaceKeys()
    {
        var config = TestSupport.TinyConfig();
        using var model = new LlamaForCausalLM(config);
        var names = model.named_parameters().Select(p => p.name).ToHashSet();
        var expected = new HashSet<string> { "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight" };
        for (int i = 0; i < config.NumHiddenLayers; i++)
        {
            foreach (var p in new[] { "q_proj", "k_proj", "v_proj", "o_proj" })
            {
                expected.Add($"model.layers.{i}.self_attn.{p}.weight");
            }
            foreach (var p in new[] { "gate_proj", "up_proj", "down_proj" })
            {
                expected.Add($"model.layers.{i}.mlp.{p}.weight");
            }
            expected.Add($"model.layers.{i}.input_layernorm.weight");
            expected.Add($"model.layers.{i}.post_attention_layernorm.weight");
        }
        Assert.Equal(expected.OrderBy(x => x), names.OrderBy(x => x));
        Assert.Equal(config.ParameterCount, model.parameters().Sum(p => p.numel()));
    }

    [Fact]
    public void TiedModelHasNoSeparateHead()
    {
        var config = TestSupport.TinyConfig(tied: true);
        using var model = new LlamaForCausalLM(config);
        Assert.DoesNotContain(model.named_parameters(), p => p.name.StartsWith("lm_head", StringComparison.Ordinal));
        Assert.Equal(config.ParameterCount, model.parameters().Sum(p => p.numel()));
        model.InitializeWeights(seed: 3);
        using var ids = randint(0, config.VocabSize, [2, 7], dtype: ScalarType.Int64);
        using var logits = model.forward(ids);
        Assert.Equal(new long[] { 2, 7, config.VocabSize }, logits.shape);
    }
}
