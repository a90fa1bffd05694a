namespace FrugalLM.Distributed;

/// <summary>
/// Chooses the collectives backend for this process: OpenMPI for CPU tensors, or NCCL for CUDA tensors when
/// <c>FRUGAL_COLLECTIVES=nccl</c> (bootstrapped over OpenMPI; "NCCL not available" where it is absent).
/// </summary>
public static class Collectives
{
    /// <summary>
    /// The backend <c>FRUGAL_COLLECTIVES</c> names; by default <see cref="MpiCollectives"/> when this process was
    /// started by OpenMPI's <c>mpirun</c> (which sets <c>OMPI_COMM_WORLD_SIZE</c>), otherwise
    /// <see cref="SingleProcessCollectives"/>.
    /// </summary>
    public static ICollectives Create()
    {
        string backend = Environment.GetEnvironmentVariable(BackendVariable)?.Trim().ToLowerInvariant() ?? "";
        return backend switch
        {
            "" or "auto" => LaunchedByMpirun ? MpiCollectives.Initialize() : new SingleProcessCollectives(),
            "mpi" or "openmpi" => MpiCollectives.Initialize(),
            "single" => new SingleProcessCollectives(),
            "nccl" => CreateNccl(),
            _ => throw new ArgumentException($"{BackendVariable}={backend}: expected auto, mpi, nccl or single"),
        };
    }

    /// <summary>The environment variable that picks the backend: auto (default), mpi, nccl or single.</summary>
    public const string BackendVariable = "FRUGAL_COLLECTIVES";

    // NCCL is checked before MPI starts, so a machine without it gets the one clear message, not an MPI error first.
    private static NcclCollectives CreateNccl()
    {
        if (!NcclCollectives.IsAvailable(out var reason))
        {
            throw new BackendUnavailableException($"NCCL not available: {reason}. Use the OpenMPI backend ({BackendVariable}=mpi, the default).");
        }
        return NcclCollectives.Initialize(LaunchedByMpirun ? MpiCollectives.Initialize() : new SingleProcessCollectives());
    }

    /// <summary>True when OpenMPI's launcher started this process.</summary>
    public static bool LaunchedByMpirun => Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_SIZE") is not null;
}
