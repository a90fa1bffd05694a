namespace FrugalLM.Distributed;

/// <summary>A collectives backend that was asked for cannot run here (its library is absent); the message names it.</summary>
public sealed class BackendUnavailableException(string message) : Exception(message);
