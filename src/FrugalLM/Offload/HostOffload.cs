using FrugalLM.Models;

namespace FrugalLM.Offload;

/// <summary>
/// Parameter offload (<c>--offload params</c>, and <c>all</c> with the optimizer on the host too): the frozen weights of
/// every decoder layer live on the host tier and are copied into one of two device buffers just before the layer runs,
/// the next layer copied ahead on a background thread (the same streamer and the same recomputing autograd function as
/// <see cref="DiskOffload"/>, with host memory in place of the files). Embeddings, final norm, head and LoRA adapters stay
/// on the device. On a GPU the copy is the host-to-device transfer; on a CPU host and device are one memory, so the run
/// holds the weights plus the two buffers, which is what the estimator counts for it.
/// </summary>
public static class HostOffload
{
    /// <summary>
    /// Moves <paramref name="model"/>'s decoder layers' frozen tensors to the host tier and streams them. Apply it last,
    /// after quantization, LoRA and precision (it takes each tensor as it then is). Trainable tensors stay in place.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="readAhead">Copy the next layer on a background thread while one runs.</param>
    public static OffloadedModel Apply(CausalLM model, bool readAhead = true)
    {
        ArgumentNullException.ThrowIfNull(model);
        var layers = model.DecoderLayers;
        if (layers.Any(l => l is ITransparentWrapper))
        {
            throw new InvalidOperationException("params offload wraps plain decoder layers: apply it instead of checkpointing or FSDP (it recomputes each layer in backward itself)");
        }
        var images = layers.Select((layer, i) => LayerImage.FromHost(DiskOffload.Path(model, i), layer)).ToList();
        return DiskOffload.Stream(model, images, 0, readAhead);
    }
}
