using System.Globalization;
using System.Text.RegularExpressions;
using FrugalLM.IO;
using FrugalLM.Models;
using static TorchSharp.torch;

namespace FrugalLM.Offload;

/// <summary>Settings of <see cref="DiskOffload.Apply"/>.</summary>
public sealed record DiskOffloadOptions
{
    /// <summary>The first decoder layers stay resident (loaded as usual); the rest are streamed.</summary>
    public int ResidentLayers { get; init; }

    /// <summary>Read the next layer on a background thread while one runs (off: every read waits, for measuring what the read-ahead hides).</summary>
    public bool ReadAhead { get; init; } = true;
}

/// <summary>
/// Disk offload of frozen decoder layers: their weights stay in the model folder's safetensors files, and each layer is
/// read into one of two reusable buffers just before it runs, the next one read ahead on a background thread
/// (<see cref="Planning.DiskOffloadLayout"/>). Only the embeddings, final norm and head, the resident layers, LoRA
/// adapters and the two layer buffers are in memory. Generation, evaluation and LoRA training on the frozen base work
/// through it; the base may be float or int8 (read from an int8 folder, or quantized on every read from a float one).
/// </summary>
public static partial class DiskOffload
{
    /// <summary>
    /// A predicate over checkpoint tensor names: true for the tensors of the decoder layers a run with
    /// <paramref name="residentLayers"/> resident layers streams. Pass it to <see cref="HfCheckpoint.CreateModel"/> so that
    /// they are never loaded (their memory is allocated untouched, and <see cref="Apply"/> releases it).
    /// </summary>
    public static Func<string, bool> Streamed(int residentLayers) => name =>
        LayerKey().Match(name) is { Success: true } m && int.Parse(m.Groups[1].ValueSpan, CultureInfo.InvariantCulture) >= residentLayers;

    /// <summary>
    /// The disk policy for <paramref name="source"/>: <see cref="Planning.OffloadPolicy.Disk"/> with the width its floating
    /// layer weights are stored in and whether its linear weights are stored int8, as the estimator needs them.
    /// </summary>
    public static Planning.OffloadPolicy Policy(HfCheckpoint source)
    {
        ArgumentNullException.ThrowIfNull(source);
        var dtypes = source.TensorNames.Where(n => LayerKey().IsMatch(n))
            .Select(n => source.TryLocate(n, out _, out var info) ? info.Dtype : "").ToHashSet(StringComparer.Ordinal);
        int width = dtypes.Contains("F32") ? 4 : dtypes.Overlaps(["BF16", "F16"]) ? 2 : 0;
        return Planning.OffloadPolicy.Disk with { StoredFloatBytes = width, StoredInt8 = dtypes.Contains("I8") };
    }

    /// <summary>
    /// Streams <paramref name="model"/>'s decoder layers from <paramref name="source"/>, all but the first
    /// <see cref="DiskOffloadOptions.ResidentLayers"/>. Apply it last, after quantization, LoRA and precision: it reads
    /// each layer's tensors as they then are (dtype, int8 or not) and converts or quantizes on every read where the
    /// files differ. The streamed tensors' memory is released.
    /// </summary>
    /// <exception cref="CheckpointFormatException">The files do not match the model.</exception>
    public static OffloadedModel Apply(CausalLM model, HfCheckpoint source, DiskOffloadOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(source);
        options ??= new DiskOffloadOptions();
        var layers = model.DecoderLayers;
        if (options.ResidentLayers < 0 || options.ResidentLayers > layers.Count)
        {
            throw new ArgumentOutOfRangeException(nameof(options), options.ResidentLayers, $"resident layers must be between 0 and {layers.Count}");
        }
        if (layers.Any(l => l is ITransparentWrapper))
        {
            throw new InvalidOperationException("disk offload wraps plain decoder layers: apply it instead of checkpointing or FSDP (it recomputes each layer in backward itself)");
        }
        var images = new List<LayerImage>();
        for (int i = options.ResidentLayers; i < layers.Count; i++)
        {
            images.Add(LayerImage.Build(Path(model, i), layers[i], source));
        }
        return Stream(model, images, options.ResidentLayers, options.ReadAhead);
    }

    // Replaces decoder layers first.. with OffloadedLayers over one streamer of their images, and points their streamed
    // tensors away from their memory (what the images read from stays: the files, or the host tier's storage).
    internal static OffloadedModel Stream(CausalLM model, List<LayerImage> images, int first, bool readAhead)
    {
        var layers = model.DecoderLayers;
        var streamer = new LayerStreamer(images, readAhead);
        for (int i = first; i < layers.Count; i++)
        {
            ModuleTree.Replace(model, Path(model, i), new OffloadedLayer(layers[i], streamer, i - first));
        }
        foreach (var image in images)
        {
            image.Detach();
        }
        return new OffloadedModel(streamer, images);
    }

    internal static string Path(CausalLM model, int layer) => string.Create(CultureInfo.InvariantCulture, $"{model.DecoderLayersPath}.{layer}");

    [GeneratedRegex(@"(?:^|\.)layers\.(\d+)\.")]
    private static partial Regex LayerKey();
}

/// <summary>A model whose decoder layers <see cref="DiskOffload.Apply"/> streams; disposing it frees the layer buffers.</summary>
public sealed class OffloadedModel : IDisposable
{
    private readonly LayerStreamer streamer;
    private readonly IReadOnlyList<LayerImage> images;

    internal OffloadedModel(LayerStreamer streamer, IReadOnlyList<LayerImage> images)
    {
        this.streamer = streamer;
        this.images = images;
    }

    /// <summary>Whether the layers stream from the host tier (params offload) rather than from files.</summary>
    public bool FromHost => images.SelectMany(i => i.Entries).Any(e => e.Host is not null);

    /// <summary>Decoder layers streamed.</summary>
    public int StreamedLayers => images.Count;

    /// <summary>Bytes read from disk per pass over the streamed layers.</summary>
    public long StoredBytes => images.Sum(i => i.StoredBytes);

    /// <summary>Bytes of the largest streamed layer in memory (one buffer).</summary>
    public long LargestLayerBytes => images.Count == 0 ? 0 : images.Max(i => i.MemoryBytes);

    /// <summary>Reads, bytes and time so far.</summary>
    public OffloadStats Stats => streamer.Stats;

    /// <inheritdoc />
    public void Dispose()
    {
        streamer.Dispose();
        foreach (var entry in images.SelectMany(i => i.Entries))
        {
            entry.Host?.Dispose(); // the host tier's storage (params offload)
        }
    }
}
