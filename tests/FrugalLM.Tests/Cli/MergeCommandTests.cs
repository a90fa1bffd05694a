using System.Globalization;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using FrugalLM.IO;
using FrugalLM.Lora;
using FrugalLM.Models;
using FrugalLM.Models.Llama;
using FrugalLM.Quantization;
using FrugalLM.Tests.Lora;
using static TorchSharp.torch;

namespace FrugalLM.Tests.Cli;

public sealed partial class MergeCommandTests(Xunit.Abstractions.ITestOutputHelper output)
{
    static MergeCommandTests() => TestSupport.Init();

    public static TheoryData<string> Architectures => new() { "llama", "opt" };

    [GeneratedRegex(@"requantized (\d+) int8 layers: relative weight error \(Frobenius\) max ([0-9.E+-]+)")]
    private static partial Regex ReportLine();

    [Theory]
    [MemberData(nameof(Architectures))]
    public void MergingIntoAnInt8FolderWritesAnInt8FolderCloseToTheAdapterModel(string architecture)
    {
        using var dir = TestSupport.TempDir();
        var baseModel = architecture == "opt" ? Path.Combine(TestSupport.RepoRoot, "tests", "fixtures", "parity", "opt-tiny") : TinyLlama(dir.Path);
        var int8 = Path.Combine(dir.Path, "int8");
        var quantize = FrugalProcess.Run("quantize", "--model", baseModel, "--to", "int8", "--out", int8);
        Assert.True(quantize.Exit == 0, quantize.Err);

        // A LoRA adapter on the int8 model with random non-zero A and B, standing in for a trained one.
        var adapter = Path.Combine(dir.Path, "adapter");
        using var withAdapter = HfCheckpoint.LoadModel(int8);
        var vocab = withAdapter.VocabSize;
        using var ids = randint(0, vocab, [2, 12], generator: new Generator(31), dtype: ScalarType.Int64);
        using var baseLogits = LoraTestSupport.Logits(withAdapter, ids);
        var lora = LoraModel.Apply(withAdapter, new LoraConfig { Rank = 4, Alpha = 8, Targets = LoraTargets.Parse("q_proj,v_proj") }, seed: 32);
        LoraTestSupport.RandomizeB(lora, LoraModel.DefaultAdapter, 33, std: 0.1);
        LoraAdapter.Save(lora, adapter, baseModelNameOrPath: int8);
        using var unmerged = LoraTestSupport.Logits(withAdapter, ids);

        var merged = Path.Combine(dir.Path, "merged");
        var merge = FrugalProcess.Run("merge", "--model", int8, "--adapter", adapter, "--out", merged);
        Assert.True(merge.Exit == 0, merge.Err);
        output.WriteLine(merge.Out.TrimEnd());
        var line = ReportLine().Match(merge.Out);
        Assert.True(line.Success, merge.Out);
        Assert.Equal("4", line.Groups[1].Value); // q_proj and v_proj of 2 layers
        double reported = double.Parse(line.Groups[2].Value, CultureInfo.InvariantCulture);
        Assert.InRange(reported, 1e-4, 1e-2);

        // The merged folder is int8 in frugal quantize's layout, and loads as an int8 model again.
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(merged, "config.json")))!;
        Assert.Equal("bitsandbytes", config["quantization_config"]!["quant_method"]!.GetValue<string>());
        Assert.True(config["quantization_config"]!["load_in_8bit"]!.GetValue<bool>());
        using var reloaded = HfCheckpoint.LoadModel(merged);
        using var quantized = HfCheckpoint.LoadModel(int8);
        var int8Layers = ModuleTree.Find(quantized, (_, m) => m is Int8Linear).Select(m => m.Path).ToList();
        Assert.Equal(int8Layers, ModuleTree.Find(reloaded, (_, m) => m is Int8Linear).Select(m => m.Path));
        foreach (var path in int8Layers)
        {
            var before = (Int8Linear)ModuleTree.Get(quantized, path);
            var after = (Int8Linear)ModuleTree.Get(reloaded, path);
            bool targeted = path.EndsWith("q_proj", StringComparison.Ordinal) || path.EndsWith("v_proj", StringComparison.Ordinal);
            // Only the adapter's layers were requantized; the others are the quantized folder's bytes.
            Assert.True(targeted != after.Weight.Same(before.Weight), path);
        }

        // Logits against the unmerged int8 model with the adapter: as in LoraModelTests, each of the 4 requantized
        // layers moves by about 2·e_w (its weight's rounding plus the int8 rounding of activations that the float
        // adapter path did not have), adding to first order: 4 · 2 · max e_w. The adapter moves them far more.
        using var mergedLogits = LoraTestSupport.Logits(reloaded, ids);
        double error = TensorAssert.RelativeError(mergedLogits, unmerged);
        double adapterShare = TensorAssert.RelativeError(baseLogits, unmerged);
        output.WriteLine($"{architecture}: max requantization error {reported:E2}, merged vs unmerged logits {error:E2}, adapter's share {adapterShare:E2}");
        Assert.True(error < 8 * reported, $"merged vs unmerged logits {error:E2}, max requantization error {reported:E2}");
        Assert.True(adapterShare > 10 * error, $"the adapter moved the logits by {adapterShare:E2} only");

        if (architecture == "llama")
        {
            var generated = FrugalProcess.Run("generate", "--model", merged, "--prompt", "And God said", "--max-new-tokens", "4", "--temperature", "0");
            Assert.True(generated.Exit == 0, generated.Err);
            Assert.StartsWith("And God said", generated.Out);
        }
    }

    // A 2-layer LLaMA with the bundled model's GPT-2 tokenizer, so frugal generate runs on what is merged into it.
    private static string TinyLlama(string root)
    {
        var folder = Path.Combine(root, "base");
        using var model = new LlamaForCausalLM(TestSupport.TinyConfig(tied: true) with { VocabSize = 50257, BosTokenId = 50256, EosTokenIds = [50256] });
        model.InitializeWeights(seed: 30, std: 0.1);
        HfCheckpoint.Save(model, folder);
        foreach (var name in new[] { "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt" })
        {
            File.Copy(Path.Combine(FrugalProcess.BundledModel, name), Path.Combine(folder, name));
        }
        return folder;
    }
}
