using System.Globalization;
using FrugalLM.Inference;
using FrugalLM.IO;
using FrugalLM.Models.Llama;
using FrugalLM.Training;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Models;

/// <summary>
/// The C# runtime against an independent PyTorch implementation (tools/make_fixtures.py, PyTorch 1.13):
/// logits, one clipped AdamW step, and a greedy continuation, on three small random LLaMA folders.
/// </summary>
public sealed class ParityTests(Xunit.Abstractions.ITestOutputHelper output)
{
    // Logits: both sides compute in fp32 with different kernels (flash SDPA here, explicit softmax there);
    // the fixture's own fp32-vs-fp64 gap is ~6e-7, so 1e-4 (the bound) leaves wide margin.
    private const double LogitTolerance = 1e-4;

    // One AdamW step: updated weights differ only by fp32 rounding of gradients that the step divides by
    // (|g| + eps); with the fixture's eps the gap is ~1e-6 relative, under the 1e-5.
    private const double StepTolerance = 1e-5;

    static ParityTests() => TestSupport.Init();

    public static TheoryData<string> Fixtures => new() { "gqa-untied", "tied-llama3rope", "linear-rope" };

    private static string Folder(string name) => Path.Combine(TestSupport.RepoRoot, "tests", "fixtures", "parity", name);

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void LogitsMatchPyTorch(string fixture)
    {
        using var model = HfCheckpoint.LoadModel(Folder(fixture));
        using var expected = SafeTensorsFile.Open(Path.Combine(Folder(fixture), "expected.safetensors"));
        using var ids = expected.Load("input_ids");
        using var reference = expected.Load("logits");
        using var noGrad = no_grad();
        using var logits = model.forward(ids);
        double error = TensorAssert.RelativeError(logits, reference);
        output.WriteLine($"{fixture}: logits relative error {error:E2}");
        Assert.True(error <= LogitTolerance, $"{fixture}: logits relative error {error:E2}");
        using var inverse = expected.Load("rope_inv_freq");
        using var ours = tensor(Rotary.InverseFrequencies(((LlamaForCausalLM)model).Config));
        Assert.True(TensorAssert.RelativeError(ours, inverse) < 1e-6);
    }

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void OneAdamWStepMatchesPyTorch(string fixture)
    {
        using var model = HfCheckpoint.LoadModel(Folder(fixture));
        using var expected = SafeTensorsFile.Open(Path.Combine(Folder(fixture), "expected.safetensors"));
        var meta = expected.Metadata;
        double Meta(string key) => double.Parse(meta[key], CultureInfo.InvariantCulture);
        var betas = meta["adamw_betas"].Trim('[', ']', '(', ')').Split(',').Select(b => double.Parse(b, CultureInfo.InvariantCulture)).ToArray();
        using var ids = expected.Load("train_input_ids");
        int rows = (int)ids.shape[0], sequence = (int)ids.shape[1] - 1;
        var corpus = TokenCorpus.FromTokens(ids.data<long>().Select(x => (int)x).ToArray(), sequence);
        var options = new TrainOptions
        {
            MicroBatch = rows,
            GradClip = Meta("max_grad_norm"),
            LearningRate = Meta("adamw_lr"),
            Beta1 = betas[0],
            Beta2 = betas[1],
            Eps = Meta("adamw_eps"),
            WeightDecay = Meta("adamw_weight_decay"),
        };
        var trainer = new Trainer(model, corpus, options);
        // The fixture's batch is two rows of 12 tokens: inputs are the first 11, labels the last 11.
        var inOrder = new TrainingBatch(
            ids[.., ..^1].contiguous().data<long>().ToArray(), ids[.., 1..].contiguous().data<long>().ToArray(), rows, sequence);
        var (loss, gradNorm, skipped) = trainer.Step([inOrder]);
        Assert.False(skipped);
        using var expectedLoss = expected.Load("loss");
        using var expectedNorm = expected.Load("grad_norm");
        Assert.Equal(expectedLoss.item<float>(), loss, 1e-5 * Math.Abs(loss));
        Assert.Equal(expectedNorm.item<float>(), gradNorm, 1e-5 * gradNorm);
        double worst = 0;
        foreach (var (name, parameter) in model.named_parameters())
        {
            using var reference = expected.Load("updated." + name);
            double error = TensorAssert.RelativeError(parameter, reference);
            worst = Math.Max(worst, error);
            Assert.True(error <= StepTolerance, $"{fixture}: {name} relative error {error:E2}");
        }
        output.WriteLine($"{fixture}: loss {loss:F6} vs {expectedLoss.item<float>():F6}, grad norm {gradNorm:F6} vs {expectedNorm.item<float>():F6}, worst updated-weight relative error {worst:E2}");
    }

    [Theory]
    [MemberData(nameof(Fixtures))]
    public void GreedyContinuationMatchesTokenForToken(string fixture)
    {
        using var model = HfCheckpoint.LoadModel(Folder(fixture));
        model.eval();
        using var expected = SafeTensorsFile.Open(Path.Combine(Folder(fixture), "expected.safetensors"));
        using var prompt = expected.Load("greedy_prompt");
        using var tokens = expected.Load("greedy_tokens");
        var generated = new TokenGenerator(model).Generate(
            prompt.data<long>().Select(x => (int)x).ToArray(),
            new SamplingOptions { Temperature = 0, MaxNewTokens = (int)tokens.shape[1] }).ToList();
        Assert.Equal(tokens.data<long>().Select(x => (int)x), generated);
    }
}
