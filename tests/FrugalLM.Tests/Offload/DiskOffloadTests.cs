using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Offload;
using FrugalLM.Planning;
using FrugalLM.Quantization;
using static TorchSharp.torch;
using PrecisionMode = FrugalLM.Planning.Precision;

namespace FrugalLM.Tests.Offload;

/// <summary>
/// Disk offload against the same model in memory: streamed layers read from the folder's files into reusable buffers
/// must compute exactly what resident ones do (the same values reach the same kernels), for float and int8 bases and
/// for a folder stored at another width than the one computed in.
/// </summary>
public sealed class DiskOffloadTests
{
    public DiskOffloadTests() => TestSupport.Init();

    private static LlamaConfig Config() => TestSupport.TinyConfig() with { NumHiddenLayers = 3 };

    // A random model saved as an HF folder, in a fresh random state (seed differs per case).
    private static void SaveRandom(string folder, ScalarType stored, long seed, bool int8 = false)
    {
        using var model = new LlamaForCausalLM(Config());
        model.InitializeWeights(seed, std: 0.1);
        if (int8)
        {
            Int8Quantization.Apply(model);
            HfCheckpoint.Save(model, folder, stored, extraConfig: Int8Checkpoint.ConfigFields(new Int8Options()));
        }
        else
        {
            HfCheckpoint.Save(model, folder, stored);
        }
    }

    private static RunPlan Plan(HfCheckpoint checkpoint, PrecisionMode precision, QuantizationKind quantization, OffloadPolicy offload) => new()
    {
        Model = checkpoint.Spec(),
        Mode = RunMode.Generate,
        Precision = precision,
        Quantization = quantization == QuantizationKind.Int8 ? Planning.Quantization.Int8 : Planning.Quantization.None,
        Optimizer = OptimizerKind.None,
        Offload = offload,
        Device = ComputeDevice.Cpu,
    };

    private static (CausalLM Model, AppliedTechniques Applied) Open(HfCheckpoint checkpoint, RunPlan plan)
    {
        var dtype = plan.Precision == PrecisionMode.Bf16 ? ScalarType.BFloat16 : ScalarType.Float32;
        var model = checkpoint.CreateModel(dtype, plan.Quantization.Kind == QuantizationKind.Int8 ? new Int8Options() : null,
            plan.StreamsWeights ? DiskOffload.Streamed(plan.Offload.ResidentLayers) : null);
        var applied = Techniques.Apply(model, plan, weights: checkpoint);
        model.eval();
        return (model, applied);
    }

    [Theory]
    [InlineData(ScalarType.Float32, PrecisionMode.Fp32, QuantizationKind.None, 0)]
    [InlineData(ScalarType.BFloat16, PrecisionMode.Bf16, QuantizationKind.None, 1)]
    [InlineData(ScalarType.Float32, PrecisionMode.Bf16, QuantizationKind.None, 0)] // converted on every read
    [InlineData(ScalarType.BFloat16, PrecisionMode.Fp32, QuantizationKind.Int8, 0)] // quantized on every read
    [InlineData(ScalarType.BFloat16, PrecisionMode.Bf16, QuantizationKind.Int8, 2)]
    [InlineData(ScalarType.BFloat16, PrecisionMode.Bf16, QuantizationKind.Int8, 0, true)] // an int8 folder: int8 bytes read as stored
    public void GeneratesTheTokensAndLogitsOfTheInMemoryModel(ScalarType stored, PrecisionMode precision, QuantizationKind quantization, int resident, bool int8Folder = false)
    {
        using var dir = TestSupport.TempDir();
        SaveRandom(dir.Path, stored, seed: Random.Shared.NextInt64(1, 1 << 30), int8Folder);
        using var checkpoint = HfCheckpoint.Open(dir.Path);
        var prompt = Enumerable.Range(0, 5).Select(_ => Random.Shared.Next(3, 101)).ToArray();
        var options = new SamplingOptions { Temperature = 0, MaxNewTokens = 12 };

        var (memory, memoryApplied) = Open(checkpoint, Plan(checkpoint, precision, quantization, OffloadPolicy.None));
        var (disk, diskApplied) = Open(checkpoint, Plan(checkpoint, precision, quantization, OffloadPolicy.Disk with { ResidentLayers = resident }));
        using (memory)
        using (memoryApplied)
        using (disk)
        using (diskApplied)
        {
            Assert.Equal(3 - resident, diskApplied.Offload!.StreamedLayers);
            // The streamed layers hold no weights of their own between uses.
            Assert.All(disk.named_parameters().Where(p => p.name.StartsWith($"model.layers.{resident}.", StringComparison.Ordinal)),
                p => Assert.Equal(0, p.parameter.numel()));
            var expected = new TokenGenerator(memory).Generate(prompt, options).ToArray();
            var actual = new TokenGenerator(disk).Generate(prompt, options).ToArray();
            Assert.Equal(expected, actual);

            using var noGrad = no_grad();
            using var ids = tensor(prompt.Select(t => (long)t).ToArray()).unsqueeze(0);
            using var a = memory.forward(ids);
            using var b = disk.forward(ids);
            Assert.True(a.Same(b), $"logits differ: {TensorAssert.RelativeError(b, a):E2}");
            var stats = diskApplied.Offload.Stats;
            if (int8Folder)
            {
                Assert.Equal(diskApplied.Offload.StoredBytes, diskApplied.Offload.LargestLayerBytes * 3); // int8 bytes as held
            }
            // Prefill, 11 decoding steps and the forward above each read every streamed layer, and the last one read the first
            // layer ahead for a next pass; unless the layers fit the two buffers: then each is read once and stays.
            int streamed = 3 - resident;
            Assert.Equal(streamed > DiskOffloadLayout.Slots ? 13 * streamed + 1 : streamed, stats.Loads);
            // Two layer buffers, and a staging slice only where a read converts the stored width.
            Assert.Equal(Math.Min(streamed, DiskOffloadLayout.Slots) * diskApplied.Offload.LargestLayerBytes, stats.BufferBytes);
            bool converts = int8Folder ? false : quantization == QuantizationKind.Int8 ? stored != ScalarType.Float32 : (stored == ScalarType.Float32) != (precision == PrecisionMode.Fp32);
            Assert.Equal(converts, stats.StagingBytes > 0);
            Assert.True(stats.StagingBytes <= WeightLoadLayout.SliceBytes);

            // One plan, two readers: the estimator's disk and buffer bytes are the streamer's.
            var estimate = MemoryEstimator.Estimate(Plan(checkpoint, precision, quantization, OffloadPolicy.Disk with
            {
                ResidentLayers = resident,
                StoredFloatBytes = stored == ScalarType.Float32 ? 4 : 2,
                StoredInt8 = int8Folder,
            }));
            Assert.Equal(diskApplied.Offload.StoredBytes, estimate.DiskBytes);
            if (streamed >= DiskOffloadLayout.Slots)
            {
                Assert.Equal(stats.BufferBytes, estimate.Bytes("weight_stream"));
            }
            if (quantization == QuantizationKind.None || int8Folder)
            {
                Assert.Equal(stats.StagingBytes, estimate.Bytes("disk_staging"));
            }
        }
    }
}
