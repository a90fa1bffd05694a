using System.Diagnostics;
using FrugalLM.Lora;
using FrugalLM.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Lora;

/// <summary>Helpers shared by the LoRA tests.</summary>
internal static class LoraTestSupport
{
    /// <summary>
    /// Gives adapter <paramref name="adapter"/>'s B matrices random N(0, std²) values, standing in for a
    /// trained adapter (a fresh one has B = 0 and changes nothing).
    /// </summary>
    public static void RandomizeB(LoraModel lora, string adapter, long seed, double std = 0.2)
    {
        var generator = new Generator((ulong)seed);
        using var noGrad = no_grad();
        foreach (var (_, layer) in lora.LayersOf(adapter))
        {
            var b = layer.LoraB(adapter);
            b.copy_(randn(b.shape, b.dtype, generator: generator) * std);
        }
    }

    /// <summary>Copies of every parameter, by name.</summary>
    public static Dictionary<string, Tensor> Snapshot(nn.Module model)
    {
        using var noGrad = no_grad();
        return model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
    }

    /// <summary>Logits of <paramref name="model"/> for <paramref name="ids"/> in eval mode, without autograd.</summary>
    public static Tensor Logits(nn.Module<Tensor, Tensor> model, Tensor ids)
    {
        model.eval();
        using var noGrad = no_grad();
        return model.forward(ids);
    }
}

/// <summary>
/// A stand-in quantized layer: int8 weights with one scale, dequantized on the fly. It is what LoRA sees of
/// an int8 base (an <see cref="ILinearLayer"/> whose weight is not a float matrix).
/// </summary>
internal sealed class Int8LinearStub : nn.Module<Tensor, Tensor>, ILinearLayer
{
    private readonly Tensor quantized;
    private readonly double scale;

    public Int8LinearStub(Tensor weight) : base(nameof(Int8LinearStub))
    {
        scale = weight.abs().max().item<float>() / 127.0;
        quantized = (weight / scale).round().to(ScalarType.Int8);
        RegisterComponents();
    }

    public long InFeatures => quantized.shape[1];

    public long OutFeatures => quantized.shape[0];

    public Tensor DequantizedWeight(ScalarType dtype) => (quantized.to(ScalarType.Float32) * scale).to(dtype);

    public override Tensor forward(Tensor x)
    {
        using var weight = DequantizedWeight(x.dtype);
        return nn.functional.linear(x, weight);
    }
}

/// <summary>
/// A fact that runs only where Debian's Python has PyTorch (the reference side of the PEFT checks); it is
/// reported as skipped, with the reason, elsewhere.
/// </summary>
internal sealed class PythonTorchFactAttribute : FactAttribute
{
    public const string Python = "/usr/bin/python3";

    private static readonly Lazy<string?> Missing = new(Probe);

    public PythonTorchFactAttribute()
    {
        if (Missing.Value is string reason)
        {
            Skip = reason;
        }
    }

    private static string? Probe()
    {
        if (!File.Exists(Python))
        {
            return $"{Python} not found (install python3-torch to run the PyTorch side of the PEFT check)";
        }
        using var process = Process.Start(new ProcessStartInfo(Python, ["-c", "import torch"]) { RedirectStandardError = true, RedirectStandardOutput = true })!;
        process.WaitForExit(60_000);
        return process.HasExited && process.ExitCode == 0 ? null : $"{Python} has no PyTorch (apt-get install python3-torch to run the PyTorch side of the PEFT check)";
    }
}
