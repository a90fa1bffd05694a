using FrugalLM.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace FrugalLM.Lora;

/// <summary>
/// Puts LoRA adapters on a model's linear layers, as PEFT's <c>inject_adapter</c> does: each targeted layer
/// is replaced (at the same path) by a <see cref="LoraLinear"/> wrapping it, every base parameter is frozen,
/// and only the active adapter's A and B (plus biases, if the config says so) require gradients.
/// </summary>
internal static class LoraPlanner
{
    /// <summary><see cref="LoraModel.Apply"/>, optionally without requiring every target name to match (for loaded adapters, as PEFT).</summary>
    internal static LoraModel Add(nn.Module model, LoraConfig config, string adapterName, long? seed, bool strictTargets)
    {
        config.Validate();
        CheckAdapterName(adapterName);
        var existing = new LoraModel(model);
        if (existing.Adapters.Contains(adapterName))
        {
            throw new ArgumentException($"the model already has a LoRA adapter named '{adapterName}'", nameof(adapterName));
        }
        var plan = Plan(model, config, strictTargets);
        bool first = existing.Adapters.Count == 0;
        string? active = first ? adapterName : existing.ActiveAdapter;
        bool enabled = first || existing.Enabled;
        var generator = seed is long s ? new Generator((ulong)s) : null;
        foreach (var (path, module, rank, alpha) in plan)
        {
            if (module is not LoraLinear layer)
            {
                layer = new LoraLinear((nn.Module<Tensor, Tensor>)module);
                ModuleTree.Replace(model, path, layer);
                layer.SetActive(active);
                layer.Enabled = enabled;
                layer.train(model.training);
            }
            layer.AddAdapter(adapterName, rank, alpha, config.Dropout, config.UseRsLora, config, generator);
        }
        var result = new LoraModel(model);
        if (first)
        {
            result.SetActive(adapterName);
        }
        else
        {
            result.RefreshTrainable();
        }
        return result;
    }

    internal static void CheckAdapterName(string name)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.') || name.Any(char.IsWhiteSpace))
        {
            throw new ArgumentException($"adapter name '{name}' must be non-empty, without dots or spaces", nameof(name));
        }
    }

    /// <summary>
    /// The linear-like modules LoRA can wrap, by path, depth first (PyTorch's module order; TorchSharp's
    /// named_modules lists every child before any grandchild): plain linears and <see cref="ILinearLayer"/>s,
    /// and existing <see cref="LoraLinear"/> wrappers (never the modules inside a linear or a wrapper).
    /// </summary>
    internal static IReadOnlyList<(string Path, nn.Module Module)> Candidates(nn.Module model)
    {
        var result = new List<(string, nn.Module)>();
        void Visit(string prefix, nn.Module module)
        {
            foreach (var (name, child) in module.named_children())
            {
                var path = prefix.Length == 0 ? name : prefix + "." + name;
                if (child is LoraLinear || LinearLayers.IsLinear(child))
                {
                    result.Add((path, child));
                }
                else
                {
                    Visit(path, child);
                }
            }
        }
        Visit("", model);
        return result;
    }

    /// <summary>The model's <see cref="LoraLinear"/> layers with their paths, in module order (depth first, as PyTorch lists them).</summary>
    internal static IReadOnlyList<(string Path, LoraLinear Layer)> Wrapped(nn.Module model) =>
        Candidates(model).Where(c => c.Module is LoraLinear).Select(c => (c.Path, (LoraLinear)c.Module)).ToList();

    /// <summary>
    /// The layers <paramref name="config"/> selects on <paramref name="model"/>, with their ranks and alphas,
    /// after every check; the model is not touched.
    /// </summary>
    internal static IReadOnlyList<(string Path, nn.Module Module, int Rank, double Alpha)> Plan(nn.Module model, LoraConfig config, bool strictTargets)
    {
        var candidates = Candidates(model);
        var selected = candidates.Where(c => config.Selects(c.Path, c.Path == LoraModel.OutputHeadPath)).ToList();
        if (selected.Count == 0)
        {
            throw new ArgumentException($"LoRA targets '{config.Targets}'{(config.Exclude is null ? "" : $" (excluding '{config.Exclude}')")} match none of the model's linear layers. {Available(candidates)}");
        }
        if (strictTargets && config.Targets.Kind == LoraTargetKind.Names)
        {
            var unmatched = config.Targets.Names.Where(n => !candidates.Any(c => LoraTargets.MatchesName(c.Path, n))).ToList();
            if (unmatched.Count > 0)
            {
                throw new ArgumentException($"LoRA target{(unmatched.Count > 1 ? "s" : "")} '{string.Join("', '", unmatched)}' match{(unmatched.Count > 1 ? "" : "es")} no linear layer. {Available(candidates)}");
            }
        }
        var plan = new List<(string, nn.Module, int, double)>();
        foreach (var (path, module) in selected)
        {
            var (rank, alpha) = config.RankAndAlphaFor(path);
            var (inFeatures, outFeatures) = module is LoraLinear wrapper ? (wrapper.InFeatures, wrapper.OutFeatures) : LinearLayers.Describe(module)!.Value;
            if (rank > Math.Min(inFeatures, outFeatures))
            {
                throw new ArgumentException($"LoRA rank {rank} does not fit '{path}' ([{outFeatures}, {inFeatures}]): the rank must be at most min(in, out) = {Math.Min(inFeatures, outFeatures)}");
            }
            if (module is not LoraLinear && module is not nn.Module<Tensor, Tensor>)
            {
                throw new ArgumentException($"'{path}' is a {module.GetType().Name}, which LoRA cannot wrap (it is not a Tensor → Tensor module)");
            }
            plan.Add((path, module, rank, alpha));
        }
        return plan;
    }

    private static string Available(IReadOnlyList<(string Path, nn.Module Module)> candidates)
    {
        if (candidates.Count == 0)
        {
            return "The model has no linear layers.";
        }
        var names = candidates.Select(c => c.Path[(c.Path.LastIndexOf('.') + 1)..]).Distinct(StringComparer.Ordinal);
        return $"Its linear layers are named {string.Join(", ", names)} (e.g. '{candidates[0].Path}'); use names, 'all-linear' or 're:REGEX'.";
    }
}
