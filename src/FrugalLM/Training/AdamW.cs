using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>Parameters that share a weight-decay setting.</summary>
/// <param name="Parameters">The parameters, with their names (for state files).</param>
/// <param name="WeightDecay">Decoupled weight decay applied to this group.</param>
public sealed record ParameterGroup(IReadOnlyList<(string Name, Tensor Parameter)> Parameters, double WeightDecay);

/// <summary>
/// AdamW with PyTorch's update rule (decoupled weight decay, bias-corrected moments, eps added after the
/// square root). Written here rather than taken from TorchSharp because sharding, offloading and 8-bit
/// states need the moments as plain named tensors that this class exposes and checkpoints.
/// </summary>
public sealed class AdamW : IDisposable
{
    private readonly IReadOnlyList<ParameterGroup> groups;
    private readonly Dictionary<Tensor, (Tensor ExpAvg, Tensor ExpAvgSq)> state = new(ReferenceEqualityComparer.Instance);
    private readonly Func<Tensor, Tensor?> gradientOf;
    private readonly ScalarType stateDtype;

    /// <summary>Creates the optimizer; moments are allocated lazily at the first step.</summary>
    /// <param name="groups">The parameters it updates.</param>
    /// <param name="learningRate">Initial learning rate.</param>
    /// <param name="beta1">First-moment decay.</param>
    /// <param name="beta2">Second-moment decay.</param>
    /// <param name="eps">Added to the root of the second moment.</param>
    /// <param name="gradientOf">Where a parameter's gradient is (default: its <c>grad</c>); mixed precision
    /// points fp32 masters at their 16-bit model gradients. Gradients of any dtype are widened to fp32.</param>
    /// <param name="stateDtype">Dtype of the moments (fp32, or bf16 for bf16-pure training).</param>
    public AdamW(IReadOnlyList<ParameterGroup> groups, double learningRate, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8,
        Func<Tensor, Tensor?>? gradientOf = null, ScalarType stateDtype = ScalarType.Float32)
    {
        this.groups = groups;
        this.gradientOf = gradientOf ?? (p => p.grad);
        this.stateDtype = stateDtype;
        LearningRate = learningRate;
        Beta1 = beta1;
        Beta2 = beta2;
        Eps = eps;
    }

    /// <summary>Learning rate of the next step (schedules set it before each step).</summary>
    public double LearningRate { get; set; }

    /// <summary>First-moment decay.</summary>
    public double Beta1 { get; }

    /// <summary>Second-moment decay.</summary>
    public double Beta2 { get; }

    /// <summary>Added to the root of the second moment.</summary>
    public double Eps { get; }

    /// <summary>Steps taken.</summary>
    public long StepCount { get; private set; }

    /// <summary>The parameter groups.</summary>
    public IReadOnlyList<ParameterGroup> Groups => groups;

    /// <summary>Bytes held by the moments.</summary>
    public long StateBytes => state.Values.Sum(s => s.ExpAvg.numel() * s.ExpAvg.element_size() * 2);

    /// <summary>Bytes per element of the moments.</summary>
    public int StateElementBytes => stateDtype == ScalarType.Float32 ? 4 : 2;

    /// <summary>
    /// Splits named parameters the usual way: matrices and embeddings (2+ dimensions) decay, norm weights
    /// and biases (1 dimension) do not. Parameters that do not require grad are left out.
    /// </summary>
    public static IReadOnlyList<ParameterGroup> DecayGroups(IEnumerable<(string Name, Tensor Parameter)> parameters, double weightDecay)
    {
        var trainable = parameters.Where(p => p.Parameter.requires_grad).ToList();
        return
        [
            new ParameterGroup(trainable.Where(p => p.Parameter.dim() >= 2).ToList(), weightDecay),
            new ParameterGroup(trainable.Where(p => p.Parameter.dim() < 2).ToList(), 0.0),
        ];
    }

    /// <summary>
    /// Applies one update from the parameters' current gradients (parameters without one are skipped), each
    /// multiplied by <paramref name="gradientMultiplier"/> first (loss-scale removal and clipping, fused).
    /// </summary>
    public void Step(double gradientMultiplier = 1.0)
    {
        StepCount++;
        double correction1 = 1 - Math.Pow(Beta1, StepCount);
        double correction2Sqrt = Math.Sqrt(1 - Math.Pow(Beta2, StepCount));
        double stepSize = LearningRate / correction1;
        using var noGrad = no_grad();
        foreach (var group in groups)
        {
            foreach (var (_, parameter) in group.Parameters)
            {
                var grad = gradientOf(parameter);
                if (grad is null)
                {
                    continue;
                }
                using var scope = NewDisposeScope();
                var (storedAvg, storedAvgSq) = State(parameter);
                var expAvg = storedAvg.to(ScalarType.Float32);
                var expAvgSq = storedAvgSq.to(ScalarType.Float32);
                var g = grad.to(ScalarType.Float32);
                if (gradientMultiplier != 1.0)
                {
                    g = g * gradientMultiplier;
                }
                if (group.WeightDecay != 0)
                {
                    parameter.mul_(1 - LearningRate * group.WeightDecay);
                }
                expAvg.lerp_(g, 1 - Beta1);
                expAvgSq.mul_(Beta2).addcmul_(g, g, 1 - Beta2);
                var denom = (expAvgSq.sqrt() / correction2Sqrt).add_(Eps);
                if (parameter.dtype == ScalarType.Float32)
                {
                    parameter.addcdiv_(expAvg, denom, -stepSize);
                }
                else
                {
                    parameter.copy_(parameter.to(ScalarType.Float32).addcdiv_(expAvg, denom, -stepSize));
                }
                if (stateDtype != ScalarType.Float32)
                {
                    storedAvg.copy_(expAvg);
                    storedAvgSq.copy_(expAvgSq);
                }
            }
        }
    }

    /// <summary>The moments as named tensors (<c>exp_avg.NAME</c>, <c>exp_avg_sq.NAME</c>), for checkpoints.</summary>
    public IEnumerable<(string Name, Tensor Tensor)> StateTensors()
    {
        foreach (var (name, parameter) in groups.SelectMany(g => g.Parameters))
        {
            if (state.TryGetValue(parameter, out var s))
            {
                yield return ("exp_avg." + name, s.ExpAvg);
                yield return ("exp_avg_sq." + name, s.ExpAvgSq);
            }
        }
    }

    /// <summary>Restores moments written by <see cref="StateTensors"/> and the step count.</summary>
    public void LoadState(Func<string, Tensor?> read, long stepCount)
    {
        using var noGrad = no_grad();
        foreach (var (name, parameter) in groups.SelectMany(g => g.Parameters))
        {
            var expAvg = read("exp_avg." + name);
            var expAvgSq = read("exp_avg_sq." + name);
            if (expAvg is null || expAvgSq is null)
            {
                continue;
            }
            var (a, b) = State(parameter);
            a.copy_(expAvg);
            b.copy_(expAvgSq);
        }
        StepCount = stepCount;
    }

    private (Tensor ExpAvg, Tensor ExpAvgSq) State(Tensor parameter)
    {
        if (!state.TryGetValue(parameter, out var s))
        {
            // Moments outlive the step's dispose scope that first touches them.
            s = (zeros_like(parameter, dtype: stateDtype).DetachFromDisposeScope(),
                 zeros_like(parameter, dtype: stateDtype).DetachFromDisposeScope());
            state[parameter] = s;
        }
        return s;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var (a, b) in state.Values)
        {
            a.Dispose();
            b.Dispose();
        }
        state.Clear();
    }
}
