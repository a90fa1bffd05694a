using System.Globalization;
using System.Text.Json.Nodes;
using FrugalLM.IO;
using FrugalLM.Models;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace FrugalLM.Quantization;

/// <summary>
/// Int8 models on disk in the layout transformers uses for bitsandbytes 8-bit checkpoints: each quantized
/// linear layer stores <c>weight</c> (int8 [out, in]), <c>SCB</c> (fp32 [out], the row absmax) and
/// <c>weight_format</c> (uint8 0: row-major), and config.json carries a <c>quantization_config</c> with
/// <c>quant_method: bitsandbytes</c> and <c>load_in_8bit: true</c>.
/// </summary>
public static class Int8Checkpoint
{
    /// <summary>The <c>quantization_config</c> transformers' BitsAndBytesConfig writes for an 8-bit model.</summary>
    public static JsonObject QuantizationConfig(Int8Options options) => new()
    {
        ["quant_method"] = "bitsandbytes",
        ["load_in_8bit"] = true,
        ["load_in_4bit"] = false,
        ["llm_int8_threshold"] = options.Threshold,
        ["llm_int8_skip_modules"] = new JsonArray(options.Skip.Select(s => (JsonNode?)s).ToArray()),
        ["llm_int8_enable_fp32_cpu_offload"] = false,
        ["llm_int8_has_fp16_weight"] = false,
        ["bnb_4bit_quant_type"] = "fp4",
        ["bnb_4bit_use_double_quant"] = false,
        ["bnb_4bit_compute_dtype"] = "float32",
        ["bnb_4bit_quant_storage"] = "uint8",
    };

    /// <summary>The config.json fields to add when saving <paramref name="options"/>-quantized weights.</summary>
    public static JsonObject ConfigFields(Int8Options options) => new() { ["quantization_config"] = QuantizationConfig(options) };

    /// <summary>The int8 settings of a checkpoint saved 8-bit, or null for a float checkpoint.</summary>
    /// <exception cref="CheckpointFormatException">The folder is quantized in a way FrugalLM does not read (4-bit, another method).</exception>
    public static Int8Options? Options(HfCheckpoint checkpoint)
    {
        if (checkpoint.RawConfig["quantization_config"] is not JsonObject q)
        {
            return null;
        }
        var file = Path.Combine(checkpoint.Folder, "config.json");
        var method = q["quant_method"]?.GetValue<string>();
        if (method != "bitsandbytes" || q["load_in_8bit"]?.GetValue<bool>() != true)
        {
            throw new CheckpointFormatException(file,
                $"quantization_config '{method ?? "?"}'{(q["load_in_4bit"]?.GetValue<bool>() == true ? " 4-bit" : "")} is not supported: FrugalLM reads bitsandbytes 8-bit folders");
        }
        var skip = q["llm_int8_skip_modules"] is JsonArray names ? names.Select(n => n!.GetValue<string>()).ToArray() : null;
        return new Int8Options
        {
            Threshold = q["llm_int8_threshold"]?.GetValue<double>() ?? 6.0,
            // transformers always keeps the output head in full precision (skip list null means lm_head).
            Skip = skip is { Length: > 0 } ? skip : ["lm_head"],
        };
    }

    /// <summary>
    /// Puts an empty <see cref="Int8Linear"/> in place of every linear layer that an 8-bit checkpoint stores
    /// quantized, before its weights are loaded. The float layers were created with uninitialized memory
    /// that is never touched, so it never becomes resident.
    /// </summary>
    public static void ReplaceWithEmpty(nn.Module model, Int8Options options)
    {
        foreach (var (path, module) in ModuleTree.Find(model, (path, m) => m is Linear && !Int8Quantization.IsSkipped(path, options.Skip)))
        {
            var linear = (Linear)module;
            using var scope = NewDisposeScope();
            var weight = empty(linear.out_features, linear.in_features, dtype: ScalarType.Int8);
            var scb = empty(linear.out_features, dtype: ScalarType.Float32);
            var layer = new Int8Linear(weight, scb, linear.bias is null ? null : empty(linear.out_features, dtype: linear.bias.dtype), options.Threshold);
            ModuleTree.Replace(model, path, layer);
            linear.Dispose();
        }
    }

    /// <summary>A one-line description, e.g. "int8 (threshold 6, skip lm_head)".</summary>
    public static string Describe(Int8Options options) =>
        string.Create(CultureInfo.InvariantCulture, $"int8 (threshold {options.Threshold}, skip {string.Join(',', options.Skip)})");
}
