namespace FrugalLM.Quantization;

/// <summary>The instruction-set paths of <see cref="Int8Gemm"/>; every path gives bit-identical results.</summary>
public enum Int8Kernel
{
    /// <summary>The fastest path the CPU supports (<see cref="Int8Gemm.PreferredKernel"/>).</summary>
    Auto,

    /// <summary>Plain C#, every CPU.</summary>
    Scalar,

    /// <summary>256-bit AVX2: int8 sign-extended to int16, <c>vpmaddwd</c> to int32.</summary>
    Avx2,

    /// <summary>512-bit AVX-512BW: int8 sign-extended to int16, <c>vpmaddwd</c> to int32.</summary>
    Avx512BW,

    /// <summary>
    /// 256-bit AVX-VNNI <c>vpdpbusd</c> (four u8 x s8 products added to int32 in one instruction), on CPUs that
    /// report <c>AvxVnni</c> (Intel since Alder Lake and Sapphire Rapids, AMD since Zen 5, AVX10 CPUs).
    /// </summary>
    AvxVnni,
}
