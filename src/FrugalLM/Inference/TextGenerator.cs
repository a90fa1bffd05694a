using System.Diagnostics;
using FrugalLM.Models;
using FrugalLM.Native;
using FrugalLM.Tokenization;

namespace FrugalLM.Inference;

/// <summary>What one generation produced and how fast.</summary>
/// <param name="Text">The new text (prompt excluded), cut before any stop string.</param>
/// <param name="PromptTokens">Tokens in the prompt.</param>
/// <param name="NewTokens">Tokens generated.</param>
/// <param name="PrefillTime">Time to the first new token (the prompt's forward pass).</param>
/// <param name="DecodeTime">Time for the remaining tokens.</param>
/// <param name="StopReason">Why it stopped: <c>eos</c>, <c>stop-string</c> or <c>length</c>.</param>
public sealed record GenerationResult(string Text, int PromptTokens, int NewTokens, TimeSpan PrefillTime, TimeSpan DecodeTime, string StopReason)
{
    /// <summary>Prompt tokens per second in the prefill pass.</summary>
    public double PrefillTokensPerSecond => PromptTokens / Math.Max(1e-9, PrefillTime.TotalSeconds);

    /// <summary>New tokens per second after the first.</summary>
    public double DecodeTokensPerSecond => Math.Max(0, NewTokens - 1) / Math.Max(1e-9, DecodeTime.TotalSeconds);
}

/// <summary>
/// Text in, text out: tokenizes the prompt, decodes token by token with <see cref="TokenGenerator"/>, and
/// streams text as it becomes final: a character split across tokens, or a tail that may still turn into
/// a stop string, is held back until it is settled.
/// </summary>
public sealed class TextGenerator(CausalLM model, HfTokenizer tokenizer)
{
    /// <summary>Generates a continuation of <paramref name="prompt"/>; <paramref name="onText"/> receives each new piece.</summary>
    public GenerationResult Generate(string prompt, SamplingOptions options, IReadOnlyList<string>? stopStrings = null, Action<string>? onText = null)
    {
        var promptIds = tokenizer.Encode(prompt, addBos: tokenizer.AddBosToken);
        if (promptIds.Count == 0)
        {
            // An empty prompt starts from the beginning-of-text token, as GPT-2-style models expect.
            promptIds = [tokenizer.BosTokenId ?? tokenizer.EosTokenIds.FirstOrDefault()];
        }
        var eos = options.StopTokenIds.Count > 0 ? options.StopTokenIds : tokenizer.EosTokenIds;
        var stops = new StopStrings(stopStrings ?? []);
        var generated = new List<int>();
        string shown = "", visible = "";
        string reason = "length";
        var clock = Stopwatch.StartNew();
        TimeSpan prefill = TimeSpan.Zero;
        foreach (var token in new TokenGenerator(model).Generate(promptIds, options with { StopTokenIds = eos }))
        {
            if (generated.Count == 0)
            {
                prefill = clock.Elapsed;
            }
            generated.Add(token);
            MemoryTrace.Mark("token", resetPeak: false);
            var text = tokenizer.Decode(generated);
            (visible, bool stopped) = stops.Check(text);
            // U+FFFD at the end means the last token ended inside a multi-byte character.
            var settled = stopped ? visible : visible.TrimEnd('\uFFFD');
            if (settled.Length > shown.Length && settled.StartsWith(shown, StringComparison.Ordinal))
            {
                onText?.Invoke(settled[shown.Length..]);
                shown = settled;
            }
            if (stopped)
            {
                reason = "stop-string";
                break;
            }
        }
        if (reason != "stop-string" && generated.Count < options.MaxNewTokens && generated.Count + promptIds.Count < model.MaxPositions)
        {
            reason = "eos";
        }
        var final = reason == "stop-string" ? visible : tokenizer.Decode(generated);
        if (final.Length > shown.Length && final.StartsWith(shown, StringComparison.Ordinal))
        {
            onText?.Invoke(final[shown.Length..]);
        }
        return new GenerationResult(final, promptIds.Count, generated.Count, prefill, clock.Elapsed - prefill, reason);
    }
}
