using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace FrugalLM.Models;

/// <summary>
/// Finds and replaces submodules by their dotted path (<c>model.layers.0.self_attn.q_proj</c>), the way
/// techniques compose: LoRA wraps a linear, int8 replaces one, checkpointing wraps a decoder layer, and none
/// knows the others. TorchSharp has no equivalent of Python's <c>setattr(parent, name, module)</c>: a
/// registered submodule cannot be re-registered, so this class swaps both the parent's registry entry and
/// the field that the parent's forward reads, found by its <see cref="ComponentNameAttribute"/> or name.
/// </summary>
public static class ModuleTree
{
    private static readonly FieldInfo Parameters = typeof(nn.Module).GetField("_internal_params", BindingFlags.NonPublic | BindingFlags.Instance)
        ?? throw new MissingFieldException("TorchSharp's Module._internal_params (ModuleTree needs it to replace parameters)");

    private static readonly FieldInfo Registry = typeof(nn.Module).GetField("_internal_submodules", BindingFlags.NonPublic | BindingFlags.Instance)
        ?? throw new MissingFieldException("TorchSharp's Module._internal_submodules (ModuleTree needs it to replace submodules)");

    /// <summary>The submodule at <paramref name="path"/>.</summary>
    public static nn.Module Get(nn.Module root, string path) =>
        path.Length == 0 ? root
        : root.named_modules().FirstOrDefault(m => m.name == path).module
          ?? throw new ArgumentException($"no submodule '{path}'", nameof(path));

    /// <summary>Every submodule (with its path) that <paramref name="predicate"/> accepts, in registration order.</summary>
    public static IReadOnlyList<(string Path, nn.Module Module)> Find(nn.Module root, Func<string, nn.Module, bool> predicate) =>
        root.named_modules().Where(m => predicate(m.name, m.module)).Select(m => (m.name, m.module)).ToList();

    /// <summary>
    /// Puts <paramref name="replacement"/> where the submodule at <paramref name="path"/> is, keeping its
    /// registered name (so parameter names keep their HF keys below it) and its position. Returns the module
    /// that was there.
    /// </summary>
    public static nn.Module Replace(nn.Module root, string path, nn.Module replacement)
    {
        int dot = path.LastIndexOf('.');
        var parent = Get(root, dot < 0 ? "" : path[..dot]);
        var name = path[(dot + 1)..];
        var previous = Get(root, path);
        if (parent is ITransparentWrapper wrapper)
        {
            // The wrapper's forward runs its inner module, which reads its own field.
            SetChild(wrapper.Inner, name, replacement, path);
        }
        SetChild(parent, name, replacement, path);
        return previous;
    }

    private static void SetChild(nn.Module parent, string name, nn.Module replacement, string path)
    {
        var parentType = parent.GetType();
        if (parentType.IsGenericType && parentType.GetGenericTypeDefinition() == typeof(ModuleList<>))
        {
            // ModuleList's indexer updates the list its enumerator (and so every forward) reads; the
            // registry that named_modules and named_parameters walk is updated below like any parent's.
            var indexer = parentType.GetProperty("Item")!;
            if (!indexer.PropertyType.IsInstanceOfType(replacement))
            {
                throw new ArgumentException($"'{path}' holds {indexer.PropertyType.Name}; {replacement.GetType().Name} cannot take its place");
            }
            indexer.SetValue(parent, replacement, [int.Parse(name, System.Globalization.CultureInfo.InvariantCulture)]);
        }
        else if (parent is not (ITransparentWrapper or IModuleDictionary))
        {
            var field = FindField(parentType, name)
                ?? throw new ArgumentException($"{parentType.Name} keeps '{name}' in no field that can be replaced");
            if (!field.FieldType.IsInstanceOfType(replacement))
            {
                throw new ArgumentException($"'{path}' is a {field.FieldType.Name} slot; {replacement.GetType().Name} cannot take its place");
            }
            field.SetValue(parent, replacement);
        }
        var registry = (OrderedDict<string, nn.Module>)Registry.GetValue(parent)!;
        registry[name] = replacement;
    }

    /// <summary>
    /// Puts <paramref name="value"/> in place of <paramref name="module"/>'s own parameter <paramref name="name"/>
    /// (for example the same weights in another dtype): through the module's property setter where it has one
    /// (TorchSharp's built-in layers), else in its registry and in every field that holds the old parameter
    /// (the field its forward reads). A module that keeps the parameter in its registry only reads it with
    /// <c>get_parameter</c> (as <c>Int8Linear</c> does its optional bias), so the registry entry is all there is to swap.
    /// </summary>
    /// <exception cref="ArgumentException">The module has no parameter <paramref name="name"/> of its own.</exception>
    public static void ReplaceParameter(nn.Module module, string name, Parameter value)
    {
        ArgumentNullException.ThrowIfNull(module);
        var property = module.GetType().GetProperty(name, BindingFlags.Instance | BindingFlags.Public);
        if (property is { CanWrite: true } && property.PropertyType.IsAssignableFrom(typeof(Parameter)))
        {
            property.SetValue(module, value);
            return;
        }
        var registry = (OrderedDict<string, Parameter>)Parameters.GetValue(module)!;
        if (!registry.TryGetValue(name, out var previous))
        {
            throw new ArgumentException($"{module.GetType().Name} has no parameter '{name}' of its own", nameof(name));
        }
        // By name (or ComponentName) first; then any other field holding the same object, which a forward
        // reading a differently named field would otherwise keep using after the swap.
        FindField(module.GetType(), name)?.SetValue(module, value);
        foreach (var field in Fields(module.GetType()).Where(f => ReferenceEquals(f.GetValue(module), previous)))
        {
            field.SetValue(module, value);
        }
        registry[name] = value;
    }

    private static IEnumerable<FieldInfo> Fields(Type type)
    {
        for (var t = type; t is not null && t != typeof(nn.Module); t = t.BaseType)
        {
            foreach (var field in t.GetFields(BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public | BindingFlags.DeclaredOnly))
            {
                if (field.FieldType.IsAssignableFrom(typeof(Parameter)))
                {
                    yield return field;
                }
            }
        }
    }

    private static FieldInfo? FindField(Type type, string name)
    {
        for (var t = type; t is not null && t != typeof(nn.Module); t = t.BaseType)
        {
            foreach (var field in t.GetFields(BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public | BindingFlags.DeclaredOnly))
            {
                var component = field.GetCustomAttribute<ComponentNameAttribute>()?.Name;
                if (component == name || (component is null && field.Name == name))
                {
                    return field;
                }
            }
        }
        return null;
    }
}
