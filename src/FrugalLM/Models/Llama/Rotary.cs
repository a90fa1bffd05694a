using FrugalLM.Planning;
using static TorchSharp.torch;

namespace FrugalLM.Models.Llama;

/// <summary>
/// Rotary position embeddings as transformers' LLaMA applies them: the "rotate half" layout (first and
/// second halves of each head pair up), frequencies from <c>rope_theta</c>, optionally rescaled by
/// <c>rope_scaling</c> (linear or llama3).
/// </summary>
public static class Rotary
{
    /// <summary>
    /// Inverse frequencies, length head_dim / 2. Computed in float64 and rounded once to float32, so they
    /// are the correctly rounded values (transformers computes them in float32, within 1 ulp of these).
    /// </summary>
    public static float[] InverseFrequencies(LlamaConfig config)
    {
        int half = config.HeadDim / 2;
        var result = new float[half];
        var scaling = config.RopeScaling;
        for (int i = 0; i < half; i++)
        {
            double inv = 1.0 / Math.Pow(config.RopeTheta, 2.0 * i / config.HeadDim);
            result[i] = (float)(scaling.Kind switch
            {
                RopeScalingKind.Linear => inv / scaling.Factor,
                RopeScalingKind.Llama3 => Llama3(inv, scaling),
                _ => inv,
            });
        }
        return result;
    }

    // Llama 3.1: long wavelengths are interpolated by the factor, short ones kept, and the band between
    // blended smoothly (transformers' _compute_llama3_parameters).
    private static double Llama3(double inv, RopeScaling s)
    {
        double lowFreqWavelen = s.OriginalMaxPositionEmbeddings / s.LowFreqFactor;
        double highFreqWavelen = s.OriginalMaxPositionEmbeddings / s.HighFreqFactor;
        double wavelen = 2 * Math.PI / inv;
        if (wavelen > lowFreqWavelen)
        {
            return inv / s.Factor;
        }
        if (wavelen < highFreqWavelen)
        {
            return inv;
        }
        double smooth = (s.OriginalMaxPositionEmbeddings / wavelen - s.LowFreqFactor) / (s.HighFreqFactor - s.LowFreqFactor);
        return (1 - smooth) * inv / s.Factor + smooth * inv;
    }

    /// <summary>cos and sin tables [positions, head_dim] (float32) for positions start..start+count-1.</summary>
    public static (Tensor Cos, Tensor Sin) Tables(Tensor inverseFrequencies, long start, long count)
    {
        using var scope = NewDisposeScope();
        var positions = arange(start, start + count, dtype: ScalarType.Float32);
        var angles = outer(positions, inverseFrequencies);
        var both = cat([angles, angles], 1);
        return (both.cos().MoveToOuterDisposeScope(), both.sin().MoveToOuterDisposeScope());
    }

    /// <summary>Applies the rotation to x [batch, heads, T, head_dim] with tables [T, head_dim].</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        long half = x.shape[^1] / 2;
        var first = x.narrow(-1, 0, half);
        var second = x.narrow(-1, half, half);
        var rotated = cat([second.neg(), first], -1);
        return x * cos + rotated * sin;
    }
}
