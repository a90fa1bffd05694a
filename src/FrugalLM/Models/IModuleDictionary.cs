namespace FrugalLM.Models;

/// <summary>
/// A container whose children are looked up by name in its module registry (like PyTorch's ModuleDict),
/// not held in fields: <see cref="ModuleTree"/> replaces such a child by updating the registry alone.
/// </summary>
public interface IModuleDictionary;
