using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>
/// Block-wise 8-bit quantization with bitsandbytes' dynamic map (Dettmers et al., "8-bit Optimizers via
/// Block-wise Quantization"): values are cut into blocks, each block is divided by its absolute maximum, and
/// every normalized value is stored as the index of the nearest of 256 codes. The dynamic map's codes are
/// dense near zero and sparse near one (a decimal exponent and a shrinking fraction), which suits optimizer
/// moments whose magnitudes span orders. The signed map serves the first moment, the unsigned one the second.
/// </summary>
public sealed class BlockwiseQuantizer : IDisposable
{
    private readonly Tensor codes;
    private readonly Tensor boundaries;

    /// <summary>Creates a quantizer for blocks of <paramref name="blockSize"/> with the signed or unsigned dynamic map.</summary>
    public BlockwiseQuantizer(bool signed, int blockSize)
    {
        BlockSize = blockSize;
        codes = tensor(DynamicMap(signed)).DetachFromDisposeScope();
        boundaries = tensor(Boundaries(signed)).DetachFromDisposeScope();
    }

    /// <summary>
    /// The 255 midpoints between neighbouring codes of the dynamic map: the number of midpoints below a normalized
    /// value is the index of its nearest code (what <c>searchsorted</c> returns). The host optimizer searches the same
    /// array, so both encode every value alike.
    /// </summary>
    public static float[] Boundaries(bool signed)
    {
        var map = DynamicMap(signed);
        return map.Zip(map.Skip(1), (a, b) => (a + b) / 2).ToArray();
    }

    /// <summary>Values per block (one fp32 scale each).</summary>
    public int BlockSize { get; }

    /// <summary>Storage of <paramref name="count"/> values: one byte each (padded to whole blocks) and one fp32 scale per block.</summary>
    public long Bytes(long count) => Blocks(count) * (BlockSize + 4L);

    /// <summary>Blocks needed for <paramref name="count"/> values.</summary>
    public long Blocks(long count) => (count + BlockSize - 1) / BlockSize;

    /// <summary>
    /// The 256 codes of bitsandbytes' dynamic map (create_dynamic_map with 7 exponent bits): for each decimal
    /// exponent e = -6..0, the midpoints of a linear grid on [0.1, 1] scaled by 10^e, with 2^k points at the
    /// k-th exponent (twice as many, and no negatives, in the unsigned map), plus 0 and 1; sorted.
    /// </summary>
    public static float[] DynamicMap(bool signed)
    {
        const int exponentBits = 7, nonSignBits = 7;
        var values = new List<double>();
        for (int i = 0; i < exponentBits; i++)
        {
            int points = signed ? (1 << (i + nonSignBits - exponentBits)) + 1 : (1 << (i + nonSignBits - exponentBits + 1)) + 1;
            double scale = Math.Pow(10, -(exponentBits - 1) + i);
            for (int j = 0; j < points - 1; j++)
            {
                double left = 0.1 + 0.9 * j / (points - 1), right = 0.1 + 0.9 * (j + 1) / (points - 1);
                double mean = scale * (left + right) / 2;
                values.Add(mean);
                if (signed)
                {
                    values.Add(-mean);
                }
            }
        }
        values.Add(0);
        values.Add(1);
        while (values.Count < 256)
        {
            values.Add(0);
        }
        return values.Select(v => (float)v).Order().ToArray();
    }

    /// <summary>Allocates empty storage (codes, scales) for a tensor of <paramref name="count"/> values.</summary>
    public (Tensor Codes, Tensor Scales) Allocate(long count) =>
        (zeros(Blocks(count) * BlockSize, dtype: ScalarType.Byte).DetachFromDisposeScope(), zeros(Blocks(count), dtype: ScalarType.Float32).DetachFromDisposeScope());

    /// <summary>Quantizes <paramref name="values"/> (any shape, fp32) into existing storage.</summary>
    public void Quantize(Tensor values, Tensor codesOut, Tensor scalesOut)
    {
        using var scope = NewDisposeScope();
        var flat = values.reshape(-1);
        long padded = codesOut.shape[0];
        if (padded > flat.shape[0])
        {
            flat = nn.functional.pad(flat, [0, padded - flat.shape[0]]);
        }
        var blocks = flat.view(-1, BlockSize);
        var absmax = blocks.abs().amax([1L], keepdim: true).clamp_min(1e-30f);
        var normalized = blocks / absmax;
        codesOut.copy_(searchsorted(boundaries, normalized.reshape(-1)).to(ScalarType.Byte));
        scalesOut.copy_(absmax.reshape(-1));
    }

    /// <summary>Restores fp32 values of <paramref name="shape"/> from storage.</summary>
    public Tensor Dequantize(Tensor storedCodes, Tensor scales, long[] shape)
    {
        long count = shape.Aggregate(1L, (a, b) => a * b);
        var values = codes.take(storedCodes.to(ScalarType.Int64)).view(-1, BlockSize) * scales.unsqueeze(1);
        return values.reshape(-1).narrow(0, 0, count).view(shape);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        codes.Dispose();
        boundaries.Dispose();
    }
}
