using System.Diagnostics;
using FrugalLM.IO;
using FrugalLM.Native;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using Microsoft.Win32.SafeHandles;
using static TorchSharp.torch;

namespace FrugalLM.Offload;

/// <summary>Which layer a streamed layer is followed by, for the read-ahead.</summary>
internal enum StreamDirection
{
    /// <summary>Generation and evaluation: the next layer, and after the last the first (the next token or batch).</summary>
    Cyclic,

    /// <summary>A training forward: the next layer, and after the last the last again (backward starts there).</summary>
    ForwardThenBackward,

    /// <summary>A training backward: the previous layer, and after the first the first again (the next step starts there).</summary>
    Backward,
}

/// <summary>
/// Streams decoder layers from their safetensors files (or, for params offload, from their storage on the host tier) through <see cref="DiskOffloadLayout.Slots"/> reusable buffers:
/// <see cref="Acquire"/> makes a layer's tensors point at a filled buffer (waiting for, or doing, its read) and starts
/// reading the layer expected next into the other buffer on a background thread, which overlaps the read with this
/// layer's compute. Reads use <c>pread</c> on the files, not the memory map: mapped pages would count in the resident set
/// until dropped, while the page cache does not count at all. Single consumer: one thread acquires and releases.
/// </summary>
internal sealed unsafe class LayerStreamer : IDisposable
{
    private readonly IReadOnlyList<LayerImage> layers;
    private readonly LayerSlot[] slots = Enumerable.Range(0, DiskOffloadLayout.Slots).Select(_ => new LayerSlot()).ToArray();
    private readonly Dictionary<string, SafeFileHandle> handles = new(StringComparer.Ordinal);
    private readonly Dictionary<ScalarType, Tensor> staging = [];
    private readonly bool readAhead;
    private Task? pending;
    private long loadTicks;
    private long waitTicks;
    private long loads;
    private long bytesRead;

    public LayerStreamer(IReadOnlyList<LayerImage> layers, bool readAhead)
    {
        this.layers = layers;
        this.readAhead = readAhead;
        foreach (var path in layers.SelectMany(l => l.Entries).Where(e => e.File is not null).Select(e => e.File!.Path).Distinct())
        {
            handles[path] = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.RandomAccess);
        }
    }

    /// <summary>What streaming has cost so far (after the read in flight, which it waits for).</summary>
    public OffloadStats Stats
    {
        get
        {
            Drain();
            return new(layers.Count, loads, bytesRead, TimeSpan.FromTicks(loadTicks), TimeSpan.FromTicks(waitTicks),
                slots.Sum(s => s.Bytes), staging.Values.Sum(TensorMemory.ByteCount));
        }
    }

    /// <summary>Makes streamed layer <paramref name="layer"/> resident and starts reading the one after it.</summary>
    public LayerSlot Acquire(int layer, StreamDirection direction)
    {
        long start = Stopwatch.GetTimestamp();
        Drain();
        var slot = slots.FirstOrDefault(s => s.Ready && s.Layer == layer && !s.InUse);
        if (slot is null)
        {
            slot = slots.Where(s => !s.InUse).OrderBy(s => s.Ready ? 1 : 0).First();
            slot.Layer = layer;
            slot.Ready = false;
            Load(layer, slot);
        }
        waitTicks += Stopwatch.GetElapsedTime(start).Ticks;
        slot.InUse = true;
        layers[layer].Attach(slot);
        if (readAhead)
        {
            ReadAhead(Next(layer, direction));
        }
        return slot;
    }

    /// <summary>Points the layer's tensors away from <paramref name="slot"/>; its buffers stay filled for a later hit.</summary>
    public void Release(int layer, LayerSlot slot)
    {
        layers[layer].Detach();
        slot.InUse = false;
    }

    private int Next(int layer, StreamDirection direction) => direction switch
    {
        StreamDirection.Cyclic => (layer + 1) % layers.Count,
        StreamDirection.ForwardThenBackward => Math.Min(layer + 1, layers.Count - 1),
        _ => Math.Max(layer - 1, 0),
    };

    private void ReadAhead(int layer)
    {
        if (slots.Any(s => s.Layer == layer && (s.Ready || s.InUse)))
        {
            return; // resident already (the layer in flight, or left from before)
        }
        var free = slots.FirstOrDefault(s => !s.InUse);
        if (free is null)
        {
            return;
        }
        free.Layer = layer;
        free.Ready = false;
        pending = Task.Run(() => Load(layer, free));
    }

    // Waits for the read in flight; a failed read leaves its slot empty and surfaces here.
    private void Drain()
    {
        var task = pending;
        pending = null;
        if (task is null)
        {
            return;
        }
        try
        {
            task.GetAwaiter().GetResult();
        }
        catch
        {
            foreach (var s in slots.Where(s => !s.Ready))
            {
                s.Layer = -1;
            }
            throw;
        }
    }

    private void Load(int layer, LayerSlot slot)
    {
        long start = Stopwatch.GetTimestamp();
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        foreach (var entry in layers[layer].Entries)
        {
            var buffer = slot.Buffer(entry.Name, entry.Shape, entry.Dtype);
            switch (entry.Kind)
            {
                case ReadKind.Raw:
                    Read(entry, 0, TensorMemory.Pointer(buffer), entry.StoredBytes);
                    break;
                case ReadKind.Convert:
                    ReadConverting(entry, buffer);
                    break;
                case ReadKind.Host:
                    // On a GPU this is the host-to-device copy; on the CPU, a copy within one memory.
                    buffer.copy_(entry.Host!);
                    break;
                default:
                    // The float weight whole in fp32 (as loading a float checkpoint into int8 does), then quantized.
                    using (var wide = empty(entry.Shape, ScalarType.Float32))
                    {
                        if (entry.Info!.Dtype == "F32")
                        {
                            Read(entry, 0, TensorMemory.Pointer(wide), entry.StoredBytes);
                        }
                        else
                        {
                            ReadConverting(entry, wide);
                        }
                        Int8Linear.QuantizeInto(wide, buffer, slot.Buffer(entry.ScaleName, [entry.Shape[0]], ScalarType.Float32));
                    }
                    break;
            }
            Interlocked.Add(ref bytesRead, entry.StoredBytes);
        }
        slot.Ready = true;
        Interlocked.Increment(ref loads);
        Interlocked.Add(ref loadTicks, Stopwatch.GetElapsedTime(start).Ticks);
    }

    // Whole rows at a time through one staging slice of the stored dtype (WeightLoadLayout.SliceBytes).
    private void ReadConverting(StreamEntry entry, Tensor destination)
    {
        var info = entry.Info!;
        var stored = SafeTensors.ToScalarType(info.Dtype);
        long bytes = entry.StoredBytes;
        if (bytes == 0)
        {
            return;
        }
        long rows = entry.Shape.Length == 0 ? 1 : entry.Shape[0];
        long rowBytes = bytes / rows;
        long perSlice = Math.Clamp(WeightLoadLayout.SliceBytes / rowBytes, 1, rows);
        long elementSize = bytes / Math.Max(1, info.ElementCount);
        var buffer = Staging(stored, perSlice * rowBytes / elementSize);
        byte* pointer = TensorMemory.Pointer(buffer);
        for (long row = 0; row < rows; row += perSlice)
        {
            long count = Math.Min(perSlice, rows - row);
            Read(entry, row * rowBytes, pointer, count * rowBytes);
            using var slice = buffer.narrow(0, 0, count * rowBytes / elementSize);
            if (entry.Shape.Length == 0)
            {
                using var scalar = slice.view([]);
                destination.copy_(scalar);
            }
            else
            {
                using var shaped = slice.view([count, .. entry.Shape[1..]]);
                using var target = destination.narrow(0, row, count);
                target.copy_(shaped);
            }
        }
    }

    private Tensor Staging(ScalarType dtype, long elements)
    {
        if (!staging.TryGetValue(dtype, out var buffer) || buffer.numel() < elements)
        {
            buffer?.Dispose();
            staging[dtype] = buffer = empty(elements, dtype).DetachFromDisposeScope();
        }
        return buffer;
    }

    private void Read(StreamEntry entry, long offset, byte* destination, long length)
    {
        var (file, info) = (entry.File!, entry.Info!);
        var handle = handles[file.Path];
        long position = file.DataStart + info.Begin + offset;
        while (length > 0)
        {
            int chunk = (int)Math.Min(length, 1L << 30);
            int read = RandomAccess.Read(handle, new Span<byte>(destination, chunk), position);
            if (read <= 0)
            {
                throw new CheckpointFormatException(file.Path, $"tensor '{info.Name}': the file ended while reading it (changed since it was opened?)");
            }
            destination += read;
            position += read;
            length -= read;
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        try
        {
            pending?.Wait();
        }
        catch (AggregateException)
        {
            // The run is ending; the failure was or will be reported by the acquire that waited for it.
        }
        foreach (var slot in slots)
        {
            slot.Dispose();
        }
        foreach (var buffer in staging.Values)
        {
            buffer.Dispose();
        }
        foreach (var handle in handles.Values)
        {
            handle.Dispose();
        }
    }
}

/// <summary>What disk offload has cost so far.</summary>
/// <param name="StreamedLayers">Decoder layers streamed from disk.</param>
/// <param name="Loads">Layer reads.</param>
/// <param name="BytesRead">Bytes read from the files.</param>
/// <param name="LoadTime">Time spent reading (and converting or quantizing), on whichever thread did it.</param>
/// <param name="WaitTime">Time the compute thread waited for reads.</param>
/// <param name="BufferBytes">Bytes of the layer buffers.</param>
/// <param name="StagingBytes">Bytes of the staging slices of reads that convert the stored width.</param>
public sealed record OffloadStats(int StreamedLayers, long Loads, long BytesRead, TimeSpan LoadTime, TimeSpan WaitTime, long BufferBytes, long StagingBytes)
{
    /// <summary>The share of read time the read-ahead hid behind compute: 1 − wait / load.</summary>
    public double HiddenShare => LoadTime > TimeSpan.Zero ? Math.Clamp(1 - WaitTime / LoadTime, 0, 1) : 0;
}
