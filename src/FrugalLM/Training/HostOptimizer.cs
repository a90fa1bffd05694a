using System.Diagnostics;
using FrugalLM.Native;
using FrugalLM.Precision;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Training;

/// <summary>What the host optimizer's steps cost and how much of it backward hid.</summary>
/// <param name="Steps">Steps taken.</param>
/// <param name="OverlappedSteps">Steps that stepped decoder layers during backward.</param>
/// <param name="StepTime">Time the step kernels ran, in total (on the background thread and after backward).</param>
/// <param name="WaitTime">Time the training thread waited, after backward, for layers still being stepped.</param>
/// <param name="AfterBackwardTime">Kernel time after backward: parameters no layer mark covered (embeddings, final norm,
/// head, a first layer on a frozen embedding), or everything when the step was not overlapped.</param>
/// <param name="LayersDuringBackward">Decoder layers handed to the background thread while backward ran.</param>
public sealed record HostOptimizerStats(long Steps, long OverlappedSteps, TimeSpan StepTime, TimeSpan WaitTime, TimeSpan AfterBackwardTime,
    long LayersDuringBackward)
{
    /// <summary>Step time the training thread did not spend on the step: 1 - (wait + after-backward time) / step time.</summary>
    public double HiddenShare => StepTime > TimeSpan.Zero ? Math.Clamp(1 - (WaitTime + AfterBackwardTime) / StepTime, 0, 1) : 0;
}

/// <summary>
/// ZeRO-Offload's optimizer: the fp32 masters and AdamW's moments (fp32, or 8-bit block-wise) live on the host tier,
/// and the update runs there in vectorized C# (<see cref="HostAdamWKernel"/>) over chunks in parallel, on the tensors of
/// <see cref="AdamW"/> and <see cref="MixedPrecision"/> themselves (so checkpoints and state accounting are unchanged).
/// With 16-bit compute it writes the updated master and its rounded 16-bit weight in one pass. Overlapped, each decoder
/// layer is stepped on a background thread as soon as backward has finished it (<see cref="LayerBackward"/>), while
/// backward continues below; what no layer covers is stepped after backward. On a CPU-only machine host and device are
/// one memory: the placement is nominal and what is measured is the step itself.
/// </summary>
public sealed unsafe class HostOptimizer
{
    /// <summary>Values per unit of parallel work: whole 8-bit blocks, large enough to amortize the scheduling.</summary>
    public const long ChunkValues = HostAdamWKernel.ChunkValues;

    private readonly AdamW optimizer;
    private readonly MixedPrecision precision;
    private readonly Slot[] slots;
    private readonly Dictionary<nint, int> slotOfModelData = [];
    private readonly Dictionary<nn.Module, int[]> layerSlots = new(ReferenceEqualityComparer.Instance);
    private readonly bool[] stepped;
    private readonly List<Tensor> gradientHandles = [];
    private HostStepScalars scalars;
    private Task pending = Task.CompletedTask;
    private double squares;
    private long steps, overlappedSteps, layersDuringBackward;
    private TimeSpan stepTime, waitTime, afterBackwardTime;

    /// <summary>Steps <paramref name="optimizer"/>'s parameters on the host; its moments are allocated now.</summary>
    /// <param name="optimizer">The trainer's AdamW (fp32 or 8-bit moments; bf16 moments have no masters to offload).</param>
    /// <param name="precision">The precision policy whose masters (or, in fp32, parameters) the optimizer updates.</param>
    /// <param name="threads">Threads of the step (default: one per core).</param>
    public HostOptimizer(AdamW optimizer, MixedPrecision precision, int? threads = null)
    {
        if (optimizer.Format == MomentFormat.BFloat16)
        {
            throw new ArgumentException("the host optimizer steps fp32 masters: bf16-pure training has none (use --precision bf16)");
        }
        this.optimizer = optimizer;
        this.precision = precision;
        Threads = Math.Max(1, threads ?? Environment.ProcessorCount);
        optimizer.AllocateStates();
        var decay = new Dictionary<Tensor, double>(ReferenceEqualityComparer.Instance);
        foreach (var group in optimizer.Groups)
        {
            foreach (var (_, parameter) in group.Parameters)
            {
                decay[parameter] = group.WeightDecay;
            }
        }
        var list = new List<Slot>();
        foreach (var (name, model, master) in precision.Entries)
        {
            var target = master ?? model;
            if (!decay.TryGetValue(target, out double weightDecay))
            {
                continue;
            }
            if (target.dtype != ScalarType.Float32)
            {
                throw new ArgumentException($"{name}: the host optimizer updates fp32 values (got {target.dtype})");
            }
            slotOfModelData[(nint)TensorMemory.Pointer(model)] = list.Count;
            list.Add(new Slot(name, target, model, master, weightDecay, optimizer.MomentTensors(target)));
        }
        slots = [.. list];
        stepped = new bool[slots.Length];
    }

    /// <summary>Threads of the step.</summary>
    public int Threads { get; }

    /// <summary>Bytes on the host tier: the optimizer's moments and the fp32 masters.</summary>
    public long HostBytes => optimizer.StateBytes + slots.Sum(s => s.Master is null ? 0 : s.Master.numel() * 4);

    /// <summary>What the steps cost so far.</summary>
    public HostOptimizerStats Stats => new(steps, overlappedSteps, stepTime, waitTime, afterBackwardTime, layersDuringBackward);

    /// <summary>
    /// Starts a step overlapped with the backward pass about to run: counts the step, then, until the result is disposed,
    /// steps each decoder layer that backward finishes. <see cref="Finish"/> completes the step. Gradients are multiplied by
    /// <paramref name="gradientMultiplier"/>, which must be known before backward (no clipping, no loss scaling).
    /// </summary>
    public IDisposable BeginOverlapped(double gradientMultiplier = 1.0)
    {
        Begin(gradientMultiplier);
        overlappedSteps++;
        return LayerBackward.Listen(LayerDone);
    }

    /// <summary>
    /// Ends a step begun by <see cref="BeginOverlapped"/>: waits for the layers in flight and steps every parameter not yet
    /// stepped. Returns the global L2 norm of the gradients it read (before the multiplier).
    /// </summary>
    public double Finish()
    {
        var clock = Stopwatch.StartNew();
        try
        {
            pending.GetAwaiter().GetResult();
        }
        finally
        {
            pending = Task.CompletedTask;
            waitTime += clock.Elapsed;
        }
        clock.Restart();
        var rest = Resolve(Enumerable.Range(0, slots.Length).Where(i => !stepped[i]).ToList());
        squares += Run(rest);
        var elapsed = clock.Elapsed;
        afterBackwardTime += elapsed;
        stepTime += elapsed;
        foreach (var handle in gradientHandles)
        {
            handle.Dispose();
        }
        gradientHandles.Clear();
        return Math.Sqrt(squares);
    }

    /// <summary>One whole step after backward (gradients multiplied by <paramref name="gradientMultiplier"/>: unscaling and clipping).</summary>
    public void Step(double gradientMultiplier)
    {
        Begin(gradientMultiplier);
        Finish();
    }

    private void Begin(double gradientMultiplier)
    {
        var (correction2Sqrt, stepSize) = optimizer.BeginStep();
        scalars = new HostStepScalars(optimizer, correction2Sqrt, stepSize, gradientMultiplier);
        Array.Clear(stepped);
        squares = 0;
        steps++;
    }

    // On the backward thread: the layer's trainable parameters, resolved to memory here (tensors are touched on this
    // thread only), are stepped on the background thread after the layers queued before them.
    private void LayerDone(nn.Module layer)
    {
        if (!layerSlots.TryGetValue(layer, out var indices))
        {
            indices = layer.parameters().Where(p => p.requires_grad)
                .Select(p => slotOfModelData.TryGetValue((nint)TensorMemory.Pointer(p), out int i) ? i : -1)
                .Where(i => i >= 0).ToArray();
            layerSlots[layer] = indices;
        }
        var work = Resolve(indices.Where(i => !stepped[i]).ToList());
        if (work.Length == 0)
        {
            return;
        }
        layersDuringBackward++;
        pending = pending.ContinueWith(previous =>
        {
            previous.GetAwaiter().GetResult();
            var clock = Stopwatch.StartNew();
            squares += Run(work);
            stepTime += clock.Elapsed;
        }, CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    // Marks the slots stepped and reads their gradients' addresses; a parameter without a gradient is skipped, as AdamW does.
    private HostStepTensor[] Resolve(List<int> indices)
    {
        var work = new List<HostStepTensor>(indices.Count);
        bool accumulating = precision.AccumulatesInMasters;
        foreach (int i in indices)
        {
            stepped[i] = true;
            var slot = slots[i];
            var gradient = Track(slot.Model.grad);
            var accumulated = accumulating ? Track(slot.Master!.grad) : null;
            if (gradient is null && accumulated is null)
            {
                continue;
            }
            var t = HostStepTensor.Of(slot.Target, slot.WeightDecay, slot.Moments);
            if (gradient is null)
            {
                t.Gradient = TensorMemory.Pointer(accumulated!);
                t.GradientDtype = HostDtype.Float32;
            }
            else
            {
                t.Gradient = TensorMemory.Pointer(gradient);
                t.GradientDtype = DtypeOf(gradient);
                t.Accumulated = accumulated is null ? null : (float*)TensorMemory.Pointer(accumulated);
            }
            if (slot.Master is not null)
            {
                t.Copy = TensorMemory.Pointer(slot.Model);
                t.CopyDtype = DtypeOf(slot.Model);
            }
            work.Add(t);
        }
        return [.. work];
    }

    // The grad getter makes a new handle each time: kept until the step ends (the memory is the parameter's grad slot's).
    private Tensor? Track(Tensor? gradient)
    {
        if (gradient is not null)
        {
            gradientHandles.Add(gradient);
        }
        return gradient;
    }

    private static HostDtype DtypeOf(Tensor t) => HostAdamWKernel.DtypeOf(t.dtype) is var d && d != HostDtype.None
        ? d
        : throw new ArgumentException($"the host optimizer reads fp32, bf16 or fp16 (got {t.dtype})");

    private double Run(HostStepTensor[] work) => HostAdamWKernel.StepAll(scalars, work, Threads);

    private sealed record Slot(string Name, Tensor Target, TorchSharp.Modules.Parameter Model, Tensor? Master, double WeightDecay,
        (Tensor ExpAvg, Tensor ExpAvgSq, Tensor? AvgScale, Tensor? AvgSqScale) Moments);
}
