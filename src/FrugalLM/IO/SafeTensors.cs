using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using FrugalLM.Native;
using FrugalLM.Planning;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.IO;

/// <summary>One tensor's entry in a safetensors header.</summary>
/// <param name="Name">The tensor's key.</param>
/// <param name="Dtype">The safetensors dtype string (F32, BF16, ...).</param>
/// <param name="Shape">The tensor's shape.</param>
/// <param name="Begin">Start of its bytes, relative to the end of the header.</param>
/// <param name="End">End (exclusive) of its bytes, relative to the end of the header.</param>
public sealed record SafeTensorInfo(string Name, string Dtype, long[] Shape, long Begin, long End)
{
    /// <summary>Number of elements.</summary>
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);

    /// <summary>The shape as text, e.g. [64, 128].</summary>
    public string ShapeText => SafeTensors.ShapeText(Shape);
}

/// <summary>
/// Reads a <c>.safetensors</c> file lazily: opening it parses and validates the header only (the data stays
/// memory-mapped, costing no resident memory); each tensor is materialized on request, in the dtype asked.
/// Every header lie is caught at open time (truncation, offsets past the end, overlaps or holes,
/// dtype/shape/byte-count mismatches, bad JSON) and reported with the file and tensor named.
/// </summary>
/// <remarks>
/// Written by hand because TorchSharp.PyBridge loads eagerly and writes unpadded headers, and no .NET
/// library maps the file lazily; the format is small (https://github.com/huggingface/safetensors).
/// </remarks>
public sealed unsafe class SafeTensorsFile : IDisposable
{
    /// <summary>Headers larger than this are refused, as in the reference implementation.</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly MemoryMappedFile? map;
    private readonly MemoryMappedViewAccessor? view;
    private readonly byte* basePointer;
    private readonly long dataStart;
    private readonly Dictionary<string, SafeTensorInfo> tensors;

    private SafeTensorsFile(string path, Dictionary<string, SafeTensorInfo> tensors, IReadOnlyDictionary<string, string> metadata, long dataStart, long length)
    {
        Path = path;
        this.tensors = tensors;
        Metadata = metadata;
        this.dataStart = dataStart;
        if (length > dataStart)
        {
            map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            byte* pointer = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
            basePointer = pointer + view.PointerOffset;
        }
    }

    /// <summary>The file's path.</summary>
    public string Path { get; }

    /// <summary>The tensors, by name.</summary>
    public IReadOnlyDictionary<string, SafeTensorInfo> Tensors => tensors;

    /// <summary>Offset in the file of the data section (tensors' <see cref="SafeTensorInfo.Begin"/> counts from here).</summary>
    public long DataStart => dataStart;

    /// <summary>The header's <c>__metadata__</c> strings.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Opens and validates a safetensors file.</summary>
    /// <exception cref="CheckpointFormatException">The file is missing, truncated or its header is inconsistent.</exception>
    public static SafeTensorsFile Open(string path)
    {
        if (!File.Exists(path))
        {
            throw new CheckpointFormatException(path, "file not found");
        }
        long length = new FileInfo(path).Length;
        if (length < 8)
        {
            throw new CheckpointFormatException(path, $"truncated: {length} bytes, but a safetensors file starts with an 8-byte header length");
        }
        byte[] lengthBytes = new byte[8];
        using (var stream = File.OpenRead(path))
        {
            stream.ReadExactly(lengthBytes);
            ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(lengthBytes);
            if (headerLength > MaxHeaderBytes)
            {
                throw new CheckpointFormatException(path, $"header claims {headerLength} bytes (limit {MaxHeaderBytes}): not a safetensors file or corrupt");
            }
            if (8 + (long)headerLength > length)
            {
                throw new CheckpointFormatException(path, $"truncated: header claims {headerLength} bytes but the file has only {length - 8} after the length field");
            }
            var header = new byte[headerLength];
            stream.ReadExactly(header);
            long dataStart = 8 + (long)headerLength;
            var (entries, metadata) = ParseHeader(path, header, length - dataStart);
            return new SafeTensorsFile(path, entries, metadata, dataStart, length);
        }
    }

    /// <summary>The entry for <paramref name="name"/>.</summary>
    public SafeTensorInfo Get(string name) =>
        tensors.TryGetValue(name, out var info) ? info : throw new CheckpointFormatException(Path, $"tensor '{name}' not found");

    /// <summary>
    /// Materializes a tensor in CPU memory, converted to <paramref name="dtype"/> when given. Peak memory is
    /// the tensor in the requested dtype plus one slice (see <see cref="CopyRows"/>).
    /// </summary>
    public Tensor Load(string name, ScalarType? dtype = null)
    {
        var info = Get(name);
        var tensor = empty(info.Shape, dtype ?? SafeTensors.ToScalarType(info.Dtype));
        CopyRows(info, tensor);
        return tensor;
    }

    /// <summary>
    /// Copies a tensor into <paramref name="destination"/> (same shape, CPU), converting the dtype if needed;
    /// without conversion the bytes go straight from the file into a contiguous destination.
    /// </summary>
    public void CopyTo(string name, Tensor destination)
    {
        var info = Get(name);
        if (!destination.shape.SequenceEqual(info.Shape))
        {
            throw new CheckpointFormatException(Path,
                $"tensor '{name}' has shape {info.ShapeText} but the model expects {ShapeTextOf(destination)}");
        }
        CopyRows(info, destination);
    }

    // Copies in slices of whole rows, dropping the file's pages after each: the mapped pages count in the resident set
    // until dropped, and a conversion's stored-dtype copy then exists one slice at a time. Whole, the largest tensor
    // of llama-100m (its 32000 x 768 fp32 embedding, loaded into bf16) cost its mapped pages and its fp32 copy on
    // top of the destination: +188 MiB of peak while loading, more than the bf16 generation that follows.
    private void CopyRows(SafeTensorInfo info, Tensor destination)
    {
        long bytes = info.End - info.Begin;
        if (bytes == 0)
        {
            return;
        }
        var stored = SafeTensors.ToScalarType(info.Dtype);
        bool direct = stored == destination.dtype && destination.is_contiguous();
        long rows = info.Shape.Length == 0 ? 1 : info.Shape[0];
        long rowBytes = bytes / rows;
        long perSlice = Math.Max(1, WeightLoadLayout.SliceBytes / rowBytes);
        byte* source = basePointer + dataStart + info.Begin;
        using var noGrad = no_grad();
        for (long row = 0; row < rows; row += perSlice)
        {
            long count = Math.Min(perSlice, rows - row);
            byte* from = source + row * rowBytes;
            long length = count * rowBytes;
            if (direct)
            {
                Buffer.MemoryCopy(from, TensorMemory.Pointer(destination) + row * rowBytes, length, length);
            }
            else
            {
                long[] shape = info.Shape.Length == 0 ? [] : [count, .. info.Shape[1..]];
                using var slice = empty(shape, stored);
                Buffer.MemoryCopy(from, TensorMemory.Pointer(slice), length, length);
                using var target = info.Shape.Length == 0 ? destination.alias() : destination.narrow(0, row, count);
                target.copy_(slice);
            }
            Release(from, length);
        }
        Release(source, bytes); // the pages that straddled two slices
    }

    private static string ShapeTextOf(Tensor t) => SafeTensors.ShapeText(t.shape);

    /// <summary>Releases the memory map.</summary>
    public void Dispose()
    {
        if (view is not null)
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
            view.Dispose();
        }
        map?.Dispose();
    }

    // The copied pages would otherwise stay in this process's resident set (file-backed) until the map is
    // closed; dropping them keeps "resident" meaning "what the model holds". The page cache keeps them.
    private void Release(byte* start, long bytes)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        const long Page = 4096;
        long first = ((long)start + Page - 1) & ~(Page - 1);
        long last = ((long)start + bytes) & ~(Page - 1);
        if (last > first)
        {
            _ = madvise((nint)first, (nuint)(last - first), 4 /* MADV_DONTNEED */);
        }
    }

    [DllImport("libc")]
    private static extern int madvise(nint address, nuint length, int advice);

    private static (Dictionary<string, SafeTensorInfo>, IReadOnlyDictionary<string, string>) ParseHeader(string path, byte[] header, long dataLength)
    {
        JsonObject root;
        try
        {
            root = JsonNode.Parse(header) as JsonObject ?? throw new CheckpointFormatException(path, "header is not a JSON object");
        }
        catch (JsonException e)
        {
            throw new CheckpointFormatException(path, $"header is not valid JSON ({e.Message})");
        }
        var metadata = new Dictionary<string, string>();
        var entries = new Dictionary<string, SafeTensorInfo>();
        foreach (var (name, node) in root)
        {
            if (name == "__metadata__")
            {
                if (node is JsonObject meta)
                {
                    foreach (var (k, v) in meta)
                    {
                        metadata[k] = v is JsonValue s && s.TryGetValue<string>(out var text)
                            ? text
                            : throw new CheckpointFormatException(path, $"__metadata__ value '{k}' is not a string");
                    }
                }
                continue;
            }
            entries[name] = ParseEntry(path, name, node);
        }
        // The data section must be exactly the tensors, back to back (the reference reader's rule): any hole,
        // overlap or trailing garbage means the header does not describe the file.
        long expected = 0;
        foreach (var info in entries.Values.OrderBy(e => e.Begin).ThenBy(e => e.End))
        {
            if (info.Begin != expected)
            {
                throw new CheckpointFormatException(path, info.Begin < expected
                    ? $"tensor '{info.Name}' overlaps the previous tensor (data_offsets [{info.Begin}, {info.End}], previous ends at {expected})"
                    : $"tensor '{info.Name}' starts at {info.Begin} but the previous tensor ends at {expected} (hole in data)");
            }
            if (info.End > dataLength)
            {
                throw new CheckpointFormatException(path,
                    $"truncated: tensor '{info.Name}' {info.ShapeText} {info.Dtype} ends at byte {info.End} of the data, but the file holds only {dataLength} data bytes");
            }
            expected = info.End;
        }
        if (expected != dataLength)
        {
            throw new CheckpointFormatException(path, $"the header describes {expected} data bytes but the file holds {dataLength}");
        }
        return (entries, metadata);
    }

    private static SafeTensorInfo ParseEntry(string path, string name, JsonNode? node)
    {
        CheckpointFormatException Bad(string what) => new(path, $"tensor '{name}': {what}");
        if (node is not JsonObject o)
        {
            throw Bad("header entry is not an object");
        }
        var dtype = o["dtype"] is JsonValue d && d.TryGetValue<string>(out var text) ? text : throw Bad("missing dtype");
        int elementSize = SafeTensors.ElementSize(dtype) ?? throw Bad($"unsupported dtype '{dtype}'");
        if (o["shape"] is not JsonArray shapeArray)
        {
            throw Bad("missing shape");
        }
        var shape = new long[shapeArray.Count];
        for (int i = 0; i < shape.Length; i++)
        {
            if (shapeArray[i] is not JsonValue v || !v.TryGetValue<long>(out shape[i]) || shape[i] < 0)
            {
                throw Bad($"shape {shapeArray.ToJsonString()} is not a list of non-negative integers");
            }
        }
        if (o["data_offsets"] is not JsonArray offsets || offsets.Count != 2
            || offsets[0] is not JsonValue b || !b.TryGetValue<long>(out long begin)
            || offsets[1] is not JsonValue e || !e.TryGetValue<long>(out long end)
            || begin < 0 || end < begin)
        {
            throw Bad("data_offsets must be [begin, end] with 0 <= begin <= end");
        }
        var info = new SafeTensorInfo(name, dtype, shape, begin, end);
        long count;
        try
        {
            count = checked(info.ElementCount * elementSize);
        }
        catch (OverflowException)
        {
            throw Bad($"shape {info.ShapeText} is too large");
        }
        if (count != end - begin)
        {
            throw Bad($"{dtype} {info.ShapeText} needs {count} bytes but data_offsets span {end - begin}");
        }
        return info;
    }
}

/// <summary>Safetensors dtype names, sizes and writing.</summary>
public static unsafe class SafeTensors
{
    /// <summary>Byte size of a safetensors dtype, or null when unsupported.</summary>
    public static int? ElementSize(string dtype) => dtype switch
    {
        "F64" or "I64" or "U64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" => 1,
        _ => null,
    };

    /// <summary>The TorchSharp dtype for a safetensors dtype.</summary>
    public static ScalarType ToScalarType(string dtype) => dtype switch
    {
        "F64" => ScalarType.Float64,
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => throw new NotSupportedException($"safetensors dtype '{dtype}' has no TorchSharp equivalent"),
    };

    /// <summary>The safetensors dtype for a TorchSharp dtype.</summary>
    public static string FromScalarType(ScalarType type) => type switch
    {
        ScalarType.Float64 => "F64",
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new NotSupportedException($"dtype {type} cannot be stored in safetensors"),
    };

    /// <summary>A shape as text, e.g. [64, 128].</summary>
    public static string ShapeText(IEnumerable<long> shape) => "[" + string.Join(", ", shape) + "]";

    /// <summary>
    /// Writes tensors to <paramref name="path"/> atomically, HF-readable: the header is padded with spaces to
    /// a multiple of 8 bytes, carries <c>{"format": "pt"}</c> metadata (transformers requires it), and
    /// tensors are ordered by element size (largest first), then name, so every tensor is aligned to its
    /// element size. Tensors are copied out one at a time (floating-point ones converted to
    /// <paramref name="dtype"/>, when given; integer and boolean ones keep theirs); nothing is gathered in memory.
    /// </summary>
    /// <param name="path">The file.</param>
    /// <param name="tensors">Named tensors.</param>
    /// <param name="metadata">Extra <c>__metadata__</c> strings.</param>
    /// <param name="dtype">Dtype for floating-point tensors (null keeps each tensor's).</param>
    /// <param name="keepDtype">Names of tensors whose dtype never changes (an int8 layer's fp32 scales).</param>
    public static void Write(string path, IReadOnlyList<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string>? metadata = null,
        ScalarType? dtype = null, IReadOnlySet<string>? keepDtype = null)
    {
        var kept = tensors.Where(t => keepDtype?.Contains(t.Name) == true).Select(t => t.Tensor).ToHashSet(ReferenceEqualityComparer.Instance);
        ScalarType TypeOf(Tensor t) => dtype is ScalarType d && t.is_floating_point() && !kept.Contains(t) ? d : t.dtype;
        var layout = tensors.Select(t => new SafeTensorLayout(t.Name, TypeOf(t.Tensor), t.Tensor.shape)).ToList();
        var byName = tensors.ToDictionary(t => t.Name, t => t.Tensor, StringComparer.Ordinal);
        Write(path, layout, metadata, (order, put) =>
        {
            foreach (var name in order)
            {
                put(name, byName[name]);
            }
        });
    }

    /// <summary>
    /// Writes a file whose tensors are declared up front (names, dtypes, shapes) and whose data
    /// <paramref name="fill"/> supplies afterwards, one tensor at a time and in any order, so a caller can
    /// assemble tensors piece by piece (a sharded checkpoint's units) and never hold them all. The header and
    /// layout are exactly <see cref="Write(string, IReadOnlyList{ValueTuple{string, Tensor}}, IReadOnlyDictionary{string, string}?, ScalarType?, IReadOnlySet{string}?)"/>'s
    /// for the same tensors, so both writers produce the same bytes. Atomic; fails if a tensor is missing, given
    /// twice or shaped differently from its declaration.
    /// </summary>
    /// <param name="path">The file.</param>
    /// <param name="layout">Every tensor the file will hold.</param>
    /// <param name="metadata">Extra <c>__metadata__</c> strings.</param>
    /// <param name="fill">Receives the file's order of names (the cheapest order to supply them in) and a
    /// <c>put(name, tensor)</c> that converts the tensor to its declared dtype and writes it at its place.</param>
    public static void Write(string path, IReadOnlyList<SafeTensorLayout> layout, IReadOnlyDictionary<string, string>? metadata,
        Action<IReadOnlyList<string>, Action<string, Tensor>> fill)
    {
        var names = new HashSet<string>();
        foreach (var entry in layout)
        {
            if (!names.Add(entry.Name))
            {
                throw new ArgumentException($"duplicate tensor name '{entry.Name}'", nameof(layout));
            }
        }
        long SizeOf(SafeTensorLayout e) => ElementSize(FromScalarType(e.Dtype))!.Value;
        var ordered = layout
            .OrderByDescending(SizeOf)
            .ThenBy(t => t.Name, StringComparer.Ordinal)
            .ToList();
        var header = new JsonObject();
        var meta = new JsonObject { ["format"] = "pt" };
        foreach (var (k, v) in metadata ?? new Dictionary<string, string>())
        {
            meta[k] = v;
        }
        header["__metadata__"] = meta;
        var places = new Dictionary<string, (SafeTensorLayout Entry, long Offset)>(StringComparer.Ordinal);
        long offset = 0;
        foreach (var entry in ordered)
        {
            long bytes = entry.Shape.Aggregate(1L, (a, b) => a * b) * SizeOf(entry);
            header[entry.Name] = new JsonObject
            {
                ["dtype"] = FromScalarType(entry.Dtype),
                ["shape"] = new JsonArray(entry.Shape.Select(s => (JsonNode?)s).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + bytes),
            };
            places[entry.Name] = (entry, offset);
            offset += bytes;
        }
        var json = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (json.Length + 7) / 8 * 8;
        var headerBytes = new byte[padded];
        json.CopyTo(headerBytes, 0);
        headerBytes.AsSpan(json.Length).Fill((byte)' ');
        long dataStart = 8 + padded;
        AtomicFile.Write(path, stream =>
        {
            Span<byte> lengthField = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(lengthField, (ulong)padded);
            stream.Write(lengthField);
            stream.Write(headerBytes);
            stream.SetLength(dataStart + offset);
            var written = new HashSet<string>(StringComparer.Ordinal);
            fill(ordered.Select(e => e.Name).ToList(), (name, tensor) =>
            {
                if (!places.TryGetValue(name, out var place))
                {
                    throw new ArgumentException($"tensor '{name}' was not declared for {path}");
                }
                if (!written.Add(name))
                {
                    throw new ArgumentException($"tensor '{name}' was written twice to {path}");
                }
                if (!tensor.shape.SequenceEqual(place.Entry.Shape))
                {
                    throw new ArgumentException($"tensor '{name}' has shape {ShapeText(tensor.shape)}, declared {ShapeText(place.Entry.Shape)}");
                }
                using var scope = NewDisposeScope();
                var cpu = tensor.detach().cpu().to(place.Entry.Dtype).contiguous();
                byte* pointer = TensorMemory.Pointer(cpu);
                long remaining = cpu.numel() * cpu.element_size();
                stream.Position = dataStart + place.Offset;
                while (remaining > 0)
                {
                    int chunk = (int)Math.Min(remaining, 1 << 26);
                    stream.Write(new ReadOnlySpan<byte>(pointer, chunk));
                    pointer += chunk;
                    remaining -= chunk;
                }
            });
            if (written.Count != places.Count)
            {
                var missing = places.Keys.Where(n => !written.Contains(n)).Order(StringComparer.Ordinal).Take(5);
                throw new InvalidOperationException($"{path}: {places.Count - written.Count} declared tensor(s) were not written ({string.Join(", ", missing)})");
            }
        });
    }
}

/// <summary>A tensor as a safetensors file will hold it, declared before its data exists.</summary>
/// <param name="Name">The key.</param>
/// <param name="Dtype">The stored dtype.</param>
/// <param name="Shape">The shape.</param>
public sealed record SafeTensorLayout(string Name, ScalarType Dtype, long[] Shape);
