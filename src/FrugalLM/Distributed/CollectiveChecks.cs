using FrugalLM.Native;
using TorchSharp;

namespace FrugalLM.Distributed;

/// <summary>
/// The argument checks every backend shares, so a mistake gives the same message at one rank as at many
/// (a size that only fails to divide at world size 4 should not first surface as a hang at 4 ranks).
/// </summary>
internal static unsafe class CollectiveChecks
{
    public static void Tensor(torch.Tensor tensor, string name, string collective, DeviceType device = DeviceType.CPU, bool moveOnly = false)
    {
        ArgumentNullException.ThrowIfNull(tensor, name);
        if (tensor.device_type != device)
        {
            throw new ArgumentException($"{collective}: {name} is on {tensor.device_type}; this backend takes {device} tensors", name);
        }
        // Gathers and broadcasts move 16-bit values as raw words, so fp16 is as good as bf16 there; reductions add in fp32
        // from bf16 only (fp16 training reduces its gradients in fp32).
        if (tensor.dtype is not (torch.ScalarType.Float32 or torch.ScalarType.BFloat16) && !(moveOnly && tensor.dtype == torch.ScalarType.Float16))
        {
            throw new ArgumentException($"{collective}: {name} is {tensor.dtype}; {(moveOnly ? "gathers and broadcasts take Float32, BFloat16 or Float16" : "reductions take Float32 or BFloat16")}", name);
        }
        if (!tensor.is_contiguous())
        {
            throw new ArgumentException($"{collective}: {name} is not contiguous; pass a contiguous tensor (e.g. .contiguous())", name);
        }
    }

    public static void SameType(torch.Tensor input, torch.Tensor output, string collective)
    {
        if (input.dtype != output.dtype)
        {
            throw new ArgumentException($"{collective}: input is {input.dtype} but output is {output.dtype}; both must have the same dtype");
        }
    }

    // An input and an output buffer of one collective: each usable, both of one dtype.
    private static void Pair(torch.Tensor input, torch.Tensor output, string collective, DeviceType device, bool moveOnly = false)
    {
        Tensor(input, nameof(input), collective, device, moveOnly);
        Tensor(output, nameof(output), collective, device, moveOnly);
        SameType(input, output, collective);
    }

    public static void AllGather(torch.Tensor input, torch.Tensor output, int worldSize, DeviceType device = DeviceType.CPU)
    {
        const string name = "all-gather";
        Pair(input, output, name, device, moveOnly: true);
        long n = input.numel();
        if (output.numel() != n * worldSize)
        {
            throw new ArgumentException(
                $"{name}: output has {output.numel()} elements; it must hold world size ({worldSize}) x input ({n}) = {n * worldSize}");
        }
    }

    public static void ReduceScatter(torch.Tensor input, torch.Tensor output, int worldSize, DeviceType device = DeviceType.CPU)
    {
        const string name = "reduce-scatter";
        Pair(input, output, name, device);
        long n = input.numel();
        if (n % worldSize != 0)
        {
            throw new ArgumentException(
                $"{name}: input has {n} elements, which does not divide by the world size {worldSize}; pad it to a multiple of {worldSize}");
        }
        if (output.numel() != n / worldSize)
        {
            throw new ArgumentException(
                $"{name}: output has {output.numel()} elements; it must hold input ({n}) / world size ({worldSize}) = {n / worldSize}");
        }
    }

    public static void Root(int root, int worldSize)
    {
        if (root < 0 || root >= worldSize)
        {
            throw new ArgumentOutOfRangeException(nameof(root), root, $"broadcast: root must be a rank from 0 to {worldSize - 1}");
        }
    }

    /// <summary>
    /// Whether <paramref name="part"/> is exactly this rank's slot of <paramref name="whole"/> (in-place gather or
    /// reduce-scatter); any other overlap would let the collective read data it already overwrote, so it is refused.
    /// </summary>
    public static bool IsOwnSlot(torch.Tensor part, torch.Tensor whole, int rank, string collective)
    {
        long partBytes = TensorMemory.ByteCount(part), wholeBytes = TensorMemory.ByteCount(whole);
        if (partBytes == 0 || wholeBytes == 0)
        {
            return false;
        }
        byte* p = TensorMemory.Pointer(part), w = TensorMemory.Pointer(whole);
        if (p + partBytes <= w || w + wholeBytes <= p)
        {
            return false;
        }
        if (p == w + rank * partBytes)
        {
            return true;
        }
        throw new ArgumentException(
            $"{collective}: the {partBytes}-byte tensor overlaps the {wholeBytes}-byte one but is not this rank's ({rank}) slot of it; " +
            "pass separate tensors or exactly the rank's slot");
    }
}
