using FrugalLM.IO;
using FrugalLM.Quantization;
using static TorchSharp.torch;

namespace FrugalLM.Offload;

/// <summary>How one streamed tensor is read.</summary>
internal enum ReadKind
{
    /// <summary>Stored as held: the bytes go straight from the file into the buffer.</summary>
    Raw,

    /// <summary>Another floating dtype on disk: read in slices through a staging buffer and converted.</summary>
    Convert,

    /// <summary>A float weight on disk for an int8 layer: read in fp32 and quantized row-wise into weight and SCB.</summary>
    Quantize,

    /// <summary>Held on the host tier (<see cref="StreamEntry.Host"/>): copied into the buffer as it is.</summary>
    Host,
}

/// <summary>One tensor of a streamed layer: where it is in memory (the module's tensor) and where it is read from (a file, or the host tier).</summary>
/// <param name="Name">Name relative to the layer, as the module tree has it (the buffer key of a slot).</param>
/// <param name="Target">The module's parameter or buffer, pointed at a slot buffer while the layer runs.</param>
/// <param name="Shape">Shape in memory (and on disk).</param>
/// <param name="Dtype">Dtype in memory.</param>
/// <param name="File">The safetensors file holding it (null on the host tier).</param>
/// <param name="Info">Its header entry (null on the host tier).</param>
/// <param name="Kind">How it is read.</param>
/// <param name="Scale">For <see cref="ReadKind.Quantize"/>: the layer's SCB buffer (fp32 [out]).</param>
internal sealed record StreamEntry(string Name, Tensor Target, long[] Shape, ScalarType Dtype, SafeTensorsFile? File, SafeTensorInfo? Info, ReadKind Kind, Tensor? Scale)
{
    /// <summary>For <see cref="ReadKind.Host"/>: the tensor's own storage, kept on the host tier while the module's tensor
    /// points at a layer buffer or at nothing.</summary>
    public Tensor? Host { get; init; }

    /// <summary>Bytes of the tensor in memory (with its SCB when quantized).</summary>
    public long MemoryBytes => Shape.Aggregate(1L, (a, b) => a * b) * Target.element_size() + (Scale is null ? 0 : Shape[0] * 4);

    /// <summary>Bytes read from the file, or copied from the host tier.</summary>
    public long StoredBytes => Info is null ? MemoryBytes : Info.End - Info.Begin;

    /// <summary>The slot key of the SCB buffer of a quantized weight.</summary>
    public string ScaleName => Name + "#SCB";
}

/// <summary>
/// What streaming one decoder layer means: every parameter and persistent buffer of the (wrapped) layer that the
/// checkpoint holds, matched by its HF key (a LoRA wrapper's <c>base_layer</c> segment dropped), with how it is read.
/// Tensors the checkpoint lacks (LoRA adapters) and scalars (an int8 layer's format byte) stay resident and untouched.
/// </summary>
internal sealed class LayerImage
{
    private static readonly Dictionary<ScalarType, Tensor> Released = [];

    private LayerImage(string path, IReadOnlyList<StreamEntry> entries)
    {
        Path = path;
        Entries = entries;
    }

    /// <summary>The layer's dotted path (<c>model.layers.7</c>).</summary>
    public string Path { get; }

    /// <summary>The streamed tensors.</summary>
    public IReadOnlyList<StreamEntry> Entries { get; }

    /// <summary>Bytes of one slot holding this layer.</summary>
    public long MemoryBytes => Entries.Sum(e => e.MemoryBytes);

    /// <summary>Bytes read from disk per load.</summary>
    public long StoredBytes => Entries.Sum(e => e.StoredBytes);

    /// <summary>Matches <paramref name="layer"/>'s tensors with the checkpoint's.</summary>
    /// <exception cref="CheckpointFormatException">A tensor's shape or dtype does not fit the file's.</exception>
    public static LayerImage Build(string path, nn.Module layer, HfCheckpoint source)
    {
        var entries = new List<StreamEntry>();
        var handled = new HashSet<string>(StringComparer.Ordinal);
        // Int8 layers over a float checkpoint: the float weight is quantized on every read.
        foreach (var (modulePath, module) in layer.named_modules())
        {
            if (module is not Int8Linear int8 || !source.TryLocate(Key(path, modulePath + ".weight"), out var file, out var info)
                || info.Dtype is not ("F32" or "F16" or "BF16"))
            {
                continue;
            }
            CheckShape(file, info, int8.Weight.shape);
            entries.Add(new StreamEntry(modulePath + ".weight", int8.Weight, int8.Weight.shape, ScalarType.Int8, file, info, ReadKind.Quantize, int8.Scb));
            handled.Add(modulePath + ".weight");
            handled.Add(modulePath + ".SCB");
        }
        foreach (var (name, tensor) in Streamable(layer))
        {
            // Scalars (an int8 layer's format byte) stay resident: streaming a byte saves nothing.
            if (handled.Contains(name) || tensor.ndim == 0 || !source.TryLocate(Key(path, name), out var file, out var info))
            {
                continue;
            }
            if (tensor.requires_grad)
            {
                throw new InvalidOperationException($"{path}.{name} is trainable: disk offload streams frozen weights only (train LoRA adapters on a frozen base)");
            }
            CheckShape(file, info, tensor.shape);
            var stored = SafeTensors.ToScalarType(info.Dtype);
            ReadKind kind = stored == tensor.dtype ? ReadKind.Raw
                : IsFloat(stored) && tensor.is_floating_point() ? ReadKind.Convert
                : throw new CheckpointFormatException(file.Path, $"tensor '{info.Name}' is {info.Dtype} but the model holds it as {tensor.dtype}");
            entries.Add(new StreamEntry(name, tensor, tensor.shape, tensor.dtype, file, info, kind, null));
        }
        return new LayerImage(path, entries);
    }

    /// <summary>
    /// The frozen tensors of <paramref name="layer"/> (parameters and persistent buffers, scalars excepted) as a host-tier
    /// image: each keeps its current storage on the host and is copied into a layer buffer when the layer runs.
    /// Trainable tensors (LoRA adapters) stay where they are.
    /// </summary>
    public static LayerImage FromHost(string path, nn.Module layer)
    {
        var entries = new List<StreamEntry>();
        foreach (var (name, tensor) in Streamable(layer))
        {
            if (tensor.ndim == 0 || tensor.requires_grad)
            {
                continue;
            }
            // A second handle on the same storage: it keeps the weights when Detach points the module's tensor elsewhere.
            entries.Add(new StreamEntry(name, tensor, tensor.shape, tensor.dtype, null, null, ReadKind.Host, null) { Host = tensor.detach().DetachFromDisposeScope() });
        }
        return new LayerImage(path, entries);
    }

    /// <summary>Points every streamed tensor of the layer at its buffer in <paramref name="slot"/>.</summary>
    public void Attach(LayerSlot slot)
    {
        using var noGrad = no_grad();
        foreach (var entry in Entries)
        {
            entry.Target.set_(slot.Buffer(entry.Name, entry.Shape, entry.Dtype));
            entry.Scale?.set_(slot.Buffer(entry.ScaleName, [entry.Shape[0]], ScalarType.Float32));
        }
    }

    /// <summary>Points every streamed tensor at an empty one: the layer holds no weight memory of its own.</summary>
    public void Detach()
    {
        using var noGrad = no_grad();
        foreach (var entry in Entries)
        {
            entry.Target.set_(Empty(entry.Dtype));
            entry.Scale?.set_(Empty(ScalarType.Float32));
        }
    }

    // What a layer could stream: its parameters and persistent buffers, by their names within the layer.
    private static IEnumerable<(string Name, Tensor Tensor)> Streamable(nn.Module layer) =>
        layer.named_parameters().Select(p => (p.name, (Tensor)p.parameter))
            .Concat(layer.named_buffers(include_nonpersistent: false).Select(b => (b.name, b.buffer)));

    // The checkpoint key of a tensor of the layer: LoRA's wrapper adds a base_layer segment that HF folders do not have.
    private static string Key(string path, string name) => path + "." + name.Replace(".base_layer.", ".", StringComparison.Ordinal);

    private static bool IsFloat(ScalarType t) => t is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64;

    private static void CheckShape(SafeTensorsFile file, SafeTensorInfo info, long[] shape)
    {
        if (!info.Shape.SequenceEqual(shape))
        {
            throw new CheckpointFormatException(file.Path, $"tensor '{info.Name}' has shape {info.ShapeText} but the model expects {SafeTensors.ShapeText(shape)}");
        }
    }

    private static Tensor Empty(ScalarType dtype)
    {
        lock (Released)
        {
            if (!Released.TryGetValue(dtype, out var t))
            {
                Released[dtype] = t = empty(0, dtype).DetachFromDisposeScope();
            }
            return t;
        }
    }
}
