using System.Runtime.InteropServices;
using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// Raw access to a CPU tensor's memory. TorchSharp exposes spans only below 2 GiB and typed accessors per
/// element; file I/O and the SIMD kernels need the address itself, which LibTorchSharp's exported
/// <c>THSTensor_data</c> returns (the same call TorchSharp makes internally).
/// </summary>
public static unsafe class TensorMemory
{
    /// <summary>Address of the first element of a contiguous CPU tensor.</summary>
    public static byte* Pointer(torch.Tensor tensor)
    {
        if (tensor.device_type != DeviceType.CPU)
        {
            throw new ArgumentException("tensor must live in CPU memory", nameof(tensor));
        }
        if (!tensor.is_contiguous())
        {
            throw new ArgumentException("tensor must be contiguous", nameof(tensor));
        }
        return (byte*)THSTensor_data(tensor.Handle);
    }

    /// <summary>Size of a tensor's elements in bytes.</summary>
    public static long ByteCount(torch.Tensor tensor) => tensor.numel() * tensor.element_size();

    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr handle);
}
