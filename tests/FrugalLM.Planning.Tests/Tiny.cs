using FrugalLM.Planning;

namespace FrugalLM.Planning.Tests;

/// <summary>Small models whose memory the tests compute by hand.</summary>
internal static class Tiny
{
    /// <summary>
    /// vocab 100, hidden 16, intermediate 40, 2 layers, 4 query heads and 2 KV heads of width 4, untied head.
    /// Per layer: q 16x16 = 256, k 16x8 = 128, v 128, o 256, gate 16x40 = 640, up 640, down 640 (= 2688),
    /// two RMSNorms 2 x 16 = 32 -> 2720. Embedding 1600, final norm 16, LM head 1600. Total 8656.
    /// </summary>
    public static ModelSpec Llama() => ModelSpec.FromLlama(new LlamaConfig
    {
        VocabSize = 100,
        HiddenSize = 16,
        IntermediateSize = 40,
        NumHiddenLayers = 2,
        NumAttentionHeads = 4,
        NumKeyValueHeads = 2,
        HeadDim = 4,
        MaxPositionEmbeddings = 64,
    }, "tiny-llama");

    /// <summary>
    /// OPT layout: vocab 50, hidden 8, ffn 32, 2 layers, 2 heads, 16 positions (+2), dropout 0.1, tied head.
    /// Embedding 400, positions 18 x 8 = 144; per layer q,k,v,out 4 x (64 + 8) = 288, fc1 8x32 + 32 = 288,
    /// fc2 32x8 + 8 = 264, LayerNorms 2 x 16 = 32 (= 872); final LayerNorm 16. Total 2304.
    /// </summary>
    public static ModelSpec Opt() => ModelSpec.FromOpt(new OptConfig
    {
        VocabSize = 50,
        HiddenSize = 8,
        FfnDim = 32,
        NumHiddenLayers = 2,
        NumAttentionHeads = 2,
        MaxPositionEmbeddings = 16,
        WordEmbedProjDim = 8,
        Dropout = 0.1,
    }, "tiny-opt");

    /// <summary>A training plan on <see cref="Llama"/>: micro-batch 2 x 3 tokens, a 1000-byte context.</summary>
    public static RunPlan Plan(ModelSpec? model = null) => new()
    {
        Model = model ?? Llama(),
        MicroBatchSize = 2,
        SequenceLength = 3,
        Overhead = new FrameworkOverhead(1000, 0),
    };
}
