using FrugalLM.Models;
using FrugalLM.Native;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Precision;

/// <summary>
/// Runs a model's forward and backward passes in 16 bits while the optimizer updates fp32 master weights:
/// <list type="bullet">
/// <item><c>fp32</c>: nothing changes.</item>
/// <item><c>bf16</c> / <c>fp16</c>: every floating parameter becomes a 16-bit compute copy; the trainable ones keep
/// an fp32 master that the optimizer updates and that is copied back (rounded) after each step. Gradients
/// of several micro-batches are accumulated in fp32 on the masters; with one micro-batch the 16-bit
/// gradient is read directly and widened tensor by tensor inside the optimizer. fp16 adds dynamic loss
/// scaling (<see cref="LossScaler"/>) and, on this CPU, computes linear layers in fp32
/// (<see cref="UpcastLinear"/>).</item>
/// <item><c>bf16-pure</c>: weights and optimizer moments in bf16, no masters: the least memory, but updates
/// smaller than half a bf16 ulp of a weight are rounded away (no stochastic rounding), so long runs drift
/// from fp32.</item>
/// </list>
/// RMSNorm's reduction, softmax and the loss run in fp32 whatever the mode (the model and the loss see to it).
/// Modules named in <c>fp32Modules</c> (<see cref="Fp32NormsAndHead"/>) keep their parameters as they are.
/// </summary>
public sealed class MixedPrecision : IDisposable
{
    private readonly List<(string Name, Parameter Model, Tensor? Master)> parameters;
    private bool accumulateInMasters;

    private MixedPrecision(PrecisionMode mode, ScalarType computeDtype, List<(string, Parameter, Tensor?)> parameters, bool accumulateInMasters, LossScaler? scaler)
    {
        Mode = mode;
        ComputeDtype = computeDtype;
        this.parameters = parameters;
        this.accumulateInMasters = accumulateInMasters;
        Scaler = mode == PrecisionMode.Fp16 ? scaler ?? new LossScaler() : null;
    }

    /// <summary>The precision mode.</summary>
    public PrecisionMode Mode { get; }

    /// <summary>The dtype of forward and backward.</summary>
    public ScalarType ComputeDtype { get; }

    /// <summary>The loss scaler (fp16 only).</summary>
    public LossScaler? Scaler { get; }

    /// <summary>Whether the optimizer's moments should be kept in bf16 (bf16-pure) rather than fp32.</summary>
    public bool Bf16Moments => Mode == PrecisionMode.Bf16Pure;

    /// <summary>What the optimizer updates, by parameter name: the fp32 masters, or the model's own parameters.</summary>
    public IReadOnlyList<(string Name, Tensor Parameter)> OptimizerParameters =>
        parameters.Select(p => (p.Name, p.Master ?? (Tensor)p.Model)).ToList();

    /// <summary>Each trainable parameter: its name, the model's (compute) parameter and its fp32 master (null without masters).</summary>
    internal IReadOnlyList<(string Name, Parameter Model, Tensor? Master)> Entries => parameters;

    /// <summary>Whether gradients of several micro-batches accumulate in fp32 on the masters' <c>grad</c>.</summary>
    internal bool AccumulatesInMasters => accumulateInMasters;

    /// <summary>Bytes held by the fp32 masters (and their gradient accumulators).</summary>
    public long MasterBytes => parameters.Sum(p => p.Master is null ? 0 : p.Master.numel() * 4 * (accumulateInMasters ? 2 : 1));

    /// <summary>
    /// Converts <paramref name="model"/> for <paramref name="mode"/>. Call before creating the optimizer;
    /// the model's parameter objects are replaced by 16-bit ones.
    /// </summary>
    /// <param name="model">The model (any techniques such as LoRA already applied).</param>
    /// <param name="mode">The precision.</param>
    /// <param name="accumulationSteps">Micro-batches per step; above 1, gradients accumulate in fp32 masters.</param>
    /// <param name="scaler">The fp16 loss scaler (default: GradScaler's defaults).</param>
    /// <param name="fp32Modules">Module paths whose own parameters are left unconverted (and linear layers among them
    /// unwrapped): the fp32 norms and head of <see cref="Fp32NormsAndHead.Apply"/>.</param>
    public static MixedPrecision Apply(nn.Module model, PrecisionMode mode, int accumulationSteps = 1, LossScaler? scaler = null,
        IReadOnlyCollection<string>? fp32Modules = null)
    {
        var kept = fp32Modules?.ToHashSet() ?? [];
        var compute = mode switch
        {
            PrecisionMode.Fp32 => ScalarType.Float32,
            PrecisionMode.Bf16 or PrecisionMode.Bf16Pure => ScalarType.BFloat16,
            PrecisionMode.Fp16 => ScalarType.Float16,
            _ => throw new ArgumentOutOfRangeException(nameof(mode)),
        };
        bool masters = mode is PrecisionMode.Bf16 or PrecisionMode.Fp16;
        var fp32Copies = new Dictionary<string, Tensor>();
        if (masters)
        {
            using var noGrad = no_grad();
            foreach (var (name, p) in model.named_parameters().Where(p => p.parameter.requires_grad))
            {
                // Taken before the cast, so the masters are the exact fp32 weights.
                // requires_grad marks them trainable for the optimizer; they never enter a graph.
                fp32Copies[name] = p.detach().to(ScalarType.Float32, copy: true).requires_grad_(true).DetachFromDisposeScope();
            }
        }
        if (compute != ScalarType.Float32)
        {
            ConvertParameters(model, compute, kept);
        }
        if (compute != ScalarType.Float32 && Matmul16.Upcasts(compute))
        {
            foreach (var (path, module) in ModuleTree.Find(model, (p, m) => m is Linear && !kept.Contains(p)))
            {
                ModuleTree.Replace(model, path, new UpcastLinear((Linear)module, compute));
            }
        }
        var list = model.named_parameters()
            .Where(p => p.parameter.requires_grad)
            .Select(p => (p.name, p.parameter, fp32Copies.GetValueOrDefault(p.name)))
            .ToList();
        return new MixedPrecision(mode, compute, list, masters && accumulationSteps > 1, scaler);
    }

    // Module.to(dtype) would replace every parameter object at once; this keeps requires_grad per parameter.
    private static void ConvertParameters(nn.Module model, ScalarType dtype, HashSet<string> kept)
    {
        using var noGrad = no_grad();
        // One converted copy per original, so a parameter two modules share stays shared.
        var replaced = new Dictionary<Parameter, Parameter>(ReferenceEqualityComparer.Instance);
        foreach (var (path, module) in model.named_modules().Prepend(("", model)))
        {
            if (kept.Contains(path))
            {
                continue;
            }
            foreach (var (name, p) in module.named_parameters(recurse: false).ToList())
            {
                if (p.is_floating_point() && p.dtype != dtype)
                {
                    if (!replaced.TryGetValue(p, out var converted))
                    {
                        converted = new Parameter(p.to(dtype), p.requires_grad);
                        replaced[p] = converted;
                    }
                    ModuleTree.ReplaceParameter(module, name, converted);
                }
            }
        }
        // The originals go now (masters are copies of their own). Left to the GC, their storage outlived the first
        // training step: +137 MiB at the first step of bf16 LoRA on llama-100m (its fp32 embedding), 0 after.
        foreach (var original in replaced.Keys)
        {
            original.Dispose();
        }
    }

    /// <summary>The loss to call backward on: scaled for fp16, unchanged otherwise.</summary>
    public Tensor ScaleLoss(Tensor loss) => Scaler is null ? loss : loss * Scaler.Scale;

    /// <summary>After each micro-batch's backward: moves 16-bit gradients into the fp32 accumulators when accumulating.</summary>
    public void AccumulateGradients()
    {
        if (!accumulateInMasters)
        {
            return;
        }
        using var noGrad = no_grad();
        foreach (var (_, model, master) in parameters)
        {
            if (model.grad is Tensor g)
            {
                if (master!.grad is Tensor acc)
                {
                    acc.add_(g);
                }
                else
                {
                    // The grad slot holds its own reference: this handle may go with the step's scope.
                    master.grad = g.to(ScalarType.Float32, copy: true);
                }
                g.zero_();
            }
        }
    }

    /// <summary>The gradient the optimizer reads for one of <see cref="OptimizerParameters"/> (still loss-scaled).</summary>
    public Tensor? GradientOf(Tensor optimizerParameter)
    {
        if (accumulateInMasters)
        {
            return optimizerParameter.grad;
        }
        foreach (var (_, model, master) in parameters)
        {
            if (ReferenceEquals(master ?? model, optimizerParameter))
            {
                return model.grad;
            }
        }
        return null;
    }

    /// <summary>Multiplier that turns raw gradients into true ones (1 / loss scale).</summary>
    public double Unscale => Scaler is null ? 1.0 : 1.0 / Scaler.Scale;

    /// <summary>
    /// L2 norm of all (unscaled) gradients, from each gradient's sum of squares (<see cref="SumOfSquares.Of"/>: in double
    /// over CPU gradients' memory); infinite or NaN when any gradient overflowed.
    /// </summary>
    public double GradientNorm()
    {
        double sum = 0;
        foreach (var (_, p) in OptimizerParameters)
        {
            if (GradientOf(p) is Tensor g)
            {
                sum += SumOfSquares.Of(g) * Unscale * Unscale;
            }
        }
        return Math.Sqrt(sum);
    }

    /// <summary>
    /// Releases model gradients and fp32 accumulators (PyTorch's <c>zero_grad(set_to_none=True)</c>): between steps
    /// and through the next forward pass no gradient memory exists, and backward allocates each gradient when it is
    /// born, which is when the estimator counts it (gradients of the decoder layers are alive from the end of
    /// backward, not at the end of forward, when the stored activations peak).
    /// </summary>
    public void ZeroGradients()
    {
        foreach (var (_, model, master) in parameters)
        {
            model.grad = null;
            if (master is not null)
            {
                master.grad = null;
            }
        }
    }

    /// <summary>After an optimizer step: copies the fp32 masters into the 16-bit compute weights.</summary>
    public void SyncWeights()
    {
        using var noGrad = no_grad();
        foreach (var (_, model, master) in parameters)
        {
            if (master is not null)
            {
                model.copy_(master);
            }
        }
    }

    /// <summary>The fp32 masters by name, for checkpoints (empty without masters).</summary>
    public IEnumerable<(string Name, Tensor Master)> Masters =>
        parameters.Where(p => p.Master is not null).Select(p => (p.Name, p.Master!));

    /// <summary>
    /// Hands the fp32 masters over to a new owner (FSDP, which keeps only its shard of them) and forgets them: from now on
    /// <see cref="SyncWeights"/>, <see cref="AccumulateGradients"/> and <see cref="Masters"/> see no masters, and the
    /// memory goes as soon as the receiver disposes the returned tensors.
    /// </summary>
    public IReadOnlyList<(string Name, Tensor Master)> TakeMasters()
    {
        var taken = Masters.ToList();
        for (int i = 0; i < parameters.Count; i++)
        {
            parameters[i] = (parameters[i].Name, parameters[i].Model, null);
        }
        accumulateInMasters = false;
        return taken;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var (_, _, master) in parameters)
        {
            master?.grad?.Dispose();
            master?.Dispose();
        }
    }
}
