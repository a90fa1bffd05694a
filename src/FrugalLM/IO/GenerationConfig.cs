using System.Text.Json;
using System.Text.Json.Nodes;

namespace FrugalLM.IO;

/// <summary>HF <c>generation_config.json</c>: the sampling defaults a model folder ships.</summary>
public sealed record GenerationConfig
{
    /// <summary><c>bos_token_id</c>.</summary>
    public int? BosTokenId { get; init; }

    /// <summary><c>eos_token_id</c> (int or list in the file).</summary>
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];

    /// <summary><c>pad_token_id</c>.</summary>
    public int? PadTokenId { get; init; }

    /// <summary><c>do_sample</c>: false means greedy decoding.</summary>
    public bool DoSample { get; init; }

    /// <summary><c>temperature</c>.</summary>
    public double? Temperature { get; init; }

    /// <summary><c>top_k</c>.</summary>
    public int? TopK { get; init; }

    /// <summary><c>top_p</c>.</summary>
    public double? TopP { get; init; }

    /// <summary><c>max_new_tokens</c>.</summary>
    public int? MaxNewTokens { get; init; }

    /// <summary>Reads <c>generation_config.json</c> from a folder; null when the folder has none.</summary>
    public static GenerationConfig? Load(string folder)
    {
        var path = Path.Combine(folder, "generation_config.json");
        if (!File.Exists(path))
        {
            return null;
        }
        try
        {
            var o = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new CheckpointFormatException(path, "not a JSON object");
            return new GenerationConfig
            {
                BosTokenId = Int(o["bos_token_id"]),
                EosTokenIds = o["eos_token_id"] switch
                {
                    JsonArray a => a.Select(x => (int)x!.GetValue<double>()).ToArray(),
                    JsonValue v => [(int)v.GetValue<double>()],
                    _ => [],
                },
                PadTokenId = Int(o["pad_token_id"]),
                DoSample = o["do_sample"]?.GetValue<bool>() ?? false,
                Temperature = o["temperature"]?.GetValue<double>(),
                TopK = Int(o["top_k"]),
                TopP = o["top_p"]?.GetValue<double>(),
                MaxNewTokens = Int(o["max_new_tokens"]),
            };
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException)
        {
            throw new CheckpointFormatException(path, $"not a valid generation config ({e.Message})", e);
        }
    }

    /// <summary>Writes this configuration as <c>generation_config.json</c> into <paramref name="folder"/>.</summary>
    public void Save(string folder)
    {
        var o = new JsonObject { ["_from_model_config"] = false, ["do_sample"] = DoSample };
        if (BosTokenId is int bos)
        {
            o["bos_token_id"] = bos;
        }
        if (EosTokenIds.Count == 1)
        {
            o["eos_token_id"] = EosTokenIds[0];
        }
        else if (EosTokenIds.Count > 1)
        {
            o["eos_token_id"] = new JsonArray(EosTokenIds.Select(i => (JsonNode?)i).ToArray());
        }
        if (PadTokenId is int pad)
        {
            o["pad_token_id"] = pad;
        }
        if (Temperature is double t)
        {
            o["temperature"] = t;
        }
        if (TopK is int k)
        {
            o["top_k"] = k;
        }
        if (TopP is double p)
        {
            o["top_p"] = p;
        }
        if (MaxNewTokens is int m)
        {
            o["max_new_tokens"] = m;
        }
        AtomicFile.WriteText(Path.Combine(folder, "generation_config.json"), o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }

    private static int? Int(JsonNode? node) => node is JsonValue v ? (int)v.GetValue<double>() : null;
}
