using System.Text.Json.Nodes;

namespace FrugalLM.Tests.Cli;

public sealed class LoraCommandTests
{
    [Fact]
    public void LoraFineTuneSavesAPeftAdapterThatGenerateEvalAndMergeUse()
    {
        using var dir = TestSupport.TempDir();
        // A small base model in a complete HF folder (GPT-2 tokenizer), then LoRA on a prompt/completion task.
        var config = Path.Combine(dir.Path, "config.json");
        File.WriteAllText(config, (TestSupport.TinyConfig() with { VocabSize = 50257 }).ToJson().ToJsonString());
        var text = Path.Combine(dir.Path, "text.txt");
        File.WriteAllText(text, string.Join(' ', Enumerable.Range(0, 4000).Select(i => (i * 7919 % 997).ToString(System.Globalization.CultureInfo.InvariantCulture))));
        var baseModel = Path.Combine(dir.Path, "base");
        var made = FrugalProcess.Run("train", "--config", config, "--data", text, "--out", baseModel, "--steps", "2", "--batch", "2", "--seq", "32");
        Assert.True(made.Exit == 0, made.Err);
        var task = Path.Combine(dir.Path, "task.jsonl");
        File.WriteAllLines(task, Enumerable.Range(0, 60).Select(i => $"{{\"prompt\": \"Swap: {i} {i + 1} =>\", \"completion\": \" {i + 1} {i}\"}}"));

        var adapter = Path.Combine(dir.Path, "adapter");
        var trained = FrugalProcess.Run("train", "--model", baseModel, "--data", task, "--out", adapter, "--steps", "4", "--batch", "4", "--seq", "24",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.05", "--lora-targets", "q_proj,v_proj", "--lr", "1e-2", "--precision", "bf16");
        Assert.True(trained.Exit == 0, trained.Err);
        Assert.Contains("LoRA", trained.Err);
        Assert.False(File.Exists(Path.Combine(adapter, "model.safetensors")));
        var adapterConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(adapter, "adapter_config.json")))!.AsObject();
        Assert.Equal("LORA", adapterConfig["peft_type"]!.GetValue<string>());
        Assert.Equal(4, adapterConfig["r"]!.GetValue<int>());
        Assert.Equal(8.0, adapterConfig["lora_alpha"]!.GetValue<double>());
        using (var weights = FrugalLM.IO.SafeTensorsFile.Open(Path.Combine(adapter, "adapter_model.safetensors")))
        {
            Assert.Equal(2 * 2 * 2, weights.Tensors.Count); // 2 layers x (q_proj, v_proj) x (A, B)
            Assert.All(weights.Tensors.Values, t => Assert.Equal("F32", t.Dtype));
            Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", weights.Tensors.Keys);
        }

        var generated = FrugalProcess.Run("generate", "--model", baseModel, "--adapter", adapter, "--prompt", "Swap: 3 4 =>", "--max-new-tokens", "4", "--temperature", "0");
        Assert.True(generated.Exit == 0, generated.Err);
        var withAdapter = FrugalProcess.Run("eval", "--model", baseModel, "--adapter", adapter, "--data", task, "--seq", "24", "--all", "--json");
        Assert.True(withAdapter.Exit == 0, withAdapter.Err);
        var evalJson = JsonNode.Parse(withAdapter.Out)!.AsObject();
        Assert.Equal(60, evalJson["examples"]!.GetValue<int>());

        var merged = Path.Combine(dir.Path, "merged");
        var merge = FrugalProcess.Run("merge", "--model", baseModel, "--adapter", adapter, "--out", merged);
        Assert.True(merge.Exit == 0, merge.Err);
        var mergedEval = JsonNode.Parse(FrugalProcess.Run("eval", "--model", merged, "--data", task, "--seq", "24", "--all", "--json").Out)!.AsObject();
        // The merged fp32 model computes W + BA in one matrix: the same loss to fp32 rounding.
        Assert.Equal(evalJson["loss"]!.GetValue<double>(), mergedEval["loss"]!.GetValue<double>(), 1e-4);
        Assert.Equal(evalJson["exact_match"]!.GetValue<double>(), mergedEval["exact_match"]!.GetValue<double>());
    }
}
