namespace FrugalLM.Planning;

/// <summary>
/// A named model whose <c>config.json</c> is built in, so estimates need no download.
/// </summary>
/// <param name="Name">The preset name (e.g. <c>llama-7b</c>).</param>
/// <param name="Aliases">Other accepted names.</param>
/// <param name="HubId">The Hugging Face repository the configuration describes.</param>
/// <param name="ConfigSource">Where the configuration values were read.</param>
/// <param name="ConfigJson">The HF <c>config.json</c> fields that shape the model, as published.</param>
/// <param name="PublishedParameterCount">The parameter count a publication gives, in billions.</param>
/// <param name="PublishedResolution">The precision of that figure in billions (0 for an exact count).</param>
/// <param name="PublishedSource">Where the published count comes from.</param>
public sealed record ModelPreset(
    string Name,
    IReadOnlyList<string> Aliases,
    string HubId,
    string ConfigSource,
    string ConfigJson,
    double PublishedParameterCount,
    double PublishedResolution,
    string PublishedSource)
{
    /// <summary>The model spec this preset describes.</summary>
    public ModelSpec Spec => ModelSpec.Parse(ConfigJson, Name, $"preset {Name}");
}

/// <summary>The built-in model presets and the resolution of <c>--model</c> (a preset name or a model folder).</summary>
public static class ModelCatalog
{
    private const string LlamaPaper = "Touvron et al. 2023, LLaMA (arXiv:2302.13971), Table 2";

    /// <summary>Every preset, smallest family member first.</summary>
    public static IReadOnlyList<ModelPreset> Presets { get; } =
    [
        new("llama-7b", ["llama-6b", "huggyllama/llama-7b"], "huggyllama/llama-7b",
            "https://huggingface.co/huggyllama/llama-7b/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"max_sequence_length":2048,"rms_norm_eps":1e-06,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"pad_token_id":0,"torch_dtype":"float16"}""",
            6.7, 0.1, LlamaPaper),
        new("llama-13b", ["huggyllama/llama-13b"], "huggyllama/llama-13b",
            "https://huggingface.co/huggyllama/llama-13b/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":5120,"intermediate_size":13824,"num_hidden_layers":40,"num_attention_heads":40,"max_sequence_length":2048,"rms_norm_eps":1e-06,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"pad_token_id":0,"torch_dtype":"float16"}""",
            13.0, 0.1, LlamaPaper),
        new("llama-33b", ["llama-30b", "huggyllama/llama-30b"], "huggyllama/llama-30b",
            "https://huggingface.co/huggyllama/llama-30b/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":6656,"intermediate_size":17920,"num_hidden_layers":60,"num_attention_heads":52,"max_sequence_length":2048,"rms_norm_eps":1e-06,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"pad_token_id":0,"torch_dtype":"float16"}""",
            32.5, 0.1, LlamaPaper),
        new("llama-65b", ["huggyllama/llama-65b"], "huggyllama/llama-65b",
            "https://huggingface.co/huggyllama/llama-65b/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":8192,"intermediate_size":22016,"num_hidden_layers":80,"num_attention_heads":64,"max_sequence_length":2048,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"pad_token_id":0,"torch_dtype":"float16"}""",
            65.2, 0.1, LlamaPaper),
        new("llama2-7b", ["llama-2-7b", "meta-llama/Llama-2-7b-hf"], "meta-llama/Llama-2-7b-hf",
            "config.json of meta-llama/Llama-2-7b-hf as copied with _name_or_path into derived repos, e.g. https://huggingface.co/north/llama2-7b-exporttest3/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"max_position_embeddings":4096,"rms_norm_eps":1e-05,"rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"torch_dtype":"float16"}""",
            6.74, 0.01, "Hugging Face Hub safetensors metadata, \"6.74B params\" (https://huggingface.co/galqiwi/Llama-2-7b-hf)"),
        new("llama2-13b", ["llama-2-13b", "meta-llama/Llama-2-13b-hf"], "meta-llama/Llama-2-13b-hf",
            "config.json of the Llama-2-13b conversion, e.g. https://huggingface.co/NousResearch/Llama-2-13b-chat-hf/blob/aad3c0b2315a458d54cd9b09ddc51cf06021196f/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":5120,"intermediate_size":13824,"num_hidden_layers":40,"num_attention_heads":40,"num_key_value_heads":40,"max_position_embeddings":4096,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"torch_dtype":"float16"}""",
            13, 1, "Touvron et al. 2023, Llama 2 (arXiv:2307.09288), Table 1: 13B"),
        new("llama2-70b", ["llama-2-70b", "meta-llama/Llama-2-70b-hf"], "meta-llama/Llama-2-70b-hf",
            "config.json of meta-llama/Llama-2-70b-hf as copied with _name_or_path into derived repos, e.g. https://huggingface.co/dreamgen/opus-v0-70b/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":8192,"intermediate_size":28672,"num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,"max_position_embeddings":4096,"rms_norm_eps":1e-05,"rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"torch_dtype":"float16"}""",
            69, 1, "Hugging Face Hub safetensors metadata, \"69B params\" (https://huggingface.co/galqiwi/llama2-70b-hf)"),
        new("llama3-8b", ["llama-3-8b", "meta-llama/Meta-Llama-3-8B"], "meta-llama/Meta-Llama-3-8B",
            "config.json of meta-llama/Meta-Llama-3-8B as uploaded with huggingface_hub, e.g. https://huggingface.co/pandyamarut/Meta-Llama-3-8B/blob/3689724debf35846edda50e9442887aa41c7157c/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"max_position_embeddings":8192,"rms_norm_eps":1e-05,"rope_theta":500000.0,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":128000,"eos_token_id":128001,"torch_dtype":"bfloat16"}""",
            8.030261248, 0, "model.safetensors.index.json of Meta-Llama-3-8B: total_size 16060522496 bytes in bf16, i.e. 8,030,261,248 parameters"),
        new("llama3-70b", ["llama-3-70b", "meta-llama/Meta-Llama-3-70B"], "meta-llama/Meta-Llama-3-70B",
            "config.json of meta-llama/Meta-Llama-3-70B as uploaded, e.g. https://huggingface.co/kittn/Meta-Llama-3-70B-quant/blob/main/config.json",
            """{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":8192,"intermediate_size":28672,"num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,"max_position_embeddings":8192,"rms_norm_eps":1e-05,"rope_theta":500000.0,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":128000,"eos_token_id":128001,"torch_dtype":"bfloat16"}""",
            70.553706496, 0, "model.safetensors.index.json of Llama-3.1-70B (same tensors as Llama-3-70B; only RoPE scaling differs): total_size 141107412992 bytes in bf16, i.e. 70,553,706,496 parameters"),
        new("mistral-7b", ["mistralai/Mistral-7B-v0.1"], "mistralai/Mistral-7B-v0.1",
            "config.json of mistralai/Mistral-7B-v0.1 as copied with _name_or_path into derived repos, e.g. https://huggingface.co/dmayboroda/42_mistral_0.1/blob/main/config.json",
            """{"model_type":"mistral","architectures":["MistralForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":32768,"rms_norm_eps":1e-05,"rope_theta":10000.0,"sliding_window":4096,"hidden_act":"silu","tie_word_embeddings":false,"bos_token_id":1,"eos_token_id":2,"torch_dtype":"bfloat16"}""",
            7.241732096, 0, "model.safetensors.index.json of Mistral-7B-v0.1: total_size 14483464192 bytes in bf16, i.e. 7,241,732,096 parameters"),
        new("opt-6.7b", ["facebook/opt-6.7b"], "facebook/opt-6.7b",
            "config.json of facebook/opt-6.7b as copied with _name_or_path into derived repos, e.g. https://huggingface.co/iproskurina/opt-6.7b-GPTQ-4bit-g128/blob/main/config.json",
            """{"model_type":"opt","architectures":["OPTForCausalLM"],"vocab_size":50272,"hidden_size":4096,"ffn_dim":16384,"num_hidden_layers":32,"num_attention_heads":32,"max_position_embeddings":2048,"word_embed_proj_dim":4096,"do_layer_norm_before":true,"_remove_final_layer_norm":false,"enable_bias":true,"layer_norm_elementwise_affine":true,"activation_function":"relu","dropout":0.1,"attention_dropout":0.0,"torch_dtype":"float16"}""",
            6.7, 0.1, "Zhang et al. 2022, OPT (arXiv:2205.01068), Table 1: 6.7B"),
    ];

    /// <summary>The preset with this name or alias (case-insensitive), or null.</summary>
    public static ModelPreset? FindPreset(string name) => Presets.FirstOrDefault(p =>
        string.Equals(p.Name, name, StringComparison.OrdinalIgnoreCase)
        || p.Aliases.Any(a => string.Equals(a, name, StringComparison.OrdinalIgnoreCase)));

    /// <summary>
    /// Resolves <c>--model</c>: a preset name, else a folder holding config.json, else a config.json path.
    /// </summary>
    /// <exception cref="ModelConfigException">Neither a preset nor a readable, supported configuration.</exception>
    public static ModelSpec Resolve(string nameOrPath)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(nameOrPath);
        if (FindPreset(nameOrPath) is { } preset)
        {
            return preset.Spec;
        }
        if (Directory.Exists(nameOrPath) || File.Exists(nameOrPath))
        {
            return ModelSpec.Load(nameOrPath);
        }
        throw new ModelConfigException(
            $"'{nameOrPath}' is neither a model preset nor a folder with config.json; presets: {string.Join(", ", Presets.Select(p => p.Name))}");
    }
}
